"""Partial-set and open-set source-free adaptation with SHOT, as its official code runs them (tim-learn/SHOT
`object/image_target.py --da pda`, `object/image_target_oda.py`).

Partial set (PDA): the target holds a subset of the source's classes. SHOT's loop runs without the diversity
term (the official script sets `gent` off: a uniform class marginal is wrong when classes are missing), and a
class is a pseudo-label candidate only while more than PDA_MIN_COUNT target samples hold it (`--threshold 10`
in run.sh), so the centroids of absent classes drop out. Scored by accuracy over the target samples.

Open set (ODA): the target also holds classes the source never saw, labelled as one "unknown" class
(index = the source's class count). Every time pseudo-labels are made, the normalised prediction entropy
H(p_i) / log C is split in two by 2-means (scikit-learn's KMeans, random_state 0, as the official code); the
high-entropy cluster is "unknown". Centroid pseudo-labels are fitted on the known samples only, SHOT's
cross-entropy and conditional entropy run on them, and the diversity term on the whole batch. Scores: the
same entropy split on the scored data predicts "unknown"; per-class accuracy over the known classes and the
unknown class gives OS* (known classes' mean), OS (mean over all, the SHOT paper's ODA figure), UNK (the
unknown class's) and the H-score 2 OS* UNK / (OS* + UNK).

Built-in variants of the digits pairs (fixed before any run, by analogy with Office-Home's first 25 of 65
classes): partial targets keep the digits PARTIAL_CLASSES; open-set sources train on KNOWN_CLASSES
(`train-source --classes 0,1,2,3,4`) and the target keeps every class.
"""

from __future__ import annotations

import math

import numpy as np
import torch

SETTINGS = ("closed", "partial", "open")
PDA_MIN_COUNT = 10                     # run.sh: image_target.py --da pda --threshold 10
PARTIAL_CLASSES = (0, 1, 2, 3, 4)      # the built-in digits' partial-set target classes
KNOWN_CLASSES = (0, 1, 2, 3, 4)        # the built-in digits' open-set known classes (5-9 are unknown)


def normalised_entropy(probs: torch.Tensor, epsilon: float = 1e-5) -> torch.Tensor:
    """H(p_i) / log C in [0, 1] (the official code's epsilon inside the log)."""
    return -(probs * torch.log(probs + epsilon)).sum(1) / math.log(probs.shape[1])


def unknown_by_entropy(probs: torch.Tensor) -> torch.Tensor:
    """(N,) bool: the samples of the high-entropy cluster of a 2-means split of the normalised entropy."""
    from sklearn.cluster import KMeans

    entropy = normalised_entropy(probs.float().cpu()).numpy().reshape(-1, 1)
    clusters = KMeans(2, random_state=0, n_init=10).fit(entropy).labels_
    unknown_cluster = 1 if entropy[clusters == 1].mean() > entropy.mean() else 0
    return torch.from_numpy(clusters == unknown_cluster)


def open_set_predictions(probs: torch.Tensor, num_known: int) -> torch.Tensor:
    """Argmax predictions with the high-entropy cluster called unknown (label num_known)."""
    return probs.argmax(1).masked_fill(unknown_by_entropy(probs).to(probs.device), num_known)


def open_set_scores(probs: torch.Tensor, labels: torch.Tensor, num_known: int,
                    predictions: torch.Tensor | None = None) -> dict[str, float]:
    """OS*, OS, UNK and the H-score (percent) of the open-set predictions (`open_set_predictions` of `probs`
    unless given); per-class means over the classes present in `labels`."""
    if predictions is None:
        predictions = open_set_predictions(probs, num_known)
    predictions, labels = predictions.cpu(), labels.cpu()
    present = [int(c) for c in torch.unique(labels)]
    per_class = {c: 100.0 * float((predictions[labels == c] == c).float().mean()) for c in present}
    known = [per_class[c] for c in present if c < num_known]
    os_star = float(np.mean(known)) if known else float("nan")
    unknown = per_class.get(num_known, float("nan"))
    h_score = 2 * os_star * unknown / (os_star + unknown) if os_star + unknown > 0 else 0.0
    return {"os_star": os_star, "os": float(np.mean(list(per_class.values()))), "unknown": unknown,
            "h_score": h_score}
