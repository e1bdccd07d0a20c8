"""Person detection as a task of the `workbench` commands (workbench.tasks): train-source (a Faster R-CNN
from scratch on the built-in crowds) and evaluate (COCO box AP); one process, no adaptation method yet."""

from __future__ import annotations

from workbench.arguments import given_or, positive_int

METHODS: tuple[str, ...] = ()
DISTRIBUTED = False


def source_defaults():
    from .source import DetectionSourceConfig

    return DetectionSourceConfig()


def add_source_options(options) -> None:
    """`workbench train-source` options of detection alone (workbench.arguments.TaskOptions)."""
    from .model import FRAME_SIZE

    options.add_argument("--frame-size", type=positive_int, default=None, help=f"frames are resized to this many "
                         f"pixels on their shorter side (default {FRAME_SIZE}, the built-in crowds' own)")


def source_config(a):
    from .source import DetectionSourceConfig

    d = DetectionSourceConfig()
    return DetectionSourceConfig(
        data=a.data or d.data, backbone=a.backbone or d.backbone, epochs=given_or(a.epochs, d.epochs),
        batch_size=given_or(a.batch_size, d.batch_size), lr=a.lr, pretrained=a.pretrained, select_on=a.select_on,
        eval_target=a.eval_target, frame_size=given_or(a.frame_size, d.frame_size), seed=a.seed, device=a.device,
        workers=a.workers, run_dir=a.out, progress=not a.no_progress)


def train_source(cfg, dist) -> dict:
    from .source import train_detector

    return train_detector(cfg)


def report_source(metrics: dict) -> None:
    print(f"selected detector: box AP {metrics['ap']:.2f}, AP50 {metrics['ap50']:.2f} on {metrics['selection_data']} "
          f"(iteration {metrics['iteration']}, epoch {metrics['epoch']:.1f}); checkpoint {metrics['checkpoint']}")
    for key, what in (("test", " (in-domain test)"), ("target", "")):
        if key in metrics:
            t = metrics[key]
            print(f"on {t['data']}{what}: box AP {t['ap']:.2f}, AP50 {t['ap50']:.2f}, AP75 {t['ap75']:.2f}")


def evaluate(a) -> dict:
    from .evaluate import evaluate_detector

    return evaluate_detector(a.model, a.data, device=a.device)
