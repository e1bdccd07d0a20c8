"""Segmentation as a task of the `workbench` commands (workbench.tasks): train-source, adapt (pixel SHOT-IM
and SHOT) and evaluate (mIoU); one process."""

from __future__ import annotations

from workbench.arguments import WORKERS_HELP, at_least, given_or, non_negative_float, non_negative_int, positive_int
from workbench.runtime import PRECISION_CHOICES, PRECISION_HELP

from .shot import METHODS  # noqa: F401  (the registry reads it)

DISTRIBUTED = False


BUILTIN = "scenes"  # its built-in domains: builtin:scenes/<domain> (`workbench datasets`)


def builtin_domains() -> tuple[str, ...]:
    from . import scenes

    return scenes.DOMAINS


def builtin_path(domain: str):
    from . import scenes

    return scenes.cache_path(domain)


def build_builtin(domain: str, force: bool = False) -> str:
    """Build (or find cached) one built-in domain; the line that reports it."""
    from . import scenes

    path = scenes.build_domain(domain, force=force)
    arrays = scenes.load_domain(domain)
    return (f"builtin:scenes/{domain}: {len(arrays['x_train'])} train / {len(arrays['x_val'])} val / "
            f"{len(arrays['x_test'])} test {scenes.SIZE}x{scenes.SIZE} scenes, {scenes.NUM_CLASSES} classes -> {path}")


def source_defaults():
    from .source import DenseSourceConfig

    return DenseSourceConfig()


def add_source_options(options) -> None:
    """`workbench train-source` options of segmentation alone (workbench.arguments.TaskOptions)."""
    from workbench.heads import list_heads

    from .source import DenseSourceConfig

    ds = DenseSourceConfig()
    options.add_argument("--head", default=None, help=f"{', '.join(list_heads('segmentation'))} (default {ds.head})")
    options.add_argument("--head-channels", type=positive_int, default=None, help="head width (default: the "
                         "head's published 512)")
    options.add_argument("--num-classes", type=at_least(2), default=None, help="default: from the data")
    options.add_argument("--output-stride", type=positive_int, default=None, help="ResNet output stride "
                         "(default 8)")
    options.add_argument("--crop-size", type=positive_int, default=None, help="training crop (default: 64 for "
                         "the scenes, 512 for user data)")
    options.add_argument("--optimizer", default=None, choices=("sgd", "adam"), help="SGD (the papers', default; "
                         "lr 0.01) or Adam (lr 2e-3, for from-scratch models)")
    options.add_argument("--precision", default=None, choices=PRECISION_CHOICES, help=PRECISION_HELP)


def source_config(a):
    from .source import DenseSourceConfig

    ds = DenseSourceConfig()
    return DenseSourceConfig(
        data=a.data or ds.data, backbone=a.backbone or ds.backbone, head=a.head or ds.head,
        head_channels=a.head_channels,
        output_stride=a.output_stride, num_classes=a.num_classes, crop_size=a.crop_size,
        epochs=given_or(a.epochs, ds.epochs), batch_size=given_or(a.batch_size, ds.batch_size),
        optimizer=a.optimizer or ds.optimizer, lr=a.lr, pretrained=a.pretrained, select_on=a.select_on,
        eval_target=a.eval_target, precision=a.precision or ds.precision, seed=a.seed, device=a.device,
        workers=a.workers, run_dir=a.out, progress=not a.no_progress)


def train_source(cfg, dist) -> dict:
    from .source import train_dense_source

    return train_dense_source(cfg)


def report_source(metrics: dict) -> None:
    print(f"selected model: mIoU {metrics['miou']:.2f} on {metrics['selection_data']} "
          f"(iteration {metrics['iteration']}, epoch {metrics['epoch']:.1f}); checkpoint {metrics['checkpoint']}")
    if "test" in metrics:
        print(f"mIoU on {metrics['test']['data']} (in-domain test): {metrics['test']['miou']:.2f}")
    if "target" in metrics:
        print(f"mIoU on {metrics['target']['data']}: {metrics['target']['miou']:.2f}")


def adapt_defaults():
    from .shot import DenseAdaptConfig

    return DenseAdaptConfig()


def add_adapt_options(options) -> None:
    """`workbench adapt` options of segmentation alone (workbench.arguments.TaskOptions)."""
    from workbench.adapt.cluster import CLUSTER_BACKENDS

    from .shot import DIVERSITY_PRIORS, PSEUDO_LABELS

    dd = adapt_defaults()
    options.add_argument("--beta", type=non_negative_float, default=None, help=f"pseudo-label weight (default "
                         f"{dd.beta})")
    options.add_argument("--pixels-per-image", type=positive_int, default=dd.pixels_per_image,
                         help="feature pixels per image sampled to fit the centroids")
    options.add_argument("--schedule", default=dd.schedule, choices=("shot", "poly"),
                         help="lr schedule: SHOT's (1+10p)^-0.75 or poly 0.9")
    options.add_argument("--diversity-prior", default=None, choices=DIVERSITY_PRIORS, help=f"IM diversity towards "
                         f"the source model's initial mean prediction on the target ({dd.diversity_prior}, the "
                         f"default: background dominates pixels) or uniform class proportions (SHOT's); "
                         f"only the uniform prior makes --method shot-im SHOT-IM (and shot SHOT), and runs name what "
                         f"ran (metrics.json method_name, e.g. 'im (source prior)')")
    options.add_argument("--diversity-weight", type=non_negative_float, default=dd.diversity_weight,
                         help="IM diversity weight (SHOT 1; URMA 0, entropy alone)")
    options.add_argument("--pseudo-labels", default=dd.pseudo_labels, choices=PSEUDO_LABELS, help="SHOT's nearest "
                         "centroid (centroid, the default) or URMA's class-balanced confident predictions (balanced)")
    options.add_argument("--cluster-backend", default="auto", choices=CLUSTER_BACKENDS, help="the centroids' "
                         "nearest-neighbour search")
    options.add_argument("--test-on", default=None, help="held-out target data scored before and after "
                         "adapting (default: the test split of built-in scenes)")
    options.add_argument("--no-save-predictions", action="store_true", help="skip the palette PNGs")
    options.add_argument("--precision", default=None, choices=PRECISION_CHOICES, help=PRECISION_HELP)
    options.add_argument("--workers", type=non_negative_int, default=0, help=WORKERS_HELP)


def adapt_config(a):
    dd = adapt_defaults()
    from .shot import DenseAdaptConfig

    return DenseAdaptConfig(
        source=a.source, target=a.target, method=a.method or dd.method, epochs=given_or(a.epochs, dd.epochs),
        batch_size=given_or(a.batch_size, dd.batch_size), lr=given_or(a.lr, dd.lr), schedule=a.schedule,
        beta=given_or(a.beta, dd.beta), pixels_per_image=a.pixels_per_image, cluster_backend=a.cluster_backend,
        diversity_prior=a.diversity_prior or dd.diversity_prior, diversity_weight=a.diversity_weight,
        pseudo_labels=a.pseudo_labels,
        test_on=a.test_on, save_predictions=not a.no_save_predictions, precision=a.precision or dd.precision,
        seed=a.seed, device=a.device,
        workers=a.workers, run_dir=a.out, progress=not a.no_progress)


def run_adapt(cfg, dist) -> dict:
    from .shot import DenseShotAdapter

    adapter = DenseShotAdapter(cfg)
    return {**adapter.run(), "run_dir": str(adapter.run_dir)}


def report_adapt(cfg, metrics: dict) -> None:
    name = metrics.get("method_name", cfg.method)   # what ran: e.g. "im (source prior)" for --method shot-im
    print(f"{name} (segmentation): target mIoU {metrics['source_only_miou']:.2f} (source model) -> "
          f"{metrics['miou']:.2f}")
    if metrics.get("val_miou") is not None:
        print(f"{name} (segmentation): held-out {metrics['val_data']} (for choosing settings) mIoU "
              f"{metrics['source_only_val_miou']:.2f} -> {metrics['val_miou']:.2f}")
    if metrics.get("test_miou") is not None:
        print(f"{name} (segmentation): held-out {metrics['test_data']} mIoU "
              f"{metrics['source_only_test_miou']:.2f} -> {metrics['test_miou']:.2f}")
    print(f"adapted model, predictions/ and metrics.json in {metrics['run_dir']}; "
          f"tensorboard --logdir {metrics['run_dir']}")


def add_evaluate_options(options) -> None:
    options.add_argument("--save-predictions", default=None, metavar="PATH", help="write one palette PNG label "
                         "map per image into the folder PATH")


def evaluate(a) -> dict:
    from .evaluate import evaluate_dense_model

    return evaluate_dense_model(a.model, a.data, device=a.device, save_predictions=a.save_predictions)
