"""The `workbench` command: one entry point whose subcommands dispatch into the families.

    workbench quickstart
    workbench train-procgen --env starpilot --mixreg
    workbench evaluate-procgen runs/<run-name> --episodes 100
    workbench train-source --data builtin:digits/uci --backbone dtn
    workbench adapt --method shot --source runs/<source-run> --target builtin:digits/photo
    workbench backbones
    workbench heads

Each family module is imported only when its subcommand runs, so that
`workbench --help` stays fast.
"""

from __future__ import annotations

import importlib
import os
import sys

# name -> (module, function taking argv and returning an exit code, one-line help)
COMMANDS = {
    "quickstart": ("adaptation.classification.quickstart", "quickstart_main",
                   "train a digits source and adapt it with SHOT: the adaptation half end to end in minutes"),
    "train-procgen": ("agents.cli", "train_main", "train a PPO or Rainbow agent (optionally with mixreg) on Procgen"),
    "evaluate-procgen": ("agents.cli", "evaluate_main", "evaluate a Procgen checkpoint on unseen levels"),
    "datasets": ("adaptation.cli", "datasets_main", "list or build the built-in digits domains"),
    "train-source": ("adaptation.cli", "train_source_main", "train a source model for adaptation"),
    "adapt": ("adaptation.cli", "adapt_main", "adapt a source model to unlabelled target data (SHOT-IM/SHOT/SHOT++)"),
    "evaluate": ("adaptation.cli", "evaluate_main", "accuracy of a source or adapted model on a data set"),
    "track": ("adaptation.tracking.cli", "track_main",
              "crowd pose tracking of videos: detect, track, estimate, smooth (PoseTrack JSON and GIFs)"),
    "backbones": ("workbench.cli", "backbones_main", "list the registered backbones"),
    "heads": ("workbench.cli", "heads_main", "list the registered dense heads (segmentation and pose)"),
}


def backbones_main(argv=None) -> int:
    from workbench.backbones import create_backbone, list_backbones

    for name in list_backbones():
        model = create_backbone(name)
        params = sum(p.numel() for p in model.parameters())
        print(f"{name:20s} {params / 1e6:8.3f}M parameters  out_dim={getattr(model, 'out_dim', '-')}")
    return 0


def heads_main(argv=None) -> int:
    """One line per registered dense head: its name, its task and what it is."""
    from workbench.heads import describe_heads

    for name, task, summary in describe_heads():
        print(f"{name:10s} {task:13s} {summary}")
    return 0


def usage() -> str:
    lines = ["usage: workbench <command> [options]", "", "commands:"]
    lines += [f"  {name:18s} {help_}" for name, (_, _, help_) in COMMANDS.items()]
    lines += ["", "`workbench <command> --help` shows a command's options."]
    return "\n".join(lines)


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(usage())
        return 0
    command, rest = argv[0], argv[1:]
    if command not in COMMANDS:
        print(f"workbench: unknown command {command!r}: choose one of {', '.join(COMMANDS)}", file=sys.stderr)
        return 2
    module, function, _ = COMMANDS[command]
    try:
        return getattr(importlib.import_module(module), function)(rest) or 0
    except BrokenPipeError:  # output piped into a reader that stopped early (`workbench datasets list | head`)
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error when Python flushes
        return 0


if __name__ == "__main__":
    sys.exit(main())
