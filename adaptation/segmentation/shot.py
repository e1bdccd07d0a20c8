"""Pixel-level SHOT-IM and SHOT, and the IM variants for pixels: source-free adaptation of a segmentation model.

SHOT (Liang, Hu, Feng, ICML 2020) with every pixel in the role of a sample. The head's final 1x1
conv C (the hypothesis) is frozen; backbone F and the rest of the head g are trained on unlabelled
target images with

    L  = IM + beta * CE(C(z), y_hat)                              (beta = 0: `method="shot-im"`)
    IM = mean_{n,u} H(p_{n,u}) - H(mean_{n,u} p_{n,u})             over the batch's pixels u of images n

The diversity term -H(p_bar) equals KL(p_bar || uniform) - log K: it pulls the batch's class marginal
towards uniform, which suits SHOT's balanced image benchmarks but not pixels, where background is most
of every image. The default `diversity_prior="initial"` replaces it with KL(p_bar || pi), pi the
source model's mean per-pixel prediction over the target images, measured once before adaptation:
the model may sharpen its pixels but not shift its class proportions away from where it started.
That loss is no longer SHOT-IM: `method_name` names what a configuration runs ("shot-im" and "shot"
only with SHOT's uniform prior and, for SHOT, its centroid pseudo-labels; "im (source prior)" and
"im (source prior) + centroid labels" with the default prior), and tables and logs use that name.

How the default was chosen, honestly: on the built-in scenes (dtn + fcn source, the one-conv fcn head of
before issue 34, 5 epochs of IM, one seed) the target mIoU went to 48.7 with the source prior, 35.1 with
the uniform prior (`"uniform"`) and 26.7 with entropy alone (`diversity_weight=0`, URMA's setting),
measured on `builtin:scenes/textured:test`, the split the scenes table reports (docs/RESULTS.md, "Pixel SHOT on
scenes v3", 2026-12-02). Repeated on `builtin:scenes/textured:val` with the val-selected source and
mmseg's FCNHead (seed 0, docs/RESULTS.md): 58.2 with the source prior, 36.7 with the uniform one (the
source model: 50.1), so `initial` stays the default, now on val evidence. The adapter scores the target's val
split (`val_on`) beside its test split (`test_on`) before and after adapting: settings are chosen on
val, figures reported on test.

z = g(F(x)) the per-pixel features (`pixel_features`), p the softmax at input resolution. No pixel
is ignored: no labels are used. The pseudo-labels y_hat are SHOT's, recomputed at the start of every
epoch with the model in eval mode, from pixel features:

  1. a random sample of at most `pixels_per_image` (default 128) feature pixels per target image
     with their softmax (at feature resolution) fits the centroids, c_k = sum_i w_ik f_i / sum_i w_ik
     on [f, 1] / ||[f, 1]||, soft weights then one hard round (workbench.adapt.cluster.shot_centroids):
     memory is O(images x pixels_per_image), not O(pixels);
  2. EVERY feature pixel is then labelled by its most cosine-similar centroid (assign_to_centroids;
     faiss when importable), at feature resolution, and the label map is upsampled with nearest
     neighbour to the logits' (input) resolution for the CE term. Only the uint8 label maps are
     kept, one per image.

`pseudo_labels="balanced"` replaces the centroids with URMA's class-balanced confidence pseudo-labels
(Teja & Fleuret, CVPR 2021): in round r (epoch r), class k keeps the pixels predicted as k whose
confidence lies in the top fraction f_r = min(0.2 + 0.05 r, 0.5) of the sampled pixels predicted as k:
with t_k that confidence, y_hat = argmax_k p_k / t_k, and pixels whose best ratio is below 1 are
ignored by the CE term. On pixels, where background dominates, SHOT's centroids label worse than the
classifier itself (33.1 against 45.9 mIoU on the built-in scenes, docs/RESULTS.md); the balanced
rule keeps the classifier's own labels, only the confident ones, and an equal share of every class.

Target images are read without geometric augmentation (the evaluation transform), so a pseudo-label
map stays aligned with its image by index across the epoch.

Optimiser and schedule are SHOT's own (default `schedule="shot"`): SGD momentum 0.9, Nesterov,
weight decay 1e-3, lr = lr0 (1 + 10 p)^-0.75, lr0 0.01, F at 0.1x lr as SHOT's image setting, beta 0.3
(SHOT's image value), 15 epochs (SHOT's image value). The loss weights were tuned by SHOT under this
schedule, and it keeps a non-zero lr (lr0/6) to the last epoch, where poly would stop the pseudo-label
rounds of the last epochs from having any effect. `schedule="poly"` gives the segmentation source
schedule (lr0 (1-p)^0.9, weight decay 5e-4) instead.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from workbench.adapt.cluster import assign_to_centroids, shot_centroids
from workbench.adapt.information import DIVERSITY_PRIORS, information_maximization
from workbench.adapt.loop import ShotLoop
from workbench.adapt.training import make_loader, set_group_lr
from workbench.checkpoint import save_checkpoint
from workbench.logging import RunLogger, default_run_name, write_json
from workbench.runtime import RunSettings, Runtime, seed_everything

from ..dense.model import load_dense_model
from .data import builtin_scenes_test_split, builtin_scenes_val_split
from .evaluate import TASK, eval_batch_size, eval_loader, load_dense_target, public_scores, segmentation_pass
from .metrics import IGNORE_INDEX, ConfusionAccumulator, colorize
from .source import poly_lr, segmentation_optimizer

METHODS = ("shot-im", "shot")
DEFAULT_METHOD = "shot"
ADAPTED_KIND = "adapted-model"
CHECKPOINT = "adapted.pt"
PIXELS_PER_IMAGE = 128     # feature pixels per image that fit the centroids (all of them on 8 x 8 maps)
PANEL_IMAGES = 4           # fixed target images drawn as input | truth | prediction each epoch
SCHEDULES = ("shot", "poly")
PSEUDO_LABELS = ("centroid", "balanced")
# URMA's class-balanced selection: the top fraction of each class's pixels, growing every round to a cap
BALANCED_FRACTION, BALANCED_STEP, BALANCED_MAX_FRACTION = 0.2, 0.05, 0.5


@dataclass
class DenseAdaptConfig(RunSettings):
    source: str = ""
    target: str = ""
    method: str = DEFAULT_METHOD
    epochs: int = 15                  # SHOT, images (object/image_target.py --max_epoch 15)
    batch_size: int = 16              # 16 scenes of 64 x 64 = 65k pixels per IM batch
    lr: float = 1e-2
    schedule: str = "shot"            # see the module doc
    weight_decay: float | None = None  # None: 1e-3 (shot) / 5e-4 (poly)
    beta: float = 0.3                 # --cls_par for images; forced to 0 for shot-im
    im_weight: float = 1.0
    diversity_prior: str = "initial"  # initial (the source prior) | uniform (SHOT's); see the module doc
    diversity_weight: float = 1.0     # SHOT's; URMA uses 0
    backbone_lr_mult: float = 0.1     # SHOT images: F at 0.1x
    pseudo_labels: str = "centroid"   # centroid (SHOT's) | balanced (URMA's class-balanced confidence labels)
    pixels_per_image: int = PIXELS_PER_IMAGE
    panel_images: int = PANEL_IMAGES
    cluster_backend: str = "auto"
    test_on: str | None = None        # held-out target data reported; default: the built-in scenes' test split
    val_on: str | None = None         # held-out target data settings are chosen on; default: the scenes' val split
    save_predictions: bool = True
    precision: str = "fp32"                # fp32 | bf16 | auto (bf16 autocast where the hardware computes it)

    def __post_init__(self):
        if self.method not in METHODS:
            raise ValueError(f"method {self.method!r} is not available for segmentation: choose one of "
                             f"{', '.join(METHODS)}")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"unknown schedule {self.schedule!r}: choose one of {', '.join(SCHEDULES)}")
        if self.diversity_prior not in DIVERSITY_PRIORS:
            raise ValueError(f"unknown diversity prior {self.diversity_prior!r}: choose one of "
                             f"{', '.join(DIVERSITY_PRIORS)}")
        if self.pseudo_labels not in PSEUDO_LABELS:
            raise ValueError(f"unknown pseudo-labels {self.pseudo_labels!r}: choose one of {', '.join(PSEUDO_LABELS)}")
        if self.pixels_per_image < 1:
            raise ValueError(f"pixels_per_image must be positive, got {self.pixels_per_image}")
        if self.method == "shot-im":
            self.beta = 0.0
        if self.weight_decay is None:
            self.weight_decay = 1e-3 if self.schedule == "shot" else 5e-4


def method_name(method: str, diversity_prior: str, pseudo_labels: str, diversity_weight: float = 1.0) -> str:
    """The name of what a configuration runs, for tables and logs (`method` is only the loss selector).

    SHOT-IM is IM with SHOT's uniform diversity prior; with the source model's prior the same loss is
    "im (source prior)", and without a diversity term it is entropy minimisation ("entropy"). SHOT is
    SHOT-IM plus centroid pseudo-labels; any other IM term or pseudo-label rule is named by its parts,
    e.g. "im (source prior) + balanced labels"."""
    if diversity_weight == 0:
        im = "entropy"
    elif diversity_prior == "uniform":
        im = "shot-im"
    else:
        im = "im (source prior)"
    if method == "shot-im":
        return im
    if im == "shot-im" and pseudo_labels == "centroid":
        return "shot"
    return f"{im} + {pseudo_labels} labels"


def config_method_name(cfg: "DenseAdaptConfig") -> str:
    return method_name(cfg.method, cfg.diversity_prior, cfg.pseudo_labels, cfg.diversity_weight)


def pixel_information_maximization(logits: torch.Tensor, prior: torch.Tensor | None = None,
                                   diversity_weight: float = 1.0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """IM over every pixel of a (N, K, H, W) batch, each pixel a sample: mean_{n,u} H(p_nu) - H(p_bar),
    p_bar = mean_{n,u} p_nu, or with a class `prior` pi: mean_{n,u} H(p_nu) + KL(p_bar || pi). The
    diversity term is scaled by `diversity_weight`. Returns (loss, mean pixel entropy, entropy of p_bar)."""
    return information_maximization(logits.movedim(1, -1).flatten(0, -2), prior, diversity_weight)


def sample_pixels(z: torch.Tensor, probs: torch.Tensor, count: int, generator: torch.Generator):
    """At most `count` random pixels of each image: features (sum_n m, D) and softmax (sum_n m, K)."""
    n, d, h, w = z.shape
    m = min(count, h * w)
    idx = torch.stack([torch.randperm(h * w, generator=generator)[:m] for _ in range(n)]).to(z.device)
    feats = z.flatten(2).gather(2, idx[:, None, :].expand(n, d, m))          # (N, D, m)
    p = probs.flatten(2).gather(2, idx[:, None, :].expand(n, probs.shape[1], m))
    return feats.permute(0, 2, 1).reshape(-1, d), p.permute(0, 2, 1).reshape(-1, probs.shape[1])


def label_pixels(z: torch.Tensor, centroids: torch.Tensor, classes: torch.Tensor, backend: str = "auto"):
    """(N, h, w) nearest-centroid labels of every pixel of a (N, D, h, w) feature map."""
    n, d, h, w = z.shape
    flat = z.permute(0, 2, 3, 1).reshape(-1, d)
    return assign_to_centroids(flat, centroids, classes, backend).reshape(n, h, w)


def balanced_fraction(round_: int) -> float:
    """The share of each class's pixels kept in pseudo-label round `round_` (0-based)."""
    return min(BALANCED_FRACTION + BALANCED_STEP * round_, BALANCED_MAX_FRACTION)


def class_thresholds(probs: torch.Tensor, fraction: float) -> torch.Tensor:
    """(K,) per class k: the confidence reached by the top `fraction` of the (M, K) softmax rows predicted
    as k; 1 for a class no row predicts (none of its pixels is labelled unless certain)."""
    conf, pred = probs.max(1)
    thresholds = torch.ones(probs.shape[1], dtype=probs.dtype, device=probs.device)
    for k in pred.unique():
        ranked = conf[pred == k].sort(descending=True).values
        thresholds[k] = ranked[min(int(len(ranked) * fraction), len(ranked) - 1)]
    return thresholds


def balanced_labels(probs: torch.Tensor, thresholds: torch.Tensor) -> torch.Tensor:
    """(N, h, w) labels argmax_k p_k / t_k of a (N, K, h, w) softmax; IGNORE_INDEX where every ratio is
    below 1."""
    ratio, labels = (probs / thresholds[:, None, None]).max(1)
    return labels.masked_fill(ratio < 1, IGNORE_INDEX)


def upsample_labels(labels: torch.Tensor, size) -> torch.Tensor:
    """Nearest-neighbour resize of (N, h, w) label maps to `size`."""
    if tuple(labels.shape[-2:]) == tuple(size):
        return labels.long()
    return F.interpolate(labels[:, None].float(), size=tuple(size), mode="nearest")[:, 0].long()


def pseudo_label_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean CE over the labelled pixels; 0 (with a graph) for a batch where none is labelled."""
    if not (labels != IGNORE_INDEX).any():
        return logits.sum() * 0.0
    return F.cross_entropy(logits, labels, ignore_index=IGNORE_INDEX)


def panel(image: np.ndarray, truth: np.ndarray, pred: np.ndarray) -> np.ndarray:
    """input | ground truth | prediction side by side, (H, 3W + 4, 3) uint8 with white gutters."""
    h = image.shape[0]
    gutter = np.full((h, 2, 3), 255, np.uint8)
    colour = [np.asarray(colorize(m).convert("RGB")) for m in (truth, pred)]
    return np.concatenate([image, gutter, colour[0], gutter, colour[1]], axis=1)


class DenseShotAdapter(ShotLoop):
    """Pixel SHOT-IM and SHOT on a segmentation model: SHOT's loop (workbench.adapt.loop) with the pieces below."""

    def __init__(self, cfg: DenseAdaptConfig):
        seed_everything(cfg.seed)
        self.cfg = cfg
        self.rt = Runtime.create(cfg.device, cfg.precision)
        self.model, self.source_state = load_dense_model(cfg.source, self.rt)
        mcfg = self.source_state["model_config"]
        self.num_classes = mcfg["num_classes"]
        self.target = load_dense_target(cfg.target, mcfg)   # evaluation transform: no geometry, aligned by index
        self.test_on = cfg.test_on or builtin_scenes_test_split(cfg.target)
        self.val_on = cfg.val_on or builtin_scenes_val_split(cfg.target)
        self.cfg = dataclasses.replace(cfg, test_on=self.test_on, val_on=self.val_on)
        self.test_set = load_dense_target(self.test_on, mcfg) if self.test_on else None
        self.val_set = load_dense_target(self.val_on, mcfg) if self.val_on else None
        self.run_dir = Path(cfg.run_dir or Path("runs") / default_run_name("adapt", "seg", cfg.method, f"s{cfg.seed}"))

        for p in self.model.classifier.parameters():  # the source hypothesis stays fixed
            p.requires_grad_(False)
        # images of one size batch, others go one at a time; a last batch of one image is dropped (batch
        # norm), unless the target is that one image
        self.loader = make_loader(self.target, eval_batch_size(self.target, cfg.batch_size),
                                  train=len(self.target) > 1, workers=cfg.workers)
        self.eval_loader = eval_loader(self.target, workers=cfg.workers)
        self.test_loader = eval_loader(self.test_set, workers=cfg.workers) if self.test_set is not None else None
        self.val_loader = eval_loader(self.val_set, workers=cfg.workers) if self.val_set is not None else None
        n = len(self.target)
        self.panel_indices = sorted({int(i) for i in np.linspace(0, n - 1, min(cfg.panel_images, n))}) if n else []

    # ------------------------------------------------------------ passes over the target
    def evaluate(self, sample: bool = False, epoch: int = 0, save_dir=None) -> dict:
        """Scores on the whole target (eval mode) and, with `sample`, the pixel sample that fits the
        centroids: (features, softmax) of at most pixels_per_image feature pixels per image."""
        gen = torch.Generator().manual_seed(self.cfg.seed * 1000 + epoch)
        feats, probs, panels = [], [], {}
        prob_sum = torch.zeros(self.num_classes, dtype=torch.float64)

        def on_batch(images, masks, idx, z, logits):
            prob_sum.add_(logits.float().softmax(1).sum((0, 2, 3)).double().cpu())
            if sample:
                f, p = sample_pixels(z.float(), self.model.classifier(z).float().softmax(1),
                                     self.cfg.pixels_per_image, gen)
                feats.append(f.cpu())
                probs.append(p.cpu())
            for j, i in enumerate(idx.tolist()):
                if i in self.panel_indices:
                    panels[i] = logits[j].argmax(0).cpu().numpy()

        scores = segmentation_pass(self.model, self.eval_loader, self.rt.scoring(), self.num_classes, save_dir=save_dir,
                                   names=self.target.names, on_batch=on_batch)
        scores["panels"] = panels
        scores["mean_prediction"] = (prob_sum / prob_sum.sum().clamp_min(1e-12)).float()  # p_bar over every pixel
        if sample:
            scores["sample"] = (torch.cat(feats), torch.cat(probs))
        return scores

    @torch.no_grad()
    def pseudo_labels(self, sample: tuple[torch.Tensor, torch.Tensor],
                      round_: int = 0) -> tuple[list[torch.Tensor], dict | None]:
        """Fit the centroids (or the class thresholds) on the sample and label every feature pixel of every
        target image; returns the per-image uint8 label maps (feature resolution, IGNORE_INDEX where a
        pixel has no label) and their scores against the truth over the labelled pixels, with the share
        of pixels labelled (`coverage`, percent)."""
        cfg = self.cfg
        if cfg.pseudo_labels == "balanced":
            thresholds = class_thresholds(sample[1].float(), balanced_fraction(round_))

            def label(z):
                return balanced_labels(self.model.classifier(z).float().softmax(1), thresholds.to(z.device))
        else:
            centroids, classes = shot_centroids(*sample, backend=cfg.cluster_backend)

            def label(z):
                return label_pixels(z, centroids.to(z.device), classes.to(z.device), cfg.cluster_backend)
        was_training = self.model.training
        self.model.eval()
        maps: list[torch.Tensor | None] = [None] * len(self.target)
        acc = ConfusionAccumulator(self.num_classes)
        labelled = total = 0
        for images, masks, idx in self.eval_loader:
            with self.rt.autocast():
                z = self.model.pixel_features(self.rt.images(images)).float()
            labels = label(z)
            full = upsample_labels(labels, masks.shape[-2:])
            truth = masks.to(full.device).masked_fill(full == IGNORE_INDEX, IGNORE_INDEX)
            acc.update(full.masked_fill(full == IGNORE_INDEX, 0), truth)
            labelled, total = labelled + int((full != IGNORE_INDEX).sum()), total + full.numel()
            for j, i in enumerate(idx.tolist()):
                maps[i] = labels[j].to(torch.uint8).cpu()
        self.model.train(was_training)
        scores = acc.scores() if labelled else {"miou": float("nan"), "pixel_accuracy": float("nan")}
        return maps, {**scores, "coverage": 100.0 * labelled / max(1, total)}

    def test_scores(self, loader=None) -> dict | None:
        """Scores on the held-out test split (or on `loader`, e.g. the val loader); None without one."""
        loader = self.test_loader if loader is None else loader
        if loader is None:
            return None
        return segmentation_pass(self.model, loader, self.rt.scoring(), self.num_classes)

    def val_scores(self) -> dict | None:
        return self.test_scores(self.val_loader) if self.val_loader is not None else None

    # ------------------------------------------------------------ logging
    def log_evaluation(self, logger: RunLogger, result: dict, epoch: int) -> None:
        logger.scalars("target", {"miou": result["miou"], "pixel_accuracy": result["pixel_accuracy"]}, epoch)
        if result["panels"]:
            rows = []
            for i in self.panel_indices:
                image, truth = self.target.raw(i)
                rows.append(panel(np.asarray(image), np.asarray(truth), result["panels"][i]))
            grid = np.concatenate([np.concatenate([r, np.full((2, r.shape[1], 3), 255, np.uint8)]) for r in rows])
            logger.writer.add_image("target/input_truth_prediction", grid, epoch, dataformats="HWC")

    def log_held_out(self, logger: RunLogger, before: tuple, after: tuple) -> None:
        for split, (start, end) in (("test", (before[0], after[0])), ("val", (before[1], after[1]))):
            if end is not None:
                logger.scalars(split, {"source_only_miou": start["miou"], "miou": end["miou"]}, self.cfg.epochs)

    # ------------------------------------------------------------ SHOT's loop (workbench.adapt.loop)
    def new_history(self) -> dict:
        return {"miou_per_epoch": [], "pseudo_label_miou_per_epoch": []}

    def record(self, history: dict, result: dict) -> None:
        history["miou_per_epoch"].append(result["miou"])

    def param_groups(self, logger: RunLogger, history: dict) -> list[tuple[torch.nn.Module, float]]:
        return [(self.model.backbone, self.cfg.backbone_lr_mult), (self.model.head, 1.0)]  # C inside the head is frozen

    def make_optimizer(self, groups) -> torch.optim.Optimizer:
        if self.cfg.schedule == "shot":
            return super().make_optimizer(groups)
        return segmentation_optimizer(groups, self.cfg.lr, self.cfg.weight_decay)

    def schedule(self, optimizer: torch.optim.Optimizer, step: int, total: int) -> None:
        if self.cfg.schedule == "shot":
            super().schedule(optimizer, step, total)
        else:
            set_group_lr(optimizer, poly_lr(self.cfg.lr, (step - 1) / total))

    def diversity_prior(self, latest: dict) -> torch.Tensor | None:
        """The source model's mean pixel prediction on the target (`initial`), or None (uniform, SHOT's)."""
        return latest["mean_prediction"].to(self.rt.device) if self.cfg.diversity_prior == "initial" else None

    def epoch_labels(self, latest: dict, epoch: int, logger: RunLogger, history: dict) -> list | None:
        """Per-image pixel pseudo-label maps fitted on `latest`'s pixel sample (None for IM alone)."""
        if self.cfg.beta <= 0:
            return None
        maps, scores = self.pseudo_labels(latest["sample"], round_=epoch)
        logger.scalars("pseudo_labels", {"miou": scores["miou"], "coverage": scores["coverage"],
                                         "pixel_accuracy": scores["pixel_accuracy"]}, epoch)
        history["pseudo_label_miou_per_epoch"].append(scores["miou"])
        return maps

    def batch_loss(self, batch, maps: list | None, prior: torch.Tensor | None) -> tuple[torch.Tensor, dict]:
        """L = im_weight * IM(pixels; prior) + beta * CE(pseudo-label maps, upsampled to the logits)."""
        cfg = self.cfg
        images, _, idx = batch
        with self.rt.autocast():
            logits = self.model(self.rt.images(images)).float()
        im, cond_ent, marg_ent = pixel_information_maximization(logits, prior, cfg.diversity_weight)
        terms = {"im": im.detach(), "conditional_entropy": cond_ent.detach(), "marginal_entropy": marg_ent.detach()}
        loss = cfg.im_weight * im
        if maps is not None:
            target = torch.stack([maps[i] for i in idx.tolist()]).to(logits.device)
            terms["pseudo_ce"] = pseudo_label_loss(logits, upsample_labels(target, logits.shape[-2:]))
            loss = loss + cfg.beta * terms["pseudo_ce"]
        terms["total"] = loss.detach()
        return loss, terms

    def evaluate_initial(self) -> dict:
        return self.evaluate(sample=self.cfg.beta > 0, epoch=0)

    def evaluate_epoch(self, epoch: int) -> dict:
        return self.evaluate(sample=self.cfg.beta > 0, epoch=epoch + 1)

    def evaluate_final(self) -> dict:
        return self.evaluate(save_dir=self.run_dir / "predictions" if self.cfg.save_predictions else None)

    def held_out_scores(self) -> tuple[dict | None, dict | None]:
        """(test, val) scores; val is for choosing settings, test is what a table reports."""
        return self.test_scores(), self.val_scores()

    # ------------------------------------------------------------ outputs
    def run_config(self) -> dict:
        return {"task": TASK, **dataclasses.asdict(self.cfg)}

    def description(self) -> str:
        return f"{config_method_name(self.cfg)} (seg)"

    def metrics(self, before: dict, after: dict, held_before: tuple, held_after: tuple, history: dict,
                wall_seconds: float) -> dict:
        cfg = self.cfg
        metrics = {"task": TASK, "method": cfg.method, "method_name": config_method_name(cfg),
                   "source": str(cfg.source), "target": cfg.target,
                   "seed": cfg.seed, "images": len(self.target), "class_names": list(self.target.class_names),
                   **public_scores(before, "source_only_"), **public_scores(after),
                   "test_data": self.test_on, "val_data": self.val_on, "wall_seconds": wall_seconds,
                   "config": dataclasses.asdict(cfg), **history}
        for split, start, end in (("test", held_before[0], held_after[0]), ("val", held_before[1], held_after[1])):
            if end is not None:   # val is for choosing settings; the figures to report are test_*
                metrics.update(public_scores(start, f"source_only_{split}_"))
                metrics.update(public_scores(end, f"{split}_"))
        if cfg.save_predictions:
            metrics["predictions"] = str(self.run_dir / "predictions")
        return metrics

    def save(self, result: dict, metrics: dict) -> None:
        cfg = self.cfg
        save_checkpoint(self.run_dir / CHECKPOINT, ADAPTED_KIND, {
            "task": TASK, "model_config": self.source_state["model_config"], "model": self.model.state_dict(),
            "method": cfg.method, "method_name": metrics["method_name"], "source": str(cfg.source),
            "target": cfg.target})
        write_json(self.run_dir / "metrics.json", metrics)
