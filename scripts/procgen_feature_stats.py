#!/usr/bin/env python
"""Measure a trained PPO agent's feature statistics (BUFR's record of the source domain, agents.feature_stats)
and keep them in its checkpoint, for agents trained before training measured them itself.

The statistics come from the agent's own play (sampled actions) on its training levels in its training
visuals, every 16th step, as at the end of training. The checkpoint is rewritten in place (atomically);
one that already holds statistics is left alone unless --overwrite.

    python scripts/procgen_feature_stats.py runs/starpilot-ppo-mixreg-s0
    workbench adapt --method bufr --source runs/starpilot-ppo-mixreg-s0 --target procgen:starpilot:monochrome
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from agents.adapt import load_source_agent  # noqa: E402
from agents.feature_stats import STATS_FRAMES, source_statistics  # noqa: E402
from workbench.arguments import ArgumentParser, positive_int, report_error  # noqa: E402
from workbench.checkpoint import CheckpointError, load_checkpoint, resolve_checkpoint_path, save_checkpoint  # noqa: E402
from workbench.runtime import DEVICE_CHOICES, Runtime  # noqa: E402


def main(argv=None) -> int:
    p = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run", help="a PPO run directory or its checkpoint.pt")
    p.add_argument("--frames", type=positive_int, default=STATS_FRAMES, help=f"frames measured (default {STATS_FRAMES})")
    p.add_argument("--overwrite", action="store_true", help="measure again where the checkpoint already holds them")
    p.add_argument("--device", default="auto", choices=DEVICE_CHOICES)
    args = p.parse_args(argv)
    try:
        path = resolve_checkpoint_path(args.run)
        game = load_checkpoint(path, kind="procgen-agent")["config"]["env"]
        agent, state, path = load_source_agent(path, game, Runtime.create(args.device, "fp32"))
        if "feature_statistics" in state and not args.overwrite:
            report_error(f"{path} already holds feature statistics: pass --overwrite to measure them again")
            return 2
        config = state["config"]
        state["feature_statistics"] = source_statistics(agent, game, config.get("visual", []), config["protocol"],
                                                        args.frames, seed=config.get("seed", 0))
        save_checkpoint(path, "procgen-agent", state)
    except (CheckpointError, ValueError) as err:
        report_error(str(err))
        return 2
    units = ", ".join(f"{name}: {len(layer['counts'])} units"
                      for name, layer in state["feature_statistics"]["layers"].items())
    print(f"{path}: feature statistics of {args.frames} frames of its own play on its training levels ({units})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
