"""SHOT++ labeling transfer: trust the confident part of the target, learn the rest with MixMatch.

1. Split: with entropies H(p_i) of the adapted model's predictions, let r be the fraction of
   target samples whose entropy is below the mean. Within every predicted class of n members, the
   int(r n) (rounded down) lowest-entropy samples become labelled (by their prediction); the
   others unlabelled.
2. MixMatch (Berthelot et al. 2019): for unlabelled x, guess q = sharpen(mean of the model's
   predictions on two views of x, T = 0.5); mix all (input, target) pairs with
   lam ~ Beta(alpha, alpha), lam = max(lam, 1 - lam); train on
       L = CE(mixed labelled) + w(t) * MSE(mixed unlabelled),  w ramped linearly to 100.
   The views are the data set's own training transform (random crop and flip for images; the
   fixed digits transform gives two equal views, as in the official code). F trains at 0.1x lr,
   B and a newly initialised C at 1x (the official code loads only F and B for this stage).
   An epoch is as many batches as the larger of the two parts has (full batches only).

Under torchrun the split is made on the predictions gathered from every rank (the same split on
every rank), each rank draws its share of both parts (per-rank batches of the configured size),
the new classifier starts from rank 0's and the gradients are averaged over the ranks.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.utils.data import Dataset, Subset

from workbench.adapt.information import entropy
from workbench.adapt.training import forever, make_loader, set_shot_lr, shot_optimizer, take_step
from workbench.mixing import sample_beta

from .model import Classifier

CHECKS = 10  # target accuracy is measured every tenth of the stage (and at its end)


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


def sharpen(p: torch.Tensor, temperature: float) -> torch.Tensor:
    p = p ** (1.0 / temperature)
    return p / p.sum(dim=1, keepdim=True)


class TwoViews(Dataset):
    """(view 1, view 2, index) of a data set's samples, each view drawn through its own transform."""

    def __init__(self, dataset: Dataset, indices: list[int]):
        self.dataset, self.indices = dataset, indices

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int):
        x1, _, index = self.dataset[self.indices[i]]
        x2, _, _ = self.dataset[self.indices[i]]
        return x1, x2, index


def interleaved_forward(model, groups: list[torch.Tensor], passes: int = 3) -> list[torch.Tensor]:
    """Logits of each group, computed in `passes` forward passes that each hold an equal share of
    every group, so that batch norm sees the same labelled/unlabelled mix in every pass (MixMatch's
    interleaving, which also keeps the batch of each pass at the size of one group)."""
    shares = [g.tensor_split(passes) for g in groups]
    outputs = [model(torch.cat([s[j] for s in shares])) for j in range(passes)]
    sizes = [[len(s[j]) for s in shares] for j in range(passes)]
    parts = [out.split(size) for out, size in zip(outputs, sizes)]
    return [torch.cat([parts[j][i] for j in range(passes)]) for i in range(len(groups))]


def mixmatch_loss(model, x_l: torch.Tensor, y_l: torch.Tensor, u1: torch.Tensor, u2: torch.Tensor, alpha: float,
                  temperature: float, unlabelled_weight: float) -> tuple[torch.Tensor, dict]:
    with torch.no_grad():
        guess = sharpen((model(u1).softmax(1) + model(u2).softmax(1)) / 2, temperature)
    inputs = torch.cat([x_l, u1, u2])
    targets = torch.cat([F.one_hot(y_l, model.num_classes).float(), guess, guess])
    lam = float(sample_beta(alpha, 1))
    lam = max(lam, 1 - lam)
    perm = torch.randperm(len(inputs), device=inputs.device)
    mixed, mixed_targets = lam * inputs + (1 - lam) * inputs[perm], lam * targets + (1 - lam) * targets[perm]
    n_l, n_u = len(x_l), len(u1)
    logits_l, *logits_u = interleaved_forward(model, list(mixed.split([n_l, n_u, n_u])))
    loss_l = -(mixed_targets[:n_l] * F.log_softmax(logits_l, 1)).sum(1).mean()
    loss_u = F.mse_loss(torch.cat(logits_u).softmax(1), mixed_targets[n_l:])
    return loss_l + unlabelled_weight * loss_u, {"labelled_ce": loss_l.item(), "unlabelled_mse": loss_u.item()}


def labeling_transfer(adapter, logger) -> dict:
    """SHOT++ stage 2 on a ShotAdapter whose model has been adapted; returns split and accuracy statistics."""
    cfg, model, device, dist = adapter.cfg, adapter.model, adapter.rt.device, adapter.rt.dist
    result = adapter.evaluate()
    labelled, unlabelled = split_by_entropy(result["probs"])
    pseudo = result["pred"]
    stats = {"labelled": len(labelled), "unlabelled": len(unlabelled)}
    if adapter.labels_known:
        truth = torch.as_tensor(adapter.eval_set.labels)
        stats["labelled_pseudo_label_accuracy"] = float((pseudo[labelled] == truth[labelled]).float().mean()) * 100
    if len(labelled) == 0 or len(unlabelled) == 0:
        return stats
    if cfg.transfer_classifier == "fresh":
        fc = model.classifier.fc
        fresh = Classifier(fc.in_features, fc.out_features)
        model.classifier.load_state_dict(fresh.state_dict())
        dist.broadcast_module(model.classifier)
    for p in model.parameters():
        p.requires_grad_(True)
    optimizer = shot_optimizer([(model.backbone, cfg.transfer_backbone_lr_mult), (model.bottleneck, 1.0),
                                (model.classifier, 1.0)], cfg.lr, cfg.weight_decay)
    # full batches only (official drop_last=True), unless a part is smaller than one batch
    lab_loader, unl_loader = (make_loader(part, cfg.transfer_batch_size, train=True, workers=cfg.workers, dist=dist,
                                          seed=cfg.seed, full_batches=True)
                              for part in (Subset(adapter.train_set, labelled.tolist()),
                                           TwoViews(adapter.train_set, unlabelled.tolist())))
    iters_per_epoch = max(len(lab_loader), len(unl_loader))
    total = cfg.transfer_epochs * iters_per_epoch
    every = max(1, total // CHECKS)
    pseudo = pseudo.to(device)
    lab_batches, unl_batches = forever(lab_loader), forever(unl_loader)
    stats["accuracy_checks"] = []
    step = 0
    logger.stage("labeling transfer", total)
    for epoch in range(cfg.transfer_epochs):
        sums = {}
        for _ in range(iters_per_epoch):
            model.train()
            step += 1
            set_shot_lr(optimizer, cfg.lr, step / total)
            x_l, _, idx_l = next(lab_batches)
            u1, u2, _ = next(unl_batches)
            y_l = pseudo[idx_l.to(device)]  # data sets return their own index, also through a Subset
            on_device = adapter.rt.images
            loss, terms = mixmatch_loss(model, on_device(x_l), y_l, on_device(u1), on_device(u2), cfg.mix_alpha,
                                        cfg.mix_temperature, cfg.unlabelled_weight * min(1.0, step / total))
            take_step(optimizer, loss, dist)
            for k, v in terms.items():
                sums[k] = sums.get(k, 0.0) + v
            logger.advance(1)
            if step % every == 0 or step == total:
                acc = adapter.evaluate().get("accuracy")
                stats["accuracy_checks"].append(acc)
                logger.scalars("transfer", {"accuracy": acc}, step)
        logger.scalars("transfer", {k: v / iters_per_epoch for k, v in sums.items()}, epoch)
    return stats
