"""Classification as a task of the `workbench` commands (workbench.tasks): train-source, adapt (SHOT-IM,
SHOT, SHOT++; under torchrun too) and evaluate (accuracy, and accuracy under PGD)."""

from __future__ import annotations

from workbench.arguments import given_or

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


def source_config(a):
    from .source import SourceConfig

    d = SourceConfig()
    if a.precision not in (None, "fp32"):
        raise ValueError("--precision applies to segmentation and pose training; classification runs in fp32")
    return SourceConfig(
        data=a.data or d.data, backbone=a.backbone or d.backbone, num_classes=a.num_classes,
        epochs=given_or(a.epochs, d.epochs), batch_size=given_or(a.batch_size, d.batch_size),
        lr=given_or(a.lr, d.lr), pretrained=a.pretrained, init_from=a.init_from, transform=a.transform,
        select_on=a.select_on, eval_target=a.eval_target, objective=a.objective, label_noise=a.label_noise,
        noise_type=a.noise_type, keep=a.keep, resume=a.resume, seed=a.seed,
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


def adapt_config(a):
    """An AdaptConfig; options left out take the benchmark's official value."""
    from .shot import AdaptConfig

    d = AdaptConfig()
    if a.precision not in (None, "fp32"):
        raise ValueError("--precision applies to segmentation and pose adaptation; classification runs in fp32")
    return AdaptConfig(
        source=a.source, target=a.target, method=a.method or d.method, benchmark=a.benchmark, epochs=a.epochs,
        beta=a.beta, batch_size=given_or(a.batch_size, d.batch_size), lr=a.lr, rotation_weight=a.rotation_weight,
        rotation_epochs=a.rotation_epochs, rotation_keep=a.rotation_keep, transfer_epochs=a.transfer_epochs,
        transfer_batch_size=a.transfer_batch_size, transfer_classifier=a.transfer_classifier,
        mix_alpha=a.mix_alpha, cluster_backend=a.cluster_backend, test_on=a.test_on, seed=a.seed, device=a.device,
        workers=a.workers, run_dir=a.out, progress=not a.no_progress)


def run_adapt(cfg, dist) -> dict:
    from .shot import ShotAdapter

    adapter = ShotAdapter(cfg, dist)
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


def evaluate(a) -> dict:
    from .evaluate import evaluate_model, evaluate_robustness

    if a.save_predictions:
        raise ValueError("--save-predictions writes the predictions of segmentation and pose models only")
    result = evaluate_model(a.model, a.data, device=a.device)
    if a.attack:
        result["robustness"] = evaluate_robustness(a.model, a.data, eps=a.eps, steps=a.steps, device=a.device,
                                                   attack_loss=a.attack_loss)
    return result
