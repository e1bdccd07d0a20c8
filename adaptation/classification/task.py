"""Classification as a task of the `workbench` commands (workbench.tasks): train-source, adapt (SHOT-IM,
SHOT, SHOT++; under torchrun too) and evaluate (accuracy, and accuracy under PGD)."""

from __future__ import annotations

from workbench.arguments import (WORKERS_HELP, at_least, class_list, fraction, given_or, non_negative_float,
                                 non_negative_int, positive_float, positive_int, unit_interval)

from .shot import METHODS  # noqa: F401  (the registry reads it)

DISTRIBUTED = True
RESUMABLE = True  # train-source --resume continues a stopped source run


BUILTIN = "digits"  # its built-in domains: builtin:digits/<domain> (`workbench datasets`)


def builtin_domains() -> tuple[str, ...]:
    from .. import digits

    return digits.DOMAINS


def builtin_path(domain: str):
    from .. import digits

    return digits.cache_path(domain)


def build_builtin(domain: str, force: bool = False) -> str:
    """Build (or find cached) one built-in domain; the line that reports it."""
    from .. import digits

    path = digits.build_domain(domain, force=force)
    n = {s: len(digits.load_domain(domain, s)[1]) for s in ("train", "val", "test")}
    return (f"builtin:digits/{domain}: {n['train']} train / {n['val']} val / {n['test']} test images "
            f"(trainval, the default: train + val) -> {path}")


def source_defaults():
    from .source import SourceConfig

    return SourceConfig()


def add_source_options(options) -> None:
    """`workbench train-source` options of classification alone (workbench.arguments.TaskOptions)."""
    from ..robust.label_noise import NOISE_TYPES
    from ..robust.objectives import OBJECTIVES
    from .source import KEEP_CHOICES, SourceConfig

    d = SourceConfig()
    options.add_argument("--num-classes", type=at_least(2), default=None, help="default: from the data")
    options.add_argument("--init-from", default=None, metavar="CHECKPOINT", help="start the backbone from this "
                         "source or adapted checkpoint (or run directory) of the same backbone, e.g. as the "
                         "pretrained encoder for --objective core-tuning")
    options.add_argument("--transform", choices=("digits", "imagenet"), default=None, help="default: from the data")
    options.add_argument("--keep", default=d.keep, choices=KEEP_CHOICES, help="the model to keep, the best "
                         "selection check (default, the official protocol) or the last (noisy-label studies, where "
                         "a clean selection set would be an oracle early stop)")
    options.add_argument("--objective", default=d.objective, choices=OBJECTIVES,
                         help="ce (SHOT's label-smoothed cross-entropy, the default), sat (self-adaptive training), "
                         "core-tuning (contrastive fine-tuning of a --pretrained or --init-from encoder), at (PGD "
                         "adversarial training), cifs-at (CIFS on a ResNet's last stage + AT)")
    options.add_argument("--label-noise", type=fraction, default=0.0, metavar="RATE", help="corrupt exactly this "
                         "fraction of the training labels (seeded by --seed), for experiments")
    options.add_argument("--noise-type", default=d.noise_type, choices=NOISE_TYPES, help="symmetric (default): "
                         "each corrupted label moves to another class, uniformly; pairflip: to the next class; "
                         "uniform: re-drawn from all classes, the SAT code's corruption (about 9/10 of the rate end "
                         "up wrong with 10 classes)")
    options.add_argument("--resume", action="store_true", help="continue the run in --out from its train-state.pt")
    options.add_argument("--classes", type=class_list, default=None, metavar="LABELS", help="train on the samples "
                         "of these labels only, e.g. 0-4 (an open-set source's known classes; the checkpoint "
                         "records them)")


def source_config(a):
    from .source import SourceConfig

    d = SourceConfig()
    return SourceConfig(
        data=a.data or d.data, backbone=a.backbone or d.backbone, num_classes=a.num_classes,
        epochs=given_or(a.epochs, d.epochs), batch_size=given_or(a.batch_size, d.batch_size),
        lr=given_or(a.lr, d.lr), pretrained=a.pretrained, init_from=a.init_from, transform=a.transform,
        select_on=a.select_on, eval_target=a.eval_target, objective=a.objective, label_noise=a.label_noise,
        noise_type=a.noise_type, keep=a.keep, resume=a.resume, classes=a.classes, seed=a.seed,
        device=a.device, workers=a.workers, run_dir=a.out, progress=not a.no_progress)


def train_source(cfg, dist) -> dict:
    from .source import train_source as train

    return train(cfg, dist)


def report_source(metrics: dict) -> None:
    print(f"selected model: {metrics['selection_accuracy']:.2f}% on {metrics['selection_data']} "
          f"(iteration {metrics['iteration']}, epoch {metrics['epoch']:.1f}); "
          f"checkpoint {metrics['checkpoint']}")
    if "target" in metrics:
        print(f"accuracy on {metrics['target']['data']}: {metrics['target']['accuracy']:.2f}%")


def adapt_defaults():
    from .shot import AdaptConfig

    return AdaptConfig()


def add_adapt_options(options) -> None:
    """`workbench adapt` options of classification alone (workbench.arguments.TaskOptions); left out, they
    take the benchmark's official value."""
    from workbench.adapt.cluster import CLUSTER_BACKENDS

    from .open_set import SETTINGS
    from .rotation import KEEP_CHOICES
    from .shot import BENCHMARKS

    d = adapt_defaults()
    options.add_argument("--benchmark", default=None, choices=BENCHMARKS, help="whose official settings to use "
                         "(default: digits for digits data, office-home for images)")
    options.add_argument("--beta", type=non_negative_float, default=None, help="pseudo-label weight (default 0.1 "
                         "digits, 0.3 images)")
    options.add_argument("--rotation-weight", type=non_negative_float, default=None, help="SHOT++ (default 0.2 "
                         "digits, 0.6 images)")
    options.add_argument("--rotation-epochs", type=positive_int, default=None, help="SHOT++ rotation-head "
                         "pre-training (default: the adaptation epochs)")
    options.add_argument("--rotation-keep", default=d.rotation_keep, choices=KEEP_CHOICES, help="SHOT++ rotation "
                         "head to keep: the last (default, as the official code ends up with) or the one with the "
                         "best rotation accuracy")
    options.add_argument("--transfer-epochs", type=positive_int, default=None, help="SHOT++ labeling transfer "
                         "(default: digits 30, office31 100, office-home 50, visda-c 10)")
    options.add_argument("--transfer-batch-size", type=at_least(2), default=None, help="SHOT++ labeling transfer "
                         "(default 36, 24 with resnet101); per process under torchrun")
    options.add_argument("--transfer-classifier", default=d.transfer_classifier, choices=("fresh", "adapted"),
                         help="classifier MixMatch starts from: a new one (the official code) or the adapted one")
    options.add_argument("--mix-alpha", type=positive_float, default=None, help="MixMatch Beta(alpha, alpha) "
                         "(default 0.1 digits, 0.75 images)")
    options.add_argument("--cluster-backend", default="auto", choices=CLUSTER_BACKENDS, help="SHOT's clustering "
                         "and NRC's and AaD's neighbour search (auto: faiss where installed)")
    options.add_argument("--setting", default="closed", choices=SETTINGS, help="closed (the target holds the "
                         "source's classes), partial (a subset: SHOT's PDA rule, scored over the target's classes) or "
                         "open (classes the source lacks: SHOT's ODA rule, scored by OS*, OS, UNK and H-score)")
    options.add_argument("--target-classes", type=class_list, default=None, metavar="LABELS", help="partial set: "
                         "the target's classes, e.g. 0-4 (default for built-in digits: 0-4)")
    options.add_argument("--neighbours", type=positive_int, default=None, help="NRC, AaD: K nearest neighbours "
                         "in the feature bank (default: the official script's for the benchmark, e.g. 5 VisDA-C, 3 "
                         "Office-Home)")
    options.add_argument("--expanded-neighbours", type=positive_int, default=None, help="NRC: KK neighbours of "
                         "each neighbour (the expanded neighbourhood; default 5 VisDA-C, 2 Office-Home)")
    options.add_argument("--late-neighbours", type=positive_int, default=None, help="NRC, AaD: K once more than "
                         "half the steps are taken (default: the official script's, 5 for NRC and 2 for AaD on "
                         "Office-Home; elsewhere K throughout)")
    options.add_argument("--late-expanded-neighbours", type=positive_int, default=None, help="NRC: KK once more "
                         "than half the steps are taken (default 4 on Office-Home; elsewhere KK throughout)")
    options.add_argument("--reciprocal-affinity", action="store_true", help="NRC: weigh a neighbour by how often "
                         "the sample is among its own neighbours, as the paper describes (the official code's "
                         "weights are all 0.1: see adaptation/classification/nrc.py)")
    options.add_argument("--dispersion-weight", type=non_negative_float, default=None, help="AaD: alpha, the "
                         "dispersion term's weight (default 1)")
    options.add_argument("--dispersion-decay", type=non_negative_float, default=None, help="AaD: beta in "
                         "alpha (1 + 10 t/T)^-beta (default 5 VisDA-C, 0: constant, Office-Home)")
    options.add_argument("--test-on", default=None, help="held-out target data scored before and after adapting "
                         "(default: the test split of built-in digits)")
    options.add_argument("--workers", type=non_negative_int, default=0, help=WORKERS_HELP)


def adapt_config(a):
    """An AdaptConfig; options left out take the benchmark's official value."""
    d = adapt_defaults()
    from .shot import AdaptConfig

    return AdaptConfig(
        source=a.source, target=a.target, method=a.method or d.method, benchmark=a.benchmark, epochs=a.epochs,
        beta=a.beta, batch_size=given_or(a.batch_size, d.batch_size), lr=a.lr, rotation_weight=a.rotation_weight,
        rotation_epochs=a.rotation_epochs, rotation_keep=a.rotation_keep, transfer_epochs=a.transfer_epochs,
        transfer_batch_size=a.transfer_batch_size, transfer_classifier=a.transfer_classifier,
        mix_alpha=a.mix_alpha, cluster_backend=a.cluster_backend, test_on=a.test_on, neighbours=a.neighbours,
        expanded_neighbours=a.expanded_neighbours, late_neighbours=a.late_neighbours,
        late_expanded_neighbours=a.late_expanded_neighbours, reciprocal_affinity=a.reciprocal_affinity,
        dispersion_weight=a.dispersion_weight,
        dispersion_decay=a.dispersion_decay, setting=a.setting, target_classes=a.target_classes, seed=a.seed,
        device=a.device,
        workers=a.workers, run_dir=a.out, progress=not a.no_progress)


def run_adapt(cfg, dist) -> dict:
    from .neighbourhood import create_adapter

    adapter = create_adapter(cfg, dist)
    return {**adapter.run(), "run_dir": str(adapter.run_dir)}


def report_adapt(cfg, metrics: dict) -> None:
    if metrics["accuracy"] is not None:
        print(f"{cfg.method}: target accuracy {metrics['source_only_accuracy']:.2f}% (source model) -> "
              f"{metrics['accuracy']:.2f}%")
    if metrics["test_accuracy"] is not None:
        print(f"{cfg.method}: held-out {metrics['test_data']} {metrics['source_only_test_accuracy']:.2f}% -> "
              f"{metrics['test_accuracy']:.2f}%")
    print(f"adapted model, predictions.csv and metrics.json in {metrics['run_dir']}; "
          f"tensorboard --logdir {metrics['run_dir']}")


def add_evaluate_options(options) -> None:
    """`workbench evaluate` options of classification alone: accuracy under attack."""
    from .evaluate import ATTACK_LOSSES

    options.add_argument("--attack", default=None, choices=("pgd",), help="also report accuracy under an L-inf PGD "
                         "attack (from the clean image; step eps/10 at 20 steps or more as the CIFS code, "
                         "max(eps/10, 2.5 eps/steps) below; CIFS models through their joint loss)")
    options.add_argument("--eps", type=unit_interval, default=8 / 255, help="attack budget in [0, 1] pixel units "
                         "(default 8/255)")
    options.add_argument("--steps", type=positive_int, default=20, help="attack steps (default 20: PGD-20)")
    options.add_argument("--attack-loss", default="model", choices=ATTACK_LOSSES, help="what PGD ascends: the "
                         "model's training loss (default; CIFS: the joint loss with its probes, as the CIFS code) "
                         "or the cross-entropy of the output logits alone")


def evaluate(a) -> dict:
    from .evaluate import evaluate_model, evaluate_robustness

    result = evaluate_model(a.model, a.data, device=a.device)
    if a.attack:
        result["robustness"] = evaluate_robustness(a.model, a.data, eps=a.eps, steps=a.steps, device=a.device,
                                                   attack_loss=a.attack_loss)
    return result
