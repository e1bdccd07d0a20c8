"""Accuracy and per-class accuracy of a source or adapted checkpoint on a data set."""

from __future__ import annotations

from workbench.adapt.training import accuracy, make_loader, per_class_accuracy, predict
from workbench.checkpoint import load_checkpoint
from workbench.runtime import Runtime

from .data import image_transform, load_dataset, parse_builtin
from .model import build_model

MODEL_KINDS = ("source-model", "adapted-model")


def load_model(path, runtime):
    state = load_checkpoint(path, kind=MODEL_KINDS, map_location=runtime.device)
    model = runtime.prepare_module(build_model(state["model_config"]))
    model.load_state_dict(state["model"])
    return model.eval(), state


def builtin_test_split(spec: str) -> str | None:
    """`builtin:digits/<d>[:train|:trainval]` -> `builtin:digits/<d>:test` (adaptation runs on the unlabelled
    training data and reports the test split); None for any other data."""
    if not spec.startswith("builtin:"):
        return None
    domain, split = parse_builtin(spec)
    return f"builtin:digits/{domain}:test" if split in ("train", "trainval") else None


def load_target(spec: str, model_config: dict, train: bool = False):
    """A data set transformed as the model expects; its class count must match the model's."""
    return load_dataset(spec, image_transform(model_config["transform"], train, model_config.get("image_size")),
                        num_classes=model_config["num_classes"])  # a label out of range names its line


def evaluate_model(path, data: str, device: str = "auto", batch_size: int = 256) -> dict:
    rt = Runtime.create(device, "fp32")
    model, state = load_model(path, rt)
    dataset = load_target(data, state["model_config"])
    out = predict(model, make_loader(dataset, batch_size, train=False), rt)
    pred, labels = out["probs"].argmax(1), out["labels"]
    k = state["model_config"]["num_classes"]
    return {"data": data, "samples": len(dataset), "accuracy": accuracy(pred, labels),
            "per_class_accuracy": per_class_accuracy(pred, labels, k),
            "mean_class_accuracy": sum(a for a in per_class_accuracy(pred, labels, k) if a is not None)
            / max(1, sum(a is not None for a in per_class_accuracy(pred, labels, k)))}


ATTACK_LOSSES = ("model", "logits")


def evaluate_robustness(path, data: str, eps: float, steps: int, device: str = "auto", batch_size: int = 256,
                        attack_loss: str = "model") -> dict:
    """Clean and PGD accuracy (%) of a classifier checkpoint. attack_loss 'model': a CIFS model is attacked
    through the joint loss of its network and probes, as the CIFS code evaluates it; 'logits': every model
    through the cross-entropy of its output alone (a check that the probes do not mask the gradient)."""
    if attack_loss not in ATTACK_LOSSES:
        raise ValueError(f"unknown attack loss {attack_loss!r}: choose model or logits")
    from ..robust.adversarial import evaluation_attack, robust_accuracy
    from ..robust.objectives import cifs_joint_loss

    rt = Runtime.create(device, "fp32")
    model, state = load_model(path, rt)
    dataset = load_target(data, state["model_config"])
    loss_of = None
    if attack_loss == "model" and getattr(model.backbone, "cifs", None):
        def loss_of(images, labels):
            return cifs_joint_loss(model(images), model.backbone.probe_logits, labels)
    report = robust_accuracy(model, make_loader(dataset, batch_size, train=False), evaluation_attack(eps, steps),
                             state["model_config"].get("transform", "digits"), rt.device, loss_of=loss_of)
    return {**report, "attack": {**report["attack"], "loss": "joint" if loss_of else "logits"}}
