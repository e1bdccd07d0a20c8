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


WORKERS_HELP = "data-loading processes (default 0: load in the main process)"


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


def class_list(text: str) -> tuple[int, ...]:
    """Class labels as `0,1,2` or ranges `0-4` (mixable: `0-2,7`), each once, at least one."""
    labels: list[int] = []
    try:
        for part in text.split(","):
            first, _, last = part.strip().partition("-")
            labels += range(int(first), int(last or first) + 1)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be class labels such as 0,1,2 or 0-4, got {text!r}") from None
    if not labels or len(set(labels)) != len(labels) or min(labels) < 0:
        raise argparse.ArgumentTypeError(f"must name each class label (>= 0) once, got {text!r}")
    return tuple(labels)


def at_least(minimum: int):
    """An integer >= minimum (e.g. a class count of at least 2)."""
    return _checked(int, f"an integer >= {minimum}", lambda v: v >= minimum)


def joined(names) -> str:
    """'a', 'a and b', 'a, b and c'."""
    names = list(names)
    return " and ".join(names) if len(names) < 3 else f"{', '.join(names[:-1])} and {names[-1]}"


class TaskOptions:
    """The options only some tasks take, on one command's parser (`workbench adapt`, `train-source`,
    `evaluate`): each task module adds its own, in a help group named after it, through `for_task`.

    An option two tasks take is declared by both with the same default and stays one option; its help joins
    theirs ("segmentation: ...; pose: ...", or "segmentation and pose: ..." where they say the same). After
    parsing, `check(args, task)` refuses, in one line, an option given that the chosen task does not take,
    rather than ignoring it:

        error: --ema-alpha applies to pose adapt, not classification: drop it
    """

    def __init__(self, parser: argparse.ArgumentParser, command: str):
        self.parser, self.command = parser, command
        self.helps: dict[str, dict[str, list[str]]] = {}   # dest -> {help text: the tasks that take it so}
        self.actions: dict[str, argparse.Action] = {}

    def for_task(self, task: str) -> "_TaskGroup":
        return _TaskGroup(self, task, self.parser.add_argument_group(f"{task} options"))

    def owners(self, dest: str) -> list[str]:
        return [task for tasks in self.helps[dest].values() for task in tasks]

    def check(self, args: argparse.Namespace, task: str) -> None:
        for dest, action in self.actions.items():
            owners = self.owners(dest)
            if task not in owners and getattr(args, dest) != action.default:
                raise ValueError(f"{action.option_strings[0]} applies to {joined(owners)} {self.command}, "
                                 f"not {task}: drop it")

    def _add(self, task: str, group, flags: tuple[str, ...], help: str, kwargs: dict) -> argparse.Action:  # noqa: A002
        action = self.parser._option_string_actions.get(flags[0])
        if action is None:
            action = group.add_argument(*flags, **kwargs)
            self.actions[action.dest], self.helps[action.dest] = action, {}
        elif action.dest not in self.actions:
            raise ValueError(f"{flags[0]} is a common option of {self.command}; {task} must not add it")
        else:
            default = kwargs.get("default", False if kwargs.get("action") == "store_true" else None)
            if action.default != default:
                raise ValueError(f"{flags[0]}: {task} gives default {default!r}, {joined(self.owners(action.dest))} "
                                 f"{action.default!r}; one option has one default")
        self.helps[action.dest].setdefault(help, []).append(task)
        action.help = "; ".join(f"{joined(tasks)}: {text}" for text, tasks in self.helps[action.dest].items())
        return action


class _TaskGroup:
    """One task's options: `add_argument` as argparse's (the help says what the option does for this task)."""

    def __init__(self, options: TaskOptions, task: str, group):
        self.options, self.task, self.group = options, task, group

    def add_argument(self, *flags: str, help: str = "", **kwargs) -> argparse.Action:  # noqa: A002
        return self.options._add(self.task, self.group, flags, help, kwargs)
