"""SHOT++ labeling transfer: trust the confident half of the target, learn the rest with MixMatch.

1. Split: with entropies H(p_i) of the adapted model's predictions, let r be the fraction of
   target samples whose entropy is below the mean. Within every predicted class of n members, the
   int(r n) (rounded down) lowest-entropy samples become labelled (by their prediction); the
   others unlabelled.
2. MixMatch (Berthelot et al. 2019): for unlabelled x, guess q = sharpen(mean of the model's
   predictions on two augmented views, T = 0.5); mix all (input, target) pairs with
   lam ~ Beta(alpha, alpha), lam = max(lam, 1 - lam); train on
       L = CE(mixed labelled) + w(t) * MSE(mixed unlabelled),  w ramped linearly to 100.
   The whole network (F, B and C) trains in this stage.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.utils.data import Subset

from workbench.mixing import sample_beta

from .losses import entropy
from .training import make_loader, set_shot_lr, shot_optimizer

SHARPEN_T = 0.5
UNLABELLED_WEIGHT = 100.0


def split_by_entropy(probs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Indices (labelled, unlabelled) by the per-class entropy rule above."""
    ent = entropy(probs)
    pred = probs.argmax(1)
    fraction = int((ent < ent.mean()).sum()) / len(ent)
    labelled = []
    for k in pred.unique():
        members = (pred == k).nonzero().squeeze(1)
        keep = int(len(members) * fraction)  # rounded down, as the official int(c_num * PS)
        labelled.append(members[ent[members].argsort(stable=True)[:keep]])
    labelled = torch.cat(labelled).sort().values if labelled else torch.zeros(0, dtype=torch.long)
    mask = torch.ones(len(probs), dtype=torch.bool)
    mask[labelled] = False
    return labelled, mask.nonzero().squeeze(1)


def sharpen(p: torch.Tensor, temperature: float = SHARPEN_T) -> torch.Tensor:
    p = p ** (1.0 / temperature)
    return p / p.sum(dim=1, keepdim=True)


def augment(images: torch.Tensor, flip: bool) -> torch.Tensor:
    """A random shift of up to 1/16 of the image side (reflect padding), and a horizontal flip for photos."""
    n, _, h, w = images.shape
    pad = max(1, h // 16)
    padded = F.pad(images, (pad, pad, pad, pad), mode="reflect")
    dy, dx = torch.randint(0, 2 * pad + 1, (2, n))
    out = torch.stack([padded[i, :, dy[i]:dy[i] + h, dx[i]:dx[i] + w] for i in range(n)])
    if flip:
        flipped = torch.rand(n, device=images.device) < 0.5
        out[flipped] = out[flipped].flip(-1)
    return out


def mixmatch_loss(model, x_l: torch.Tensor, y_l: torch.Tensor, x_u: torch.Tensor, alpha: float,
                  unlabelled_weight: float, flip: bool) -> tuple[torch.Tensor, dict]:
    num_classes = model.num_classes
    with torch.no_grad():
        u1, u2 = augment(x_u, flip), augment(x_u, flip)
        guess = sharpen((model(u1).softmax(1) + model(u2).softmax(1)) / 2)
    inputs = torch.cat([augment(x_l, flip), u1, u2])
    targets = torch.cat([F.one_hot(y_l, num_classes).float(), guess, guess])
    lam = float(sample_beta(alpha, 1))
    lam = max(lam, 1 - lam)
    perm = torch.randperm(len(inputs), device=inputs.device)
    logits = model(lam * inputs + (1 - lam) * inputs[perm])
    mixed_targets = lam * targets + (1 - lam) * targets[perm]
    n_l = len(x_l)
    loss_l = -(mixed_targets[:n_l] * F.log_softmax(logits[:n_l], 1)).sum(1).mean()
    loss_u = F.mse_loss(logits[n_l:].softmax(1), mixed_targets[n_l:])
    return loss_l + unlabelled_weight * loss_u, {"labelled_ce": loss_l.item(), "unlabelled_mse": loss_u.item()}


def labeling_transfer(adapter, logger) -> dict:
    """SHOT++ stage 2 on a ShotAdapter whose model has been adapted; returns split statistics."""
    cfg, model, device = adapter.cfg, adapter.model, adapter.rt.device
    result = adapter.evaluate()
    labelled, unlabelled = split_by_entropy(result["probs"])
    pseudo = result["pred"]
    stats = {"labelled": len(labelled), "unlabelled": len(unlabelled)}
    if adapter.labels_known:
        truth = torch.as_tensor(adapter.eval_set.labels)
        stats["labelled_pseudo_label_accuracy"] = float((pseudo[labelled] == truth[labelled]).float().mean()) * 100
    if len(labelled) == 0 or len(unlabelled) == 0:
        return stats
    for p in model.parameters():
        p.requires_grad_(True)
    optimizer = shot_optimizer([(model.backbone, cfg.backbone_lr_mult), (model.bottleneck, 1.0),
                                (model.classifier, 1.0)], cfg.lr, cfg.weight_decay)
    lab_loader = make_loader(Subset(adapter.train_set, labelled.tolist()), cfg.batch_size, train=True)
    unl_loader = make_loader(Subset(adapter.train_set, unlabelled.tolist()), cfg.batch_size, train=True)
    iters_per_epoch = max(len(lab_loader), len(unl_loader))
    total = cfg.transfer_epochs * iters_per_epoch
    flip = adapter.source_state["model_config"]["transform"] == "imagenet"
    pseudo = pseudo.to(device)
    step = 0
    for epoch in range(cfg.transfer_epochs):
        model.train()
        lab_iter, unl_iter = iter(lab_loader), iter(unl_loader)
        sums = {}
        for _ in range(iters_per_epoch):
            try:
                x_l, _, idx_l = next(lab_iter)
            except StopIteration:
                lab_iter = iter(lab_loader)
                x_l, _, idx_l = next(lab_iter)
            try:
                x_u, _, _ = next(unl_iter)
            except StopIteration:
                unl_iter = iter(unl_loader)
                x_u, _, _ = next(unl_iter)
            set_shot_lr(optimizer, cfg.lr, step / total)
            y_l = pseudo[idx_l.to(device)]  # data sets return their own index, also through a Subset
            weight = UNLABELLED_WEIGHT * min(1.0, step / total)
            loss, terms = mixmatch_loss(model, adapter.rt.images(x_l), y_l, adapter.rt.images(x_u), cfg.mix_alpha,
                                        weight, flip)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            step += 1
            for k, v in terms.items():
                sums[k] = sums.get(k, 0.0) + v
        logger.scalars("transfer", {k: v / iters_per_epoch for k, v in sums.items()}, epoch)
        evaluation = adapter.evaluate()
        logger.scalars("transfer", {"accuracy": evaluation.get("accuracy")}, epoch)
    return stats
