"""BUFR (Eastwood et al., ICLR 2022, "Source-Free Adaptation to Measurement Shift via Bottom-Up Feature
Restoration"): restore the source's unit marginals on the target, block by block from the input up, with no
entropy term.

The source checkpoint keeps the soft-binned marginals of the encoder's dense units and the policy logits
on the agent's own play in its training visuals (agents.feature_stats: written at the end of training, or
by `python scripts/procgen_feature_stats.py RUN` for an agent trained before). On target frames the loss is

    L = mean_u PSI(P_u, Q_u)  over the dense units  +  mean_u PSI(P_u, Q_u)  over the logits

with Q_u the batch's soft counts. Bottom up: the encoder's blocks (IMPALA's three conv stacks, then its
dense layer) are unfrozen one at a time; block m trains, with all blocks below it, for `epochs` passes
over the frames by SGD (momentum 0.9, no weight decay) at lr / 1.5^m, a fresh optimiser per block (the
official bufr.py: its digit CNN's per-block decay; configs/*/bufr.yml: batch 256, 30 epochs per block). The policy and value
heads stay frozen. The official learning rate ranges from 1.0 (digit CNNs with batch norm) to 1e-5
(Camelyon-17). The IMPALA CNN has no normalisation layers, and nearly empty bins give the PSI a steep
minimum. On the tests' tiny bigfish agent: adapted on 256 monochrome frames (batch 64, two epochs per
block) the summed PSI rose from 20 to 22 at lr 0.1 and from 7 to 22 at 0.01, and fell from 10 to 2 at
1e-3 and from 14 to 4 at 1e-4; adapted on the very frames its statistics came from (PSI 4e-15, batch 128,
three epochs per block) it ran away to 17 at 1e-3 and stayed below 3e-11 at 1e-4. The default, 1e-4, is
the largest of those at which the source's own data stays a fixed point, not a tuned figure: choose lr on
validation levels, never on the test levels a table reports.
"""

from __future__ import annotations

import torch

from workbench.adapt.training import add_terms
from workbench.checkpoint import CheckpointError
from workbench.logging import RunLogger

from ..feature_stats import restoration_loss, tracked_activations
from .core import TargetFrames, features_and_policy, policy_entropy

BLOCK_LR_DECAY = 1.5     # lr / 1.5^m for the m-th block (bufr.py, DigitCNN)
MOMENTUM = 0.9           # its SGD (configs/*/bufr.yml); epochs per block, batch and lr: core.TRAINING_DEFAULTS


def encoder_blocks(backbone) -> list[torch.nn.Module]:
    """The encoder from the input up: each conv stack, then the dense layer."""
    stages = getattr(backbone, "stages", None)
    if stages is None or not hasattr(backbone, "fc"):
        raise ValueError(f"BUFR restores an IMPALA encoder block by block; {type(backbone).__name__} is not one")
    return [*stages, backbone.fc]


def progress_total(adapter, frames: TargetFrames) -> int:
    return len(encoder_blocks(adapter.model.backbone)) * adapter.cfg.epochs * adapter.steps_per_epoch(frames)


def stored_statistics(adapter) -> dict:
    statistics = adapter.source_state.get("feature_statistics")
    if statistics is None:
        raise CheckpointError(f"{adapter.source_path} has no feature statistics (trained before they were kept): run "
                              f"python scripts/procgen_feature_stats.py {adapter.source_path}")
    return statistics["layers"]


def adapt(adapter, frames: TargetFrames, logger: RunLogger) -> list[dict]:
    cfg, model, rt = adapter.cfg, adapter.model, adapter.rt
    layers = {name: {k: v.to(adapter.rt.device) for k, v in layer.items()}   # once, not at every step
              for name, layer in stored_statistics(adapter).items()}
    adapter.encoder_only()
    model.backbone.requires_grad_(False)
    steps_per_epoch = adapter.steps_per_epoch(frames)
    progress = adapter.resume_point()
    history, trainable = progress.history, []
    for block_index, block in enumerate(encoder_blocks(model.backbone)):
        block.requires_grad_(True)
        trainable += list(block.parameters())
        first = max(0, progress.epochs - block_index * cfg.epochs)   # this block's epochs already done
        if first >= cfg.epochs:
            continue
        optimizer = torch.optim.SGD(trainable, lr=cfg.lr / BLOCK_LR_DECAY ** block_index, momentum=MOMENTUM,
                                    weight_decay=0.0)
        if first > 0:   # resumed within this block
            optimizer.load_state_dict(progress.optimizer)
        for epoch in range(first, cfg.epochs):
            epoch_index = block_index * cfg.epochs + epoch
            model.train()
            sums: dict[str, float] = {}
            for idx in torch.randperm(len(frames)).split(cfg.batch_size):
                if len(idx) < 2:
                    continue
                loss = restoration_loss(tracked_activations(model, rt.images(frames.frames[idx])), layers)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                add_terms(sums, {"restoration": loss})
                logger.advance(1)
            stats = {"block": block_index, "restoration_loss": sums.get("restoration", 0.0) / steps_per_epoch}
            logger.scalars("loss", {"restoration": stats["restoration_loss"]}, epoch_index)
            if epoch == cfg.epochs - 1:   # the policy over every frame once per block: a pass as long as an epoch's
                stats["policy_entropy"] = policy_entropy(features_and_policy(model, frames.frames, rt)[1])
                logger.scalars("target", {"policy_entropy": stats["policy_entropy"], "block": block_index},
                               epoch_index)
            history.append(stats)
            adapter.epoch_finished(history, optimizer)
    return history
