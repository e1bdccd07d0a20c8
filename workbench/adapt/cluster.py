"""SHOT's pseudo-labels: cosine-distance weighted k-means, seeded by the model's own predictions.

    f_i  <- [f_i, 1] / ||[f_i, 1]||                       (features with a constant 1, L2-normalised)
    c_k   = sum_i w_ik f_i / sum_i w_ik                   (round 1: w = softmax; round 2: one-hot labels)
    y_i   = argmin_{k in S} cos_dist(f_i, c_k)            (S: classes holding at least one sample under
                                                           the labels the round starts from: the model's
                                                           argmax, then the previous round's labels)

A class that empties in one round drops out of the next, as in the official image code.

Nearest-centroid search runs on faiss (inner product on normalised vectors) when it is
importable and on torch otherwise; both give the same labels. Features on a GPU stay there:
faiss's GPU index when the installed faiss has one (`pip install -e ".[gpu]"`, faiss-gpu-cu12),
else torch on the GPU. Features on the CPU use faiss's CPU index (`pip install -e ".[cpu]"`,
faiss-cpu; the GPU build has it too), or torch where faiss is not installed.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

ROUNDS = 2
CLUSTER_BACKENDS = ("auto", "faiss", "torch")  # auto: faiss where installed (on the GPU: faiss-gpu)


def faiss_available() -> bool:
    try:
        import faiss  # noqa: F401
    except ImportError:
        return False
    return True


def faiss_gpu_available() -> bool:
    """A faiss build with GPU indexes (faiss-gpu-cu12) that sees a GPU."""
    if not faiss_available():
        return False
    import faiss

    return hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0


_GPU_RESOURCES = {}


def _faiss_index(dim: int, device: torch.device):
    """An exact inner-product index, on `device`'s GPU when faiss can put it there."""
    import faiss

    index = faiss.IndexFlatIP(dim)
    if device.type == "cuda" and faiss_gpu_available():
        gpu = device.index if device.index is not None else torch.cuda.current_device()
        resources = _GPU_RESOURCES.setdefault(gpu, faiss.StandardGpuResources())  # scratch memory, made once
        index = faiss.index_cpu_to_gpu(resources, gpu, index)
    return index


def _nearest_centroid(features: torch.Tensor, centroids: torch.Tensor, backend: str) -> torch.Tensor:
    """Index of the most cosine-similar centroid for every (already normalised) feature."""
    centroids = F.normalize(centroids, dim=1)
    if backend == "faiss":
        index = _faiss_index(centroids.shape[1], features.device)
        index.add(centroids.detach().cpu().float().contiguous().numpy())
        _, nearest = index.search(features.detach().cpu().float().contiguous().numpy(), 1)
        return torch.from_numpy(nearest[:, 0]).to(features.device)
    return (features @ centroids.T).argmax(dim=1)


def _augment(features: torch.Tensor) -> torch.Tensor:
    """[f, 1] / ||[f, 1]||: the constant 1 keeps the zero vector away, the norm makes the dot product cosine."""
    features = features.float()
    return F.normalize(torch.cat([features, torch.ones_like(features[:, :1])], dim=1), dim=1)


def check_backend(backend: str, device: torch.device | None = None) -> str:
    """`auto`: faiss on the CPU when installed; on a GPU faiss only with its GPU build, else torch there."""
    if backend == "auto":
        on_gpu = device is not None and device.type == "cuda"
        backend = "faiss" if (faiss_gpu_available() if on_gpu else faiss_available()) else "torch"
    if backend not in CLUSTER_BACKENDS[1:]:
        raise ValueError(f"unknown clustering backend {backend!r}: use auto, faiss or torch")
    if backend == "faiss" and not faiss_available():
        raise ValueError("--cluster-backend faiss but faiss is not installed: pip install -e \".[cpu]\" (or "
                         "\".[gpu]\" on a GPU machine), or use --cluster-backend torch (the same labels)")
    return backend


def shot_centroids(features: torch.Tensor, probs: torch.Tensor, rounds: int = ROUNDS,
                   backend: str = "auto", min_count: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """The last round's centroids (in the augmented, normalised feature space) and the class of each.

    Fitted on (N, d) features and (N, K) softmax outputs; `assign_to_centroids` then labels these or any
    other features (the dense adapter fits on a sample of pixels and labels every pixel). A class is a
    candidate while more than `min_count` samples hold it (the official --threshold: 0, and 10 for
    partial-set adaptation, where classes the target lacks must drop out)."""
    backend = check_backend(backend, features.device)
    features = _augment(features)
    num_classes = probs.shape[1]
    weights, labels = probs.float(), probs.argmax(1)
    for r in range(rounds):
        centroids = weights.T @ features / (weights.sum(0)[:, None] + 1e-8)
        candidates = (torch.bincount(labels, minlength=num_classes) > min_count).nonzero().squeeze(1)
        if not len(candidates):
            raise ValueError(f"no class holds more than {min_count} of the {len(labels)} samples: lower the "
                             f"pseudo-label threshold")
        if r == rounds - 1:
            return centroids[candidates], candidates
        labels = candidates[_nearest_centroid(features, centroids[candidates], backend)]
        weights = F.one_hot(labels, num_classes).float()
    raise ValueError("rounds must be at least 1")


def assign_to_centroids(features: torch.Tensor, centroids: torch.Tensor, classes: torch.Tensor,
                        backend: str = "auto") -> torch.Tensor:
    """The class of the most cosine-similar centroid for every row of (N, d) raw features."""
    return classes[_nearest_centroid(_augment(features), centroids, check_backend(backend, features.device))]


def shot_pseudo_labels(features: torch.Tensor, probs: torch.Tensor, rounds: int = ROUNDS,
                       backend: str = "auto", min_count: int = 0) -> torch.Tensor:
    """Pseudo-labels (N,) for bottleneck features (N, d) and softmax outputs (N, K)."""
    centroids, classes = shot_centroids(features, probs, rounds, backend, min_count)
    return assign_to_centroids(features, centroids, classes, backend)
