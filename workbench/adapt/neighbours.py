"""Nearest neighbours in a memory bank of target features, for the neighbourhood methods (NRC, AaD).

The bank holds one row per target sample: its L2-normalised bottleneck feature and its softmax score,
written once from the source model and then, at every step, for the samples of the batch (as the
official NRC and AaD code does, before it looks the neighbours up, so that each sample is its own
nearest neighbour and is dropped as such).

Neighbours are the rows of highest cosine similarity (inner product of normalised rows), found exactly:
on the CPU by faiss's brute-force search (`faiss.knn`, BLAS over the bank, no index to rebuild although
rows change every step) when faiss is installed, else, and for tensors on a GPU, by torch's matrix
product and top-k in chunks of queries (a bank of a million 256-d features and a batch of 64 is a
64 x 1M similarity block).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .cluster import check_backend

QUERY_CHUNK_ELEMENTS = 1 << 26   # similarities computed at once by the torch search (256 MiB of fp32)


def nearest_neighbours(queries: torch.Tensor, bank: torch.Tensor, k: int, backend: str = "auto") -> torch.Tensor:
    """Indices (n, k) of each query's k rows of `bank` with the largest inner product, the largest first."""
    if k > len(bank):
        raise ValueError(f"{k} neighbours asked of a bank of {len(bank)} samples: use fewer neighbours")
    if check_backend(backend, queries.device) == "faiss" and queries.device.type == "cpu":
        import faiss

        _, idx = faiss.knn(queries.float().contiguous().numpy(), bank.float().contiguous().numpy(), k,
                           metric=faiss.METRIC_INNER_PRODUCT)
        return torch.from_numpy(idx).long()
    chunk = max(1, QUERY_CHUNK_ELEMENTS // max(1, len(bank)))
    return torch.cat([(q @ bank.T).topk(k, dim=1).indices for q in queries.split(chunk)])


class MemoryBank:
    """Normalised features (N, d) and softmax scores (N, C) of every target sample."""

    def __init__(self, features: torch.Tensor, scores: torch.Tensor, backend: str = "auto"):
        self.features = F.normalize(features.float(), dim=1)
        self.scores = scores.float().clone()
        self.backend = backend

    @torch.no_grad()
    def update(self, idx: torch.Tensor, features: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        """Write the batch's rows; returns its normalised features (the queries of its neighbours)."""
        normalised = F.normalize(features.detach().float(), dim=1).to(self.features.device)
        idx = idx.to(self.features.device)
        self.features[idx] = normalised
        self.scores[idx] = scores.detach().float().to(self.scores.device)
        return normalised

    @torch.no_grad()
    def neighbours(self, queries: torch.Tensor, k: int) -> torch.Tensor:
        """The k nearest rows of each query that is itself a bank row, leaving out the nearest (the row itself)."""
        return nearest_neighbours(queries, self.features, k + 1, self.backend)[:, 1:].to(self.features.device)
