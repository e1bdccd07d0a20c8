"""SHOT-IM and SHOT over actions (Liang et al. 2020), the baselines of Procgen adaptation.

On target frames, for `epochs` passes, with the policy head frozen as SHOT's hypothesis:

    L = IM(pi(phi(s))) + beta * CE(pi(phi(s)), y_hat)        (beta = 0: SHOT-IM)

with IM and the cosine k-means pseudo-labels over actions exactly as for images (workbench.adapt.information,
workbench.adapt.cluster). `diversity_prior="initial"` pulls the batch's mean action distribution towards the
source policy's own on the target frames instead of towards uniform. With `recollect`, the frames are
collected again with the adapted policy before every epoch.

A PPO policy is not a confident classifier: trained with an entropy bonus it keeps most of its entropy (a
starpilot agent at 500k steps: 2.28 nats of ln 15 = 2.71) and acts by sampling. IM's conditional-entropy
term makes it nearly deterministic within one epoch (0.07 nats after the first), which changes the
behaviour more than the visual shift did (docs/RESULTS.md); agents.adapt.anchored keeps the diversity term
and replaces that one.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from workbench.adapt.cluster import shot_pseudo_labels
from workbench.adapt.information import information_maximization
from workbench.adapt.training import add_terms, set_shot_lr, shot_optimizer, take_step
from workbench.logging import RunLogger

from .core import TargetFrames, features_and_policy, policy_entropy


def adapt(adapter, frames: TargetFrames, logger: RunLogger) -> list[dict]:
    cfg, model, rt = adapter.cfg, adapter.model, adapter.rt
    adapter.encoder_only()
    optimizer = shot_optimizer([(model.backbone, cfg.encoder_lr_mult)], cfg.lr, cfg.weight_decay)
    steps_per_epoch = adapter.steps_per_epoch(frames)
    progress = adapter.resume_point(optimizer)
    total, history = cfg.epochs * steps_per_epoch, progress.history
    step, prior = progress.extra.get("step", 0), progress.extra.get("prior")
    prior = prior.to(rt.device) if prior is not None else None
    for epoch in range(progress.epochs, cfg.epochs):
        if epoch > 0 and cfg.recollect:
            frames = adapter.target_frames(epoch)
        feats, probs = features_and_policy(model, frames.frames, rt)
        if epoch == 0 and cfg.diversity_prior == "initial":
            prior = probs.mean(0).to(rt.device)
        pseudo = shot_pseudo_labels(feats, probs, backend=cfg.cluster_backend) if cfg.beta > 0 else None
        stats = {"policy_entropy": policy_entropy(probs),
                 "action_agreement_with_pseudo_labels": float((probs.argmax(1) == pseudo).float().mean())
                 if pseudo is not None else None}
        model.train()
        sums: dict[str, float] = {}
        for idx in torch.randperm(len(frames)).split(cfg.batch_size):
            if len(idx) < 2:
                continue
            step += 1
            set_shot_lr(optimizer, cfg.lr, step / total)
            logits, _ = model(rt.images(frames.frames[idx]))
            im, cond, marg = information_maximization(logits.float(), prior)
            loss, terms = im, {"im": im, "conditional_entropy": cond, "marginal_entropy": marg}
            if pseudo is not None:
                terms["pseudo_ce"] = F.cross_entropy(logits.float(), pseudo[idx].to(rt.device))
                loss = loss + cfg.beta * terms["pseudo_ce"]
            take_step(optimizer, loss)
            add_terms(sums, terms)
            logger.advance(1)
        logger.scalars("loss", {k: v / steps_per_epoch for k, v in sums.items()}, epoch)
        logger.scalars("target", stats, epoch)
        history.append(stats)
        adapter.epoch_finished(history, optimizer, step=step, prior=prior)
    return history
