"""Command-line parsing shared by every command: numbers checked at parse time, one-line errors.

Every numeric option names the range it accepts through its `type` (a size or a count must be
positive, a rate must lie in [0, 1) ...), so that `--batch-size 0` stops before anything starts with
one line naming the option, instead of a ZeroDivisionError deep in a run:

    error: workbench adapt: argument --batch-size: must be a positive integer, got '0' (see --help)

`ArgumentParser` prints that line alone (argparse prints the whole usage first), and under torchrun
only the first worker of each machine prints it (`workbench.distributed.speaks`): every worker parses
the same command line and stops with the same error.
"""

from __future__ import annotations

import argparse
import os
import sys

from .distributed import launched_distributed, speaks


def given_or(value, default):
    """An option's value, or `default` where it was not given (None): for options whose default depends on
    the task or the data, so the parser leaves them None."""
    return default if value is None else value


def report_error(message: str, every_rank: bool = False) -> None:
    """One line on stderr, `error: <message>`, from the process that speaks for this machine; an error of
    this worker's own (`every_rank`: a write that failed here) from any worker, naming it."""
    if every_rank and launched_distributed():
        print(f"error: worker {os.environ.get('RANK', '?')}: {message}", file=sys.stderr, flush=True)
    elif speaks():
        print(f"error: {message}", file=sys.stderr, flush=True)


class ArgumentParser(argparse.ArgumentParser):
    """argparse with a one-line error: `error: <prog>: <message> (see --help)`, exit status 2."""

    def error(self, message: str):
        report_error(f"{self.prog}: {message} (see {self.prog} --help)")
        raise SystemExit(2)


def _number(kind, text: str, what: str):
    try:
        return kind(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be {what}, got {text!r}") from None


def _checked(kind, what: str, accept):
    """An argparse type: `kind(text)` (int or float), accepted when `accept(value)`, else '<what>, got ...'."""
    def parse(text: str):
        value = _number(kind, text, what)
        if not accept(value):
            raise argparse.ArgumentTypeError(f"must be {what}, got {text!r}")
        return value
    return parse


def _integral(text: str) -> int:
    """An integer, also written as a float in scientific notation (5e6) as step counts often are."""
    value = float(text)
    if not value.is_integer():
        raise ValueError(text)
    return int(value)


positive_int = _checked(int, "a positive integer", lambda v: v > 0)
non_negative_int = _checked(int, "an integer >= 0", lambda v: v >= 0)
positive_steps = _checked(_integral, "a positive whole number of steps (5e6 is accepted)", lambda v: v > 0)
non_negative_steps = _checked(_integral, "a whole number of steps >= 0 (5e6 is accepted)", lambda v: v >= 0)
positive_float = _checked(float, "a positive number", lambda v: v > 0)
non_negative_float = _checked(float, "a number >= 0", lambda v: v >= 0)
fraction = _checked(float, "a fraction in [0, 1)", lambda v: 0 <= v < 1)
unit_interval = _checked(float, "a number in [0, 1]", lambda v: 0 <= v <= 1)
discount = _checked(float, "a discount in (0, 1)", lambda v: 0 < v < 1)
seed = _checked(int, "a seed in [0, 2**32)", lambda v: 0 <= v < 2**32)


def at_least(minimum: int):
    """An integer >= minimum (e.g. a class count of at least 2)."""
    return _checked(int, f"an integer >= {minimum}", lambda v: v >= minimum)
