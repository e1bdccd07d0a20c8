"""The registry of tasks that `workbench train-source`, `adapt`, `evaluate` and `datasets` dispatch through.

A task is a module that turns parsed command-line options into its own run config and runs it:

    METHODS                         the adaptation methods it supports (`--method`)
    DISTRIBUTED                     True if its source training and adaptation run under torchrun
    source_defaults() -> cfg; add_source_options(options); source_config(args) -> cfg
                                    (tasks with a source-training command)
    train_source(cfg, dist) -> metrics;  report_source(metrics)
    adapt_defaults() -> cfg; add_adapt_options(options); adapt_config(args) -> cfg
    run_adapt(cfg, dist) -> metrics;  report_adapt(cfg, metrics)
    add_evaluate_options(options); evaluate(args) -> dict   (tasks whose models `workbench evaluate` scores)

The `add_*_options` functions add the options only that task takes (workbench.arguments.TaskOptions: an
option several tasks take is declared by each, with one default); the commands hold the options every task
takes, and refuse in one line an option given to a task that does not take it.
    BUILTIN, builtin_domains(), builtin_path(domain), build_builtin(domain, force) -> report line
                                    (tasks with built-in domains, builtin:<BUILTIN>/<domain>)

Modules are named, not imported, here, so the core depends on no family and `workbench --help` stays
fast; a new task is its module and one line below.
"""

from __future__ import annotations

import importlib
from types import ModuleType

TASKS = {
    "classification": "adaptation.classification.task",
    "segmentation": "adaptation.segmentation.task",
    "pose": "adaptation.pose.task",
    "detection": "adaptation.detection.task",   # person detection for crowd pose tracking
    "tracking": "adaptation.tracking.task",     # scores the tracks of `workbench track` (nothing to train)
    "procgen": "agents.task",  # a trained Procgen agent adapted to a visual domain (--target procgen:...)
}


def load_task(name: str) -> ModuleType:
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}: choose one of {', '.join(TASKS)}")
    return importlib.import_module(TASKS[name])


def tasks_with(function: str) -> list[str]:
    """The tasks whose module has `function` (e.g. train_source, evaluate)."""
    return [name for name in TASKS if hasattr(load_task(name), function)]


def method_tasks() -> dict[str, list[str]]:
    """Every adaptation method and the tasks that support it."""
    methods: dict[str, list[str]] = {}
    for name in TASKS:
        for method in load_task(name).METHODS:
            methods.setdefault(method, []).append(name)
    return methods


def check_method(task: str, method: str | None) -> None:
    """A one-line error for a method the task does not support, naming the tasks that do and its own methods."""
    supported = load_task(task).METHODS
    if method is None or method in supported:
        return
    where = method_tasks().get(method)
    runs_on = f"{method} runs on {', '.join(where)}" if where else f"{method} is no method of any task"
    raise ValueError(f"--method {method} does not run on {task} ({runs_on}): choose one of {', '.join(supported)}")
