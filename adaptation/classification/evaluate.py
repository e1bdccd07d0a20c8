"""Accuracy and per-class accuracy of a source or adapted checkpoint on a data set."""

from __future__ import annotations

from workbench.adapt.training import accuracy, make_loader, per_class_accuracy, predict
from workbench.runtime import Runtime

from .data import load_target
from .model import load_model


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
