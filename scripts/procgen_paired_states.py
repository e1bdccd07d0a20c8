#!/usr/bin/env python
"""Measure again, and keep in metrics.json, how far a finished Procgen adaptation run's policy is from its
source policy on paired states (ProcgenAdapter.paired_policies): for runs whose pairing the run itself
gave up on, before an env that fell out of step was simply left out (agents.adapt.paired_frames).

The states are the ones the run would measure now (same seed, steps and stride as its config.json), so on
a run whose pairing held the figures come out as it wrote them, which the script checks and prints.

    python scripts/procgen_paired_states.py runs/procgen-adapt-36/plain-to-default/starpilot-bufr-s1
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from agents.adapt import ProcgenAdaptConfig, ProcgenAdapter  # noqa: E402
from workbench.arguments import ArgumentParser, report_error  # noqa: E402
from workbench.checkpoint import CheckpointError, load_checkpoint  # noqa: E402
from workbench.logging import write_json  # noqa: E402
from workbench.runtime import DEVICE_CHOICES  # noqa: E402


def measured_again(run: Path, device: str) -> dict:
    """The paired-state comparison of the run's source and adapted policies, as the run would measure it."""
    if not (run / "metrics.json").exists():
        raise ValueError(f"{run} holds no finished adaptation run (no metrics.json): give a run directory of "
                         "`workbench adapt --target procgen:...`")
    config = json.loads((run / "config.json").read_text())
    if not config.get("paired_steps"):
        raise ValueError(f"{run} was run with --paired-steps 0: it measured no paired states to redo")
    fields = {f.name for f in dataclasses.fields(ProcgenAdaptConfig)}
    cfg = ProcgenAdaptConfig(**{**{k: v for k, v in config.items() if k in fields}, "run_dir": str(run),
                                "device": device, "resume": False, "progress": False})
    adapter = ProcgenAdapter(cfg)
    score = adapter.paired_policies()
    if score is None:
        raise ValueError(f"{run} adapted a {adapter.agent.kind} agent, which has no action distribution to compare")
    adapted = copy.deepcopy(adapter.model)
    agent_state = load_checkpoint(run / "checkpoint.pt", kind="procgen-agent")["agent_state"]
    adapted.load_state_dict(agent_state["model"])
    return score(adapted)


def main(argv=None) -> int:
    p = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs", nargs="+", help="finished adaptation run directories")
    p.add_argument("--overwrite", action="store_true", help="replace paired states the run wrote that differ "
                   "from the ones measured now (by default such a run is reported and left alone)")
    p.add_argument("--device", default="auto", choices=DEVICE_CHOICES)
    args = p.parse_args(argv)
    for run in map(Path, args.runs):
        try:
            paired = measured_again(run, args.device)
        except (CheckpointError, ValueError) as err:
            report_error(str(err))
            return 2
        metrics = json.loads((run / "metrics.json").read_text())
        written = metrics.get("paired_states")
        if written is not None:
            same = all(written[who] == paired[who] for who in ("source_agent", "adapted_agent"))
            if same or not args.overwrite:
                print(f"{run}: the run's own paired states " + ("measured again exactly; left as they are" if same
                      else "differ from the ones measured now; left as they are (--overwrite replaces them)"))
                continue
        metrics["paired_states"] = paired
        write_json(run / "metrics.json", metrics)
        print(f"{run}: paired states kept in metrics.json ({paired['frames']} states, "
              f"{paired['envs_out_of_step']} of the envs out of step)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
