"""Pose as a task of the `workbench` commands (workbench.tasks): train-source, adapt (the mean teacher) and
evaluate (PCK and OKS AP); one process."""

from __future__ import annotations

from workbench.arguments import WORKERS_HELP, fraction, given_or, non_negative_int, positive_int, unit_interval
from workbench.runtime import PRECISION_CHOICES, PRECISION_HELP

from .mean_teacher import METHODS  # noqa: F401  (the registry reads it)

DISTRIBUTED = False


BUILTIN = "figures"  # its built-in domains: builtin:figures/<domain> (`workbench datasets`)


def builtin_domains() -> tuple[str, ...]:
    from . import figures

    return figures.DOMAINS


def builtin_path(domain: str):
    from . import figures

    return figures.domain_dir(domain)


def build_builtin(domain: str, force: bool = False) -> str:
    """Build (or find cached) one built-in domain; the line that reports it."""
    import json

    from . import figures

    path = figures.build_domain(domain, force=force)
    counts = [len(json.loads(figures.annotation_file(domain, split).read_text())["images"])
              for split in ("train", "val", "test")]
    return (f"builtin:figures/{domain}: {counts[0]} train / {counts[1]} val / {counts[2]} test "
            f"{figures.IMAGE_SIZE}x{figures.IMAGE_SIZE} images, {len(figures.JOINTS)} joints (COCO keypoint JSON) "
            f"-> {path}")


def source_defaults():
    from .source import PoseSourceConfig

    return PoseSourceConfig()


def add_source_options(options) -> None:
    """`workbench train-source` options of pose alone (workbench.arguments.TaskOptions)."""
    from workbench.heads import list_heads

    from .source import PoseSourceConfig

    ps = PoseSourceConfig()
    options.add_argument("--head", default=None, help=f"{', '.join(list_heads('pose'))} (default {ps.head})")
    options.add_argument("--head-channels", type=positive_int, default=None, help="head width (default: the "
                         "head's published 256 for deconv)")
    options.add_argument("--precision", default=None, choices=PRECISION_CHOICES, help=PRECISION_HELP)


def source_config(a):
    from .source import PoseSourceConfig

    ps = PoseSourceConfig()
    return PoseSourceConfig(
        data=a.data or ps.data, backbone=a.backbone or ps.backbone, head=a.head or ps.head,
        head_channels=a.head_channels, epochs=given_or(a.epochs, ps.epochs),
        batch_size=given_or(a.batch_size, ps.batch_size), lr=given_or(a.lr, ps.lr), pretrained=a.pretrained,
        select_on=a.select_on, eval_target=a.eval_target, precision=a.precision or ps.precision, seed=a.seed,
        device=a.device, workers=a.workers, run_dir=a.out, progress=not a.no_progress)


def train_source(cfg, dist) -> dict:
    from .source import train_pose_source

    return train_pose_source(cfg)


def report_source(metrics: dict) -> None:
    print(f"selected model: AP {metrics['ap']:.2f}, PCK@0.1 {metrics['pck@0.1']:.2f} on {metrics['selection_data']} "
          f"(iteration {metrics['iteration']}, epoch {metrics['epoch']:.1f}); checkpoint {metrics['checkpoint']}")
    for key, what in (("test", " (in-domain test)"), ("target", "")):
        if key in metrics:
            t = metrics[key]
            print(f"on {t['data']}{what}: AP {t['ap']:.2f}, PCK@0.05 {t['pck@0.05']:.2f}, PCK@0.1 {t['pck@0.1']:.2f}")


def adapt_defaults():
    from .mean_teacher import PoseAdaptConfig

    return PoseAdaptConfig()


def add_adapt_options(options) -> None:
    """`workbench adapt` options of pose alone (workbench.arguments.TaskOptions)."""
    pd = adapt_defaults()
    options.add_argument("--ema-alpha", type=unit_interval, default=pd.ema_alpha, help="the mean teacher's EMA decay")
    options.add_argument("--mask-ratio", type=fraction, default=pd.mask_ratio, help="fraction of joints (lowest "
                         "teacher maxima in the batch) left out of the consistency loss")
    options.add_argument("--no-flip-test", action="store_true", help="score without flip testing")
    options.add_argument("--test-on", default=None, help="held-out target data scored before and after "
                         "adapting (default: the test split of built-in figures)")
    options.add_argument("--precision", default=None, choices=PRECISION_CHOICES, help=PRECISION_HELP)
    options.add_argument("--workers", type=non_negative_int, default=0, help=WORKERS_HELP)


def adapt_config(a):
    pd = adapt_defaults()
    from .mean_teacher import PoseAdaptConfig

    return PoseAdaptConfig(
        source=a.source, target=a.target, method=a.method or pd.method, epochs=given_or(a.epochs, pd.epochs),
        batch_size=given_or(a.batch_size, pd.batch_size), lr=given_or(a.lr, pd.lr), ema_alpha=a.ema_alpha,
        mask_ratio=a.mask_ratio, flip_test=not a.no_flip_test, test_on=a.test_on,
        precision=a.precision or pd.precision, seed=a.seed,
        device=a.device, workers=a.workers, run_dir=a.out, progress=not a.no_progress)


def run_adapt(cfg, dist) -> dict:
    from .mean_teacher import PoseMeanTeacher

    adapter = PoseMeanTeacher(cfg)
    return {**adapter.run(), "run_dir": str(adapter.run_dir)}


def report_adapt(cfg, m: dict) -> None:
    print(f"{cfg.method} (pose): target AP {m['source_only_ap']:.2f} -> {m['ap']:.2f}, PCK@0.1 "
          f"{m['source_only_pck@0.1']:.2f} -> {m['pck@0.1']:.2f}")
    if m.get("test_ap") is not None:
        print(f"{cfg.method} (pose): held-out {m['test_data']} AP {m['source_only_test_ap']:.2f} -> {m['test_ap']:.2f}, "
              f"PCK@0.1 {m['source_only_test_pck@0.1']:.2f} -> {m['test_pck@0.1']:.2f}")
    print(f"adapted model, keypoints.json and metrics.json in {m['run_dir']}; tensorboard --logdir {m['run_dir']}")


def add_evaluate_options(options) -> None:
    options.add_argument("--save-predictions", default=None, metavar="PATH", help="write the predicted keypoints "
                         "as a COCO result JSON file PATH")
    options.add_argument("--no-flip-test", action="store_true", help="score without flip testing")


def evaluate(a) -> dict:
    from .evaluate import evaluate_pose_model

    return evaluate_pose_model(a.model, a.data, device=a.device, flip_test=not a.no_flip_test,
                               results_json=a.save_predictions)
