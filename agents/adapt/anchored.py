"""The entropy-safe IM: IM's diversity term towards the source policy's own action marginal, and a KL anchor
to the source policy in place of IM's conditional-entropy term.

SHOT-IM's conditional entropy makes a stochastic PPO policy deterministic within an epoch (agents.adapt.shot),
and its uniform diversity target pushes mass onto the actions that mean "stand still". Here, on target frames
s of a batch B, with pi_0 the frozen source policy and pi_theta the policy over the adapted encoder:

    L = KL(p_bar || m_src) + lambda * mean_{s in B} KL(pi_0(.|s) || pi_theta(.|s)),   p_bar = mean_{s in B} pi_theta(.|s)

m_src is the source policy's mean action distribution on its own rollouts in the source visuals (the source
domain's simulator, no rewards): what the action proportions were before the shift. The anchor keeps each
state's policy, entropy included, near where it started, as the KL-regularised fine-tuning of test-time RL
does. lambda (--anchor-weight) trades the two: where the marginals are far apart the diversity term moves
the policy a long way, and a weak anchor lets its entropy follow (tests/test_procgen_adapt.py: TV 0.36
between the marginals, -0.55 nats at lambda 0, -0.43 at 1, -0.03 at 30, -0.009 at 100). The default, 1, is
our choice made before any run; choose it on validation levels (training levels in the target visuals),
never on the test levels a table reports. Encoder only, SHOT's optimiser and schedule (lr 1e-2 with the encoder at
0.1x, lr0 (1 + 10 p)^-0.75).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from workbench.adapt.training import add_terms, set_shot_lr, shot_optimizer, take_step
from workbench.logging import RunLogger

from .core import TargetFrames, features_and_policy, policy_entropy


def marginal_kl(probs: torch.Tensor, marginal: torch.Tensor) -> torch.Tensor:
    """KL(p_bar || m) of the batch's mean action distribution p_bar to the action marginal m (logs of both
    floored at 1e-12, as IM's prior term: an action no state takes would make the gradient infinite)."""
    p_bar = probs.mean(0)
    return (p_bar * (p_bar.clamp_min(1e-12).log() - marginal.clamp_min(1e-12).log())).sum()


def anchor_kl(source_probs: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """mean_s KL(pi_0(.|s) || pi_theta(.|s)), pi_theta from logits (log-softmax: finite for any policy)."""
    return (torch.special.xlogy(source_probs, source_probs) - source_probs * F.log_softmax(logits, 1)).sum(1).mean()


def adapt(adapter, frames: TargetFrames, logger: RunLogger) -> list[dict]:
    cfg, model, rt = adapter.cfg, adapter.model, adapter.rt
    adapter.encoder_only()
    optimizer = shot_optimizer([(model.backbone, cfg.encoder_lr_mult)], cfg.lr, cfg.weight_decay)
    steps_per_epoch = adapter.steps_per_epoch(frames)
    source_probs = features_and_policy(adapter.source_model(), frames.frames, rt)[1]   # pi_0 on the target frames
    progress = adapter.resume_point(optimizer)
    # the source policy samples its rollouts: a resumed run takes the marginal its first part used
    marginal = progress.extra.get("marginal")
    marginal = adapter.source_action_marginal() if marginal is None else marginal.to(rt.device)
    total, step, history = cfg.epochs * steps_per_epoch, progress.extra.get("step", 0), progress.history
    for epoch in range(progress.epochs, cfg.epochs):
        if epoch > 0 and cfg.recollect:
            frames = adapter.target_frames(epoch)
            source_probs = features_and_policy(adapter.source_model(), frames.frames, rt)[1]
        probs = features_and_policy(model, frames.frames, rt)[1]
        stats = {"policy_entropy": policy_entropy(probs), "source_policy_entropy": policy_entropy(source_probs),
                 "marginal_tv_to_source": float(0.5 * (probs.mean(0) - marginal.cpu()).abs().sum())}
        model.train()
        sums: dict[str, float] = {}
        for idx in torch.randperm(len(frames)).split(cfg.batch_size):
            if len(idx) < 2:
                continue
            step += 1
            set_shot_lr(optimizer, cfg.lr, step / total)
            logits = model(rt.images(frames.frames[idx]))[0].float()
            diversity = marginal_kl(logits.softmax(1), marginal)
            anchor = anchor_kl(source_probs[idx].to(rt.device), logits)
            loss = diversity + cfg.anchor_weight * anchor
            take_step(optimizer, loss)
            add_terms(sums, {"marginal_kl": diversity, "anchor_kl": anchor, "total": loss})
            logger.advance(1)
        logger.scalars("loss", {k: v / steps_per_epoch for k, v in sums.items()}, epoch)
        logger.scalars("target", stats, epoch)
        history.append(stats)
        adapter.epoch_finished(history, optimizer, step=step, marginal=marginal)
    return history
