"""SHOT's adaptation loop, written once for every task whose adapter follows it (classification and
segmentation today).

Each epoch:
    1. pseudo-labels from the model as it stands (`epoch_labels`: SHOT's centroids on the last
       evaluation's features and softmax, or None for SHOT-IM);
    2. one pass over the target with  L = im_weight * IM + beta * CE(pseudo-labels) (+ the method's own
       terms, `batch_loss`), the step counted before the learning rate is set as the official loops do
       (p runs 1/T .. 1), gradients averaged over the ranks under torchrun;
    3. an evaluation of the whole target (`evaluate_epoch`), which seeds the next epoch's labels.

A run (`run`) scores the source model on the target and the held-out splits, adapts, scores again,
and writes config.json, the TensorBoard events, metrics.json and the adapted checkpoint (rank 0).

A task's adapter subclasses `ShotLoop` and gives the pieces that differ between tasks (what a batch is,
what a score is, what is saved); the loop and the run's order of passes are here, so that every task
consumes its random numbers in the same order.
"""

from __future__ import annotations

import time

import torch
import torch.nn as nn

from workbench.distributed import SINGLE, Distributed
from workbench.logging import RunLogger, run_logger, write_json

from .training import add_terms, set_epoch, set_shot_lr, shot_optimizer, take_step


class ShotLoop:
    """The adaptation loop and run of SHOT-style adapters; see the module docstring.

    A subclass sets `cfg` (epochs, lr, weight_decay, progress), `model`, `loader`, `run_dir` and, under
    torchrun, `dist`, and defines:

        new_history() -> dict                       the per-epoch lists `record` fills
        param_groups(logger, history) -> [(module, lr multiplier)]  what trains (may fit a head first: SHOT++)
        epoch_labels(latest, epoch, logger, history) -> labels | None
        batch_loss(batch, labels, prior) -> (loss, {term: value}), or None to skip the batch
        evaluate_initial() / evaluate_epoch(epoch) / evaluate_final() -> a target evaluation
        held_out_scores() -> scores of the held-out splits (None without them)
        log_evaluation(logger, evaluation, epoch);  log_held_out(logger, before, after)
        record(history, evaluation)                 per-epoch figures into the history
        run_config() -> dict;  description() -> str
        metrics(before, after, held_before, held_after, history, wall_seconds) -> dict
        save(after, metrics)                        the checkpoint and the task's own outputs
    and may override `make_optimizer`, `schedule`, `diversity_prior` and `after_adapting`.
    """

    dist: Distributed = SINGLE
    model: nn.Module

    # ------------------------------------------------------------ the optimiser and its schedule
    def make_optimizer(self, groups: list[tuple[nn.Module, float]]) -> torch.optim.Optimizer:
        return shot_optimizer(groups, self.cfg.lr, self.cfg.weight_decay)

    def schedule(self, optimizer: torch.optim.Optimizer, step: int, total: int) -> None:
        """SHOT's lr0 * (1 + 10 p)^-0.75 at p = step / total."""
        set_shot_lr(optimizer, self.cfg.lr, step / total)

    def diversity_prior(self, latest: dict) -> torch.Tensor | None:
        """The class proportions IM's diversity term pulls towards (None: uniform, SHOT's)."""
        return None

    def after_adapting(self, logger: RunLogger) -> dict:
        """A stage after the loop (SHOT++'s labeling transfer); its figures join the history."""
        return {}

    # ------------------------------------------------------------ the loop
    def adapt(self, logger: RunLogger, latest: dict) -> dict:
        """The epochs of SHOT; `latest` is an evaluation of the current model, which seeds the first
        epoch's pseudo-labels (and the diversity prior)."""
        cfg, model = self.cfg, self.model
        history = self.new_history()
        optimizer = self.make_optimizer(self.param_groups(logger, history))
        total, step = max(1, cfg.epochs * len(self.loader)), 0
        logger.stage(self.description(), total)   # a head fitted first (SHOT++) had the bar to itself
        prior = self.diversity_prior(latest)
        for epoch in range(cfg.epochs):
            set_epoch(self.loader, epoch)
            labels = self.epoch_labels(latest, epoch, logger, history)
            model.train()
            sums: dict[str, float] = {}
            for batch in self.loader:
                step += 1   # the official loops count the step before scheduling: p runs 1/T .. 1
                self.schedule(optimizer, step, total)
                step_loss = self.batch_loss(batch, labels, prior)
                if step_loss is None:   # nothing to learn from in this batch: counted, not stepped (as the official code)
                    logger.advance(1)
                    continue
                loss, terms = step_loss
                take_step(optimizer, loss, self.dist)
                add_terms(sums, terms)
                logger.advance(1)
            logger.scalars("loss", self.mean_over_ranks(sums, len(self.loader)), epoch)
            latest = self.evaluate_epoch(epoch)
            self.log_evaluation(logger, latest, epoch)
            self.record(history, latest)
        return history

    def mean_over_ranks(self, sums: dict[str, float], batches: int) -> dict[str, float]:
        """Per-batch means of summed loss terms, over the batches of every rank."""
        batches = max(1, batches)
        if not self.dist.enabled:
            return {k: v / batches for k, v in sums.items()}
        totals = self.dist.sum(torch.tensor(list(sums.values()), dtype=torch.float64, device=self.rt.device))
        return {k: float(v) / (batches * self.dist.world_size) for k, v in zip(sums, totals)}

    # ------------------------------------------------------------ the run
    def run(self) -> dict:
        """Score, adapt, score again, then write the run directory (rank 0); every rank returns the metrics."""
        cfg, main = self.cfg, self.dist.is_main
        if main:
            write_json(self.run_dir / "config.json", self.run_config())
        logger = run_logger(main, self.run_dir, total=max(1, cfg.epochs * len(self.loader)),
                            desc=self.description(), progress=cfg.progress)
        start = time.time()
        try:
            before, held_before = self.evaluate_initial(), self.held_out_scores()
            self.log_evaluation(logger, before, -1)
            history = self.adapt(logger, before)
            history.update(self.after_adapting(logger))
            after, held_after = self.evaluate_final(), self.held_out_scores()
            self.log_held_out(logger, held_before, held_after)
        finally:
            logger.close()
        metrics = self.metrics(before, after, held_before, held_after, history, time.time() - start)
        if main:
            self.save(after, metrics)
        return metrics
