"""Model selection of a source run, as the official code does it, for every task's source training.

The score on a selection set is checked `checks` times over the run (every total // checks iterations,
and at the last) and the model of the best check is kept; ties go to the later model (the official
loops compare with >=). With keep="last" the final model is kept whatever its score (noisy-label
studies, where a clean selection set would be an oracle early stop).
"""

from __future__ import annotations

KEEP_CHOICES = ("best", "last")


class Selection:
    """The checks of one source run and the check it keeps (`best`: the score, the selection data, the
    iteration and the epoch, as the checkpoint and metrics.json record them).

        selection = Selection(total, cfg.selection_checks, "miou", selection_name, len(loader))
        ...
        if selection.due(step):
            if selection.keeps(scores, step):   # the best so far: `selection.best` now describes it
                save_checkpoint(..., **selection.best)
    """

    def __init__(self, total_steps: int, checks: int, score: str, selection_data: str, steps_per_epoch: int,
                 keep: str = "best"):
        if keep not in KEEP_CHOICES:
            raise ValueError(f"unknown --keep {keep!r}: choose best (the best selection check) or last (the final "
                             f"model)")
        self.total, self.every = total_steps, max(1, total_steps // max(1, checks))
        self.score, self.keep, self.steps_per_epoch = score, keep, steps_per_epoch
        self.best = {score: -1.0, "selection_data": selection_data, "iteration": -1}

    def due(self, step: int) -> bool:
        """Whether `step` (counted from 1) is a check."""
        return step % self.every == 0 or step == self.total

    def keeps(self, scores: dict, step: int) -> bool:
        """Whether this check's model replaces the kept one; if it does, `best` becomes its record."""
        if self.keep == "last":
            kept = step == self.total
        else:
            kept = scores[self.score] >= self.best[self.score]
        if kept:
            self.best = {**self.best, **scores, "iteration": step, "epoch": step / self.steps_per_epoch}
        return kept
