"""SHOT-IM, SHOT and SHOT++ (Liang, Hu, Feng; ICML 2020 / TPAMI): source-free adaptation.

The source classifier C is frozen; the feature extractor F and bottleneck B are trained on
unlabelled target data with

    L = IM + beta * CE(C(B(F(x))), y_hat)          (beta = 0: SHOT-IM)
    IM = mean_i H(p_i) - H(mean_i p_i)

where y_hat are cosine k-means pseudo-labels recomputed at the start of every epoch
(workbench.adapt.cluster). SHOT++ adds rotation self-supervision to the same loop (a linear head
on [B(F(x)); B(F(rot x))], first fitted with F and B frozen, then weighted into L;
adaptation.classification.rotation), and a final labeling-transfer stage trained with MixMatch
(adaptation.classification.mixmatch).

Hyperparameters default to the official code's values for the chosen benchmark (BENCHMARK_DEFAULTS).

Under torchrun (`ShotAdapter(cfg, dist)`), every rank adapts the same model on its share of the target:
gradients are averaged and batch norm synchronised (workbench.adapt.training), each evaluation gathers the
whole target's features and softmax on every rank, so the pseudo-labels (and the SHOT++ split) are the
ones one process would compute for that model, and rank 0 alone writes the run directory. Each rank
batches `batch_size` samples: one step sees batch_size * world_size, recorded as the effective batch.
"""

from __future__ import annotations

import csv
import dataclasses
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from workbench.adapt.cluster import shot_pseudo_labels
from workbench.adapt.information import information_maximization
from workbench.adapt.loop import ShotLoop
from workbench.adapt.training import (accuracy, average_batch_norm_statistics, confusion_matrix,
                       make_loader, per_class_accuracy, predict, synchronise_batch_norm)
from workbench.checkpoint import save_checkpoint
from workbench.distributed import SINGLE, Distributed
from workbench.logging import RunLogger, default_run_name, write_json
from workbench.runtime import RunSettings, Runtime, seed_everything

from workbench.arguments import given_or

from ..common import INPUT_ERRORS
from .data import builtin_test_split, load_target
from .model import load_model
from .open_set import (PARTIAL_CLASSES, PDA_MIN_COUNT, SETTINGS, open_set_predictions, open_set_scores,
                       unknown_by_entropy)
from .rotation import KEEP_CHOICES, RotationHead, pretrain_rotation_head, rotation_loss

METHODS = ("shot-im", "shot", "shot++", "nrc", "aad")
NEIGHBOURHOOD_METHODS = ("nrc", "aad")   # adaptation.classification.neighbourhood
ADAPTED_KIND = "adapted-model"
CHECKPOINT = "adapted.pt"

# The official settings per benchmark, from tim-learn/SHOT (digit/, object/) and tim-learn/SHOT-plus (code/digit/,
# code/uda/):
#   epochs           SHOT, SHOT-IM adaptation: SHOT digit/uda_digit.py --max_epoch 30; object/image_target.py 15
#   shotpp_epochs    SHOT++ adaptation, and its rotation pre-training (the same max_epoch): SHOT-plus
#                    code/digit/uda_digit.py sets args.max_epoch = 15 before adapting; code/uda/image_target.py 15
#   lr               1e-2; 1e-3 for VisDA-C (image_target.py, image_mixmatch.py: args.lr = 1e-3), in every stage
#   beta             --cls_par: 0.1 digits (run_digit.sh), 0.3 images (run_uda.sh)
#   backbone_lr_mult adaptation: 1 digits (uda_digit.py, one lr for F and B), 0.1 images (image_target.py --lr_decay1)
#   rotation_weight  --ssl: 0.2 digits (run_digit.sh), 0.6 images (run_uda.sh)
#   transfer_epochs  labeling transfer (MixMatch): digit_mixmatch.py --max_epoch 30; run_uda.sh --max_epoch 100
#                    (office), 50 (office-home), 10 (VISDA-C)
#   mix_alpha        digit_mixmatch.py --alpha 0.1; image_mixmatch.py 0.75
BENCHMARKS = ("digits", "office31", "office-home", "visda-c")
_IMAGES = dict(epochs=15, shotpp_epochs=15, lr=1e-2, beta=0.3, backbone_lr_mult=0.1, rotation_weight=0.6,
               mix_alpha=0.75)
BENCHMARK_DEFAULTS = {
    "digits": dict(epochs=30, shotpp_epochs=15, lr=1e-2, beta=0.1, backbone_lr_mult=1.0, rotation_weight=0.2,
                   mix_alpha=0.1, transfer_epochs=30),
    "office31": dict(_IMAGES, transfer_epochs=100),
    "office-home": dict(_IMAGES, transfer_epochs=50),
    "visda-c": dict(_IMAGES, lr=1e-3, transfer_epochs=10),
}
# Without --benchmark: digits data -> digits; image data -> office-home, the official image scripts' default --dset.
DEFAULT_BENCHMARK = {"digits": "digits", "imagenet": "office-home"}
# Labeling transfer batch on every benchmark (digit_mixmatch.py, image_mixmatch.py --batch_size 36); image_mixmatch.py
# lowers it to 24 for ResNet-101 (the VisDA-C network in run_uda.sh).
TRANSFER_BATCH_SIZE = 36
TRANSFER_BATCH_SIZE_BY_BACKBONE = {"resnet101": 24}


@dataclass
class AdaptConfig(RunSettings):
    """None means: the official value for the benchmark (BENCHMARK_DEFAULTS), filled in by `resolved`."""
    source: str = ""
    target: str = ""
    method: str = "shot"
    benchmark: str | None = None     # one of BENCHMARKS; default from the data style (DEFAULT_BENCHMARK)
    epochs: int | None = None
    batch_size: int = 64
    lr: float | None = None
    weight_decay: float = 1e-3
    beta: float | None = None
    im_weight: float = 1.0
    backbone_lr_mult: float | None = None
    # SHOT++ rotation: the head is pre-trained with F, B frozen, then trained with them
    rotation_weight: float | None = None
    rotation_epochs: int | None = None   # default: the adaptation epochs (the official code uses one max_epoch)
    # "last": what the official code ends with (its `best_netR = netR.state_dict()` is a live reference that
    # is never copied, so it follows the weights to the end); "best": the head with the best rotation accuracy
    rotation_keep: str = "last"
    # SHOT++ labeling transfer (MixMatch, adaptation.classification.mixmatch)
    transfer_epochs: int | None = None
    transfer_batch_size: int | None = None
    transfer_backbone_lr_mult: float = 0.1   # every benchmark (image_mixmatch.py, digit_mixmatch.py: args.lr * 0.1)
    # "fresh": MixMatch trains a newly initialised C, as the official code does (it loads only F and B);
    # "adapted" starts from the adapted C instead (this workbench's earlier behaviour, for comparison)
    transfer_classifier: str = "fresh"
    mix_alpha: float | None = None
    mix_temperature: float = 0.5             # --T
    unlabelled_weight: float = 100.0         # --lambda_u, ramped up linearly over the whole stage
    cluster_backend: str = "auto"    # SHOT's clustering, and the neighbour search of NRC and AaD
    test_on: str | None = None       # held-out target data scored before and after; default: built-in test split
    # partial- and open-set adaptation (adaptation.classification.open_set)
    setting: str = "closed"
    target_classes: tuple[int, ...] | None = None   # partial: the target's classes (built-in digits: PARTIAL_CLASSES)
    pseudo_label_min_count: int | None = None       # a class is a pseudo-label candidate above it (partial: 10)
    diversity: bool | None = None                   # IM's diversity term (off for partial-set, as the official code)
    # NRC and AaD (adaptation.classification.nrc, .aad): their official values per benchmark when None
    neighbours: int | None = None            # K
    expanded_neighbours: int | None = None   # KK (NRC)
    late_neighbours: int | None = None       # K once more than half the steps are taken (Office-Home scripts)
    late_expanded_neighbours: int | None = None   # KK likewise (NRC)
    reciprocal_affinity: bool = False        # NRC: the paper's reciprocal weights (the official code's are all 0.1)
    dispersion_weight: float | None = None   # alpha (AaD)
    dispersion_decay: float | None = None    # beta (AaD): lambda = alpha (1 + 10 t/T)^-beta; 0 keeps it constant
    constant_lr: bool | None = None          # the office scripts of NRC and AaD keep lr constant

    def __post_init__(self):
        if self.method not in METHODS:
            raise ValueError(f"unknown method {self.method!r}: choose one of {', '.join(METHODS)}")
        if self.benchmark is not None and self.benchmark not in BENCHMARKS:
            raise ValueError(f"unknown benchmark {self.benchmark!r}: choose one of {', '.join(BENCHMARKS)}")
        if self.rotation_keep not in KEEP_CHOICES:
            raise ValueError(f"unknown rotation_keep {self.rotation_keep!r}: choose one of {', '.join(KEEP_CHOICES)}")
        if self.transfer_classifier not in ("fresh", "adapted"):
            raise ValueError(f"unknown transfer_classifier {self.transfer_classifier!r}: choose fresh or adapted")
        if self.setting not in SETTINGS:
            raise ValueError(f"unknown setting {self.setting!r}: choose one of {', '.join(SETTINGS)}")
        if self.setting != "closed" and self.method not in ("shot-im", "shot"):
            raise ValueError(f"--setting {self.setting} runs SHOT's rules (--method shot or shot-im), not {self.method}")
        if self.target_classes is not None and self.setting != "partial":
            raise ValueError("--target-classes names a partial-set target's classes: pass --setting partial")
        if self.setting == "partial" and self.target_classes is None:
            if not self.target.startswith("builtin:digits"):
                raise ValueError("--setting partial needs --target-classes (the labels the target holds) for "
                                 "data other than the built-in digits")
            self.target_classes = PARTIAL_CLASSES

    def resolved(self, style: str, backbone: str = "") -> "AdaptConfig":
        """Fill unset hyperparameters with the official values for the benchmark (by default the one of
        this data style) and method; `backbone` picks the labeling-transfer batch."""
        benchmark = self.benchmark or DEFAULT_BENCHMARK[style]
        table = dict(BENCHMARK_DEFAULTS[benchmark])
        shotpp_epochs = table.pop("shotpp_epochs")
        if self.method == "shot++":
            table["epochs"] = shotpp_epochs
        table["transfer_batch_size"] = TRANSFER_BATCH_SIZE_BY_BACKBONE.get(backbone, TRANSFER_BATCH_SIZE)
        values = {k: (v if getattr(self, k) is None else getattr(self, k)) for k, v in table.items()}
        if self.method == "shot-im":
            values["beta"] = 0.0
        values["rotation_epochs"] = values["epochs"] if self.rotation_epochs is None else self.rotation_epochs
        if self.method in NEIGHBOURHOOD_METHODS:
            values.update(self._neighbourhood_settings(benchmark))
        values["pseudo_label_min_count"] = given_or(self.pseudo_label_min_count,
                                                    PDA_MIN_COUNT if self.setting == "partial" else 0)
        values["diversity"] = given_or(self.diversity, self.setting != "partial")
        return dataclasses.replace(self, benchmark=benchmark, **values)

    def _neighbourhood_settings(self, benchmark: str) -> dict:
        """NRC's or AaD's official values for the benchmark where not given; no pseudo-labels."""
        from .aad import AAD_DEFAULTS
        from .aad import BACKBONE_LR_MULT as AAD_MULT
        from .nrc import BACKBONE_LR_MULT as NRC_MULT
        from .nrc import NRC_DEFAULTS

        table, mult = (NRC_DEFAULTS, NRC_MULT) if self.method == "nrc" else (AAD_DEFAULTS, AAD_MULT)
        values = {**table[benchmark], "backbone_lr_mult": mult}
        return {**{k: (v if getattr(self, k) is None else getattr(self, k)) for k, v in values.items()},
                "beta": 0.0}


class ShotAdapter(ShotLoop):
    """SHOT-IM, SHOT and SHOT++ on a classifier: SHOT's loop (workbench.adapt.loop) with the pieces above."""

    def __init__(self, cfg: AdaptConfig, dist: Distributed = SINGLE):
        if cfg.method in NEIGHBOURHOOD_METHODS and type(self) is ShotAdapter:   # it would run SHOT's loss instead
            raise ValueError(f"--method {cfg.method} runs on NeighbourhoodAdapter, not ShotAdapter: build adapters "
                             f"with adaptation.classification.neighbourhood.create_adapter")
        if cfg.setting == "open" and dist.enabled:
            raise ValueError("--setting open runs in one process (a batch without known samples is skipped on "
                             "one rank only): run it without torchrun")
        seed_everything(dist.seed(cfg.seed))  # data order and dropout differ per rank; the model does not
        self.rt = Runtime.create(cfg.device, "fp32", distributed=dist)
        self.dist = dist
        # rank 0 reads the inputs first (building any data cache, which the others then read); a problem with
        # them stops every rank with the same message before the first step
        model, self.source_state, self.eval_set, self.train_set, test_set = dist.main_first(
            lambda: self._load_inputs(cfg), INPUT_ERRORS)
        self.model = synchronise_batch_norm(model, self.rt)
        mcfg = self.source_state["model_config"]
        self.cfg = cfg.resolved(mcfg["transform"], mcfg["backbone"])
        # adaptation is transductive on `target`; a held-out split is scored as well, as the official digits code does
        self.test_on = cfg.test_on or builtin_test_split(cfg.target)
        self.num_classes = mcfg["num_classes"]
        self.labels_known = bool((self.eval_set.labels >= 0).all())
        run_dir = cfg.run_dir or str(Path("runs") / default_run_name("adapt", cfg.method, f"s{cfg.seed}"))
        self.run_dir = Path(dist.gather_objects(run_dir)[0])  # rank 0's name (time stamps may differ)

        for p in self.model.classifier.parameters():  # the source hypothesis stays fixed
            p.requires_grad_(False)
        self.rotation_head = None
        if self.cfg.method == "shot++":
            self.rotation_head = RotationHead(self.model.classifier.fc.in_features).to(self.rt.device)
            dist.broadcast_module(self.rotation_head)  # a fresh head: every rank starts from rank 0's
        self.loader = make_loader(self.train_set, self.cfg.batch_size, train=True, workers=cfg.workers, dist=dist,
                                  seed=cfg.seed)
        self.eval_loader = make_loader(self.eval_set, 256, train=False, workers=cfg.workers, dist=dist)
        self.cfg = dataclasses.replace(self.cfg, test_on=self.test_on)  # config.json names the data scored
        self.test_loader = (make_loader(test_set, 256, train=False, workers=cfg.workers, dist=dist)
                            if test_set is not None else None)

    def _load_inputs(self, cfg: AdaptConfig) -> tuple:
        """The source model, the target (for evaluation and for training) and the held-out test data."""
        model, source_state = load_model(cfg.source, self.rt)
        mcfg = source_state["model_config"]
        setting = {"setting": cfg.setting, "target_classes": cfg.target_classes}
        eval_set = load_target(cfg.target, mcfg, train=False, **setting)
        # digits use the same (deterministic) transform for training: share the prepared data set
        train_set = eval_set if mcfg["transform"] == "digits" else load_target(cfg.target, mcfg, train=True, **setting)
        test_on = cfg.test_on or builtin_test_split(cfg.target)
        return model, source_state, eval_set, train_set, load_target(test_on, mcfg, **setting) if test_on else None

    def run_config(self) -> dict:
        """The resolved settings as config.json records them, with the number of processes and the batch one
        optimiser step sees over all of them."""
        world = self.dist.world_size
        return {**dataclasses.asdict(self.cfg),
                "distributed": {"world_size": world, "effective_batch_size": self.cfg.batch_size * world,
                                "effective_transfer_batch_size": (self.cfg.transfer_batch_size * world
                                                                  if self.cfg.method == "shot++" else None)}}

    # ------------------------------------------------------------ evaluation
    def evaluate(self) -> dict:
        """Predictions over the whole target (gathered from every rank under torchrun)."""
        average_batch_norm_statistics(self.model, self.dist)  # CPU ranks: one model to evaluate
        out = predict(self.model, self.eval_loader, self.rt)
        conf, pred = out["probs"].max(1)
        result = {"pred": pred, "confidence": conf, "features": out["features"], "probs": out["probs"],
                  "class_spread": torch.bincount(pred, minlength=self.num_classes).tolist()}
        if self.labels_known:
            result.update(self.scores(out["probs"], out["labels"]))
        return result

    def scores(self, probs: torch.Tensor, labels: torch.Tensor) -> dict:
        """Accuracy of the argmax (closed and partial set), or the open-set scores with the high-entropy
        cluster called unknown (accuracy: OS, the SHOT paper's ODA figure; open_set: OS*, OS, UNK, H-score)."""
        pred, classes = probs.argmax(1), self.num_classes
        if self.cfg.setting == "open":
            pred, classes = open_set_predictions(probs, classes), classes + 1
        result = {"accuracy": accuracy(pred, labels), "per_class_accuracy": per_class_accuracy(pred, labels, classes),
                  "confusion": confusion_matrix(pred, labels, classes)}
        if self.cfg.setting == "open":
            result["open_set"] = open_set_scores(probs, labels, self.num_classes, pred)
            result["accuracy"] = result["open_set"]["os"]
        return result

    def test_scores(self) -> dict | None:
        """Scores on the held-out target split (None without one): `accuracy`, and `open_set` in that setting."""
        if self.test_loader is None:
            return None
        average_batch_norm_statistics(self.model, self.dist)
        out = predict(self.model, self.test_loader, self.rt)
        return {k: v for k, v in self.scores(out["probs"], out["labels"]).items() if k in ("accuracy", "open_set")}

    def log_evaluation(self, logger: RunLogger, result: dict, epoch: int) -> None:
        if not self.dist.is_main:  # the other ranks log nothing (their logger is a NullLogger)
            return
        spread = np.array(result["class_spread"], dtype=np.float64)
        share = spread / spread.sum()
        logger.scalars("target", {"accuracy": result.get("accuracy"),
                                  "predicted_classes": int((spread > 0).sum()),
                                  "prediction_entropy": float(-(share[share > 0] * np.log(share[share > 0])).sum())},
                       epoch)
        logger.writer.add_histogram("target/predicted_class", result["pred"], epoch, bins=self.num_classes)
        if "confusion" in result:
            logger.writer.add_image("target/confusion_matrix", confusion_image(result["confusion"]), epoch,
                                    dataformats="HWC")

    def log_held_out(self, logger: RunLogger, before: dict | None, after: dict | None) -> None:
        if after is not None:
            logger.scalars("test", {"source_only_accuracy": before["accuracy"], "accuracy": after["accuracy"]},
                           self.cfg.epochs)

    # ------------------------------------------------------------ SHOT's loop (workbench.adapt.loop)
    def new_history(self) -> dict:
        return {"accuracy_per_epoch": []}

    def record(self, history: dict, result: dict) -> None:
        history["accuracy_per_epoch"].append(result.get("accuracy"))

    def param_groups(self, logger: RunLogger, history: dict) -> list[tuple[torch.nn.Module, float]]:
        """F and B train (C stays the source hypothesis); SHOT++ first fits its rotation head alone, with F and
        B frozen, then trains it with them."""
        cfg, model = self.cfg, self.model
        groups = [(model.backbone, cfg.backbone_lr_mult), (model.bottleneck, 1.0)]
        if self.rotation_head is not None:
            history["rotation_pretrain"] = pretrain_rotation_head(
                model, self.rotation_head, self.loader, self.rt, cfg.rotation_epochs, cfg.lr, cfg.weight_decay,
                logger, keep=cfg.rotation_keep)
            groups.append((self.rotation_head, 1.0))
        return groups

    def epoch_labels(self, latest: dict, epoch: int, logger: RunLogger, history: dict) -> torch.Tensor | None:
        """SHOT's centroid pseudo-labels of the whole target, clustered where the model runs (on a GPU, faiss's
        GPU index or torch there); None for SHOT-IM. The model is unchanged since `latest` was evaluated (F and
        B were frozen while the rotation head was fitted). Open set: the high-entropy samples are labelled
        unknown (index = the class count) and the centroids fitted on the others (adaptation.classification.
        open_set)."""
        if self.cfg.beta <= 0 and self.cfg.setting != "open":   # open-set SHOT-IM still splits off the unknown
            return None
        features, probs = latest["features"].to(self.rt.device), latest["probs"].to(self.rt.device)
        known = torch.ones(len(probs), dtype=torch.bool, device=probs.device)
        if self.cfg.setting == "open":
            known = ~unknown_by_entropy(probs).to(probs.device)
            logger.scalars("pseudo_labels", {"known_fraction": float(known.float().mean())}, epoch)
        pseudo = torch.full((len(probs),), self.num_classes, dtype=torch.long, device=probs.device)
        pseudo[known] = shot_pseudo_labels(features[known], probs[known], backend=self.cfg.cluster_backend,
                                           min_count=self.cfg.pseudo_label_min_count)
        if self.labels_known:
            logger.scalars("pseudo_labels", {"accuracy": accuracy(pseudo.cpu(), torch.as_tensor(
                self.eval_set.labels))}, epoch)
        return pseudo

    def batch_loss(self, batch, pseudo: torch.Tensor | None, prior=None) -> tuple[torch.Tensor, dict] | None:
        """L = im_weight * IM + beta * CE(pseudo-labels) (+ rotation_weight * the rotation loss for SHOT++). IM
        is H(p_i) - H(p_bar), without -H(p_bar) for partial-set targets. Open set: CE and H(p_i) over the
        samples pseudo-labelled known, H(p_bar) over the batch; a batch without known samples is skipped."""
        images, _, idx = batch
        cfg, images = self.cfg, self.rt.images(images)
        logits = self.model(images)
        known = None
        if pseudo is not None:
            labels = pseudo[idx.to(self.rt.device)]
            if cfg.setting == "open":
                known = labels < self.num_classes
                if not known.any():
                    return None
        _, cond_ent, marg_ent = information_maximization(logits if known is None else logits[known])
        if known is not None:
            marg_ent = information_maximization(logits)[2]
        im = cond_ent - marg_ent if cfg.diversity else cond_ent
        terms = {"im": im.detach(), "conditional_entropy": cond_ent.detach(), "marginal_entropy": marg_ent.detach()}
        loss = cfg.im_weight * im
        if pseudo is not None and cfg.beta > 0:
            ce_logits, ce_labels = (logits, labels) if known is None else (logits[known], labels[known])
            terms["pseudo_ce"] = F.cross_entropy(ce_logits, ce_labels)
            loss = loss + cfg.beta * terms["pseudo_ce"]
        if self.rotation_head is not None:
            terms["rotation"] = rotation_loss(self.model, self.rotation_head, images)
            loss = loss + cfg.rotation_weight * terms["rotation"]
        return loss, terms

    def evaluate_initial(self) -> dict:
        return self.evaluate()

    def evaluate_epoch(self, epoch: int) -> dict:
        return self.evaluate()

    def evaluate_final(self) -> dict:
        return self.evaluate()

    def held_out_scores(self) -> dict | None:
        return self.test_scores()

    def after_adapting(self, logger: RunLogger) -> dict:
        if self.cfg.method != "shot++":
            return {}
        from .mixmatch import labeling_transfer

        return {"transfer": labeling_transfer(self, logger)}

    # ------------------------------------------------------------ outputs
    def description(self) -> str:
        return self.cfg.method

    def metrics(self, before: dict, after: dict, test_before: dict | None, test_after: dict | None,
                history: dict, wall_seconds: float) -> dict:
        cfg = self.cfg
        metrics = {"method": cfg.method, "source": str(cfg.source), "target": cfg.target, "seed": cfg.seed,
                   "samples": len(self.eval_set), "source_only_accuracy": before.get("accuracy"),
                   "accuracy": after.get("accuracy"), "test_data": self.test_on,
                   "source_only_test_accuracy": test_before and test_before["accuracy"],
                   "test_accuracy": test_after and test_after["accuracy"],
                   "per_class_accuracy": after.get("per_class_accuracy"),
                   "class_spread": after["class_spread"], "wall_seconds": wall_seconds,
                   "config": self.run_config(), **history}
        if cfg.setting == "open":   # OS*, OS, UNK, H-score before and after, on the target and the test split
            metrics["open_set"] = {"source_only": before.get("open_set"), "adapted": after.get("open_set"),
                                   "source_only_test": test_before and test_before["open_set"],
                                   "adapted_test": test_after and test_after["open_set"]}
        return metrics

    def save(self, result: dict, metrics: dict) -> None:
        save_checkpoint(self.run_dir / CHECKPOINT, ADAPTED_KIND, {
            "model_config": self.source_state["model_config"], "model": self.model.state_dict(),
            "method": self.cfg.method, "source": str(self.cfg.source), "target": self.cfg.target})
        with open(self.run_dir / "predictions.csv", "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["path", "label", "prediction", "confidence"])
            for path, label, pred, conf in zip(self.eval_set.paths, self.eval_set.labels, result["pred"].tolist(),
                                               result["confidence"].tolist()):
                writer.writerow([path, int(label), pred, f"{conf:.4f}"])
        write_json(self.run_dir / "metrics.json", metrics)


def confusion_image(matrix: np.ndarray, cell: int = 12) -> np.ndarray:
    """Row-normalised confusion matrix as an (H, W, 3) uint8 heat map (rows: true, columns: predicted)."""
    rows = matrix / np.maximum(matrix.sum(1, keepdims=True), 1)
    heat = np.kron(rows, np.ones((cell, cell)))
    img = np.stack([heat, heat * 0.4, 1 - heat], axis=-1)
    return (img * 255).astype(np.uint8)
