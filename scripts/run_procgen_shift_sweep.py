#!/usr/bin/env python
"""The testbed of visual shifts that hurt (issue 36): a trained agent's return in every visual variant the
Procgen renderer offers, read against its return in its own visuals and the uniform random policy's.

A visual domain is a combination of the renderer's options no-backgrounds, restrict-themes and monochrome;
none of them is the renderer's default (every theme, with backgrounds, in colour). For each game, the
source agent (trained here with the adaptation benchmark's recipe, in --source-visual, or an existing run
given as --source-run <game>=<run>) plays its own visuals and each of the seven other domains; the uniform
random policy plays the same episodes (its return does not depend on the visuals: they change the
rendering, not the game). A shift's cost is

    cost = (R_own - R_shifted) / (R_own - R_random)

the share of the agent's margin over random play that the new visuals take away. An agent trained in the
default domain has seen every theme and background, so the options only take variety away from it; an
agent trained in a restricted domain (--source-visual) meets, in the default one, themes and backgrounds it
never saw. A (game, shift) pair enters the testbed when the agent is well above the floor in its own
visuals (margin over 2 standard errors) and the shift costs at least a third of the margin. The choice is
made on VALIDATION levels ([10000, 10000 + --val-levels), which neither training, levels [0, 200), nor the
test episodes, the full distribution with seed 12345, use), and the chosen pairs' returns on the test
episodes are reported beside it, so that no pair is chosen on the returns a table reports. The whole sweep
is written, not only the chosen pairs: sweep.jsonl and table.md in --out. Evaluations are cached there, so
the script can be stopped and started again, and sources in other domains can share the folder.

    python scripts/run_procgen_shift_sweep.py --games starpilot coinrun maze --total-steps 500000 --out runs/shift-sweep
    python scripts/run_procgen_shift_sweep.py --source-run starpilot=runs/procgen-adapt/starpilot-source-s0 \\
        --games starpilot --out runs/shift-sweep
    python scripts/run_procgen_shift_sweep.py --games starpilot --source-visual no-backgrounds restrict-themes \\
        monochrome --out runs/shift-sweep -- --aux inverse-dynamics
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from agents.evaluate import (TEST_SEED, VALIDATION_LEVELS, VALIDATION_START, evaluate_checkpoint,  # noqa: E402
                             evaluate_random_policy, split_levels)
from agents.resumable import given_run, run_finished, source_run_name, train_to  # noqa: E402
from envs.procgen import DEFAULT_DOMAIN, GAMES, PROTOCOLS, VISUAL_OPTIONS, domain_name, visual_domain  # noqa: E402
from workbench.arguments import ArgumentParser, positive_int, positive_steps  # noqa: E402
from workbench.files import atomic_write  # noqa: E402
from workbench.logging import write_json  # noqa: E402

COST_THRESHOLD = 1 / 3       # a shift hurts when it costs at least a third of the margin over random play
MARGIN_STANDARD_ERRORS = 2   # ... of an agent whose margin exceeds this many standard errors


def domains() -> list[list[str]]:
    """Every combination of the renderer's visual options, the default (none) first, then smallest first."""
    names = list(VISUAL_OPTIONS)
    return [list(c) for size in range(len(names) + 1) for c in itertools.combinations(names, size)]


def shifts_from(own: list[str]) -> list[list[str]]:
    """The seven domains other than the source's own."""
    return [d for d in domains() if d != visual_domain(own)]


def write_text(path: Path, text: str) -> None:
    atomic_write(path, lambda f: f.write(text.encode()))


class Sweep:
    def __init__(self, out: Path, episodes: int, val_levels: int, device: str):
        self.out, self.episodes, self.val_levels, self.device = out, episodes, val_levels, device

    def split(self, name: str) -> dict:
        """Levels and env seed of the validation episodes (chosen on) or the test episodes (reported)."""
        return split_levels(name, self.val_levels)

    def cached(self, name: str, compute) -> dict:
        path = self.out / "evaluations" / f"{name}.json"
        if not path.exists():
            result = {k: v for k, v in compute().items() if k != "video"}
            path.parent.mkdir(parents=True, exist_ok=True)
            write_json(path, result)
        return json.loads(path.read_text())

    def agent(self, game: str, run: Path, own: list[str], visual: list[str], split: str) -> dict:
        """The source agent trained in `own` visuals, playing `visual` (cached per source domain; the default
        domain's sources keep the names of the first sweeps)."""
        source = game if not own else f"{game}-from-{domain_name(own)}"
        shown = "own" if visual_domain(visual) == visual_domain(own) else domain_name(visual)
        return self.cached(f"{source}-agent-{shown}-{split}", lambda: evaluate_checkpoint(
            run, episodes=self.episodes, visual=visual, device=self.device, **self.split(split))[0])

    def floor(self, game: str, mode: str, split: str) -> dict:
        return self.cached(f"{game}-random-{split}", lambda: evaluate_random_policy(
            game, self.episodes, distribution_mode=mode, **self.split(split)))


def shift_row(game: str, visual: list[str], own: dict, shifted: dict, floor: dict, split: str,
              source_visual: list[str] = ()) -> dict:
    """One (game, shift) pair on one split: returns, standard errors, the margin and the shift's cost."""
    margin = own["mean_return"] - floor["mean_return"]
    margin_se = math.hypot(own["stderr_return"] or 0.0, floor["stderr_return"] or 0.0)
    cost = (own["mean_return"] - shifted["mean_return"]) / margin if margin > 0 else None
    return {"game": game, "source_visual": domain_name(list(source_visual)), "shift": domain_name(visual),
            "split": split, "own": own["mean_return"], "own_se": own["stderr_return"],
            "shifted": shifted["mean_return"], "shifted_se": shifted["stderr_return"],
            "random": floor["mean_return"], "random_se": floor["stderr_return"], "margin": margin,
            "margin_in_se": margin / margin_se if margin_se else None, "cost": cost,
            "episodes": own.get("episodes")}


def hurts(row: dict) -> bool:
    return (row["margin_in_se"] is not None and row["margin_in_se"] > MARGIN_STANDARD_ERRORS
            and row["cost"] is not None and row["cost"] >= COST_THRESHOLD)


def with_se(value: float, se: float | None) -> str:
    return f"{value:.2f} ± {se:.2f}" if se is not None else f"{value:.2f}"


def table(rows: list[dict]) -> str:
    head = ("| game | trained in | shifted to | own visuals | shifted | random policy | margin (SEs) | cost | "
            "in the testbed |\n|---|---|---|---|---|---|---|---|---|\n")
    def cost(r):
        return "—" if r["cost"] is None else f"{r['cost']:.2f}"
    lines = [f"| {r['game']} | {r.get('source_visual', DEFAULT_DOMAIN)} | {r['shift']} | "
             f"{with_se(r['own'], r['own_se'])} | {with_se(r['shifted'], r['shifted_se'])} | "
             f"{with_se(r['random'], r['random_se'])} | "
             f"{r['margin']:.2f} ({r['margin_in_se'] or 0:.1f}) | {cost(r)} | {'yes' if r.get('chosen') else ''} |"
             for r in rows]
    return head + "\n".join(lines) + "\n"


def parse_args(argv=None) -> argparse.Namespace:
    p = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--games", nargs="+", default=["starpilot"], choices=GAMES)
    p.add_argument("--source-run", nargs="*", default=[], metavar="GAME=RUN", help="an existing PPO run per game "
                   "(trained in --source-visual) instead of training one here")
    p.add_argument("--source-visual", nargs="*", default=[], choices=list(VISUAL_OPTIONS),
                   help="the visual options the source agents are trained in (default: none, the renderer's own)")
    p.add_argument("--total-steps", type=positive_steps, default=500_000, help="budget of the agents trained here")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--episodes", type=positive_int, default=100, help="episodes per evaluation")
    p.add_argument("--val-levels", type=positive_int, default=VALIDATION_LEVELS,
                   help=f"validation levels from {VALIDATION_START} (default {VALIDATION_LEVELS})")
    p.add_argument("--device", default="auto")
    p.add_argument("--out", default="runs/shift-sweep")
    p.add_argument("extra", nargs="*", help="train_procgen.py flags for the agents trained here (after --)")
    return p.parse_args(argv)


def source_of(game: str, args, out: Path) -> Path:
    given = given_run(args.source_run, game, "source", args.source_visual, args.total_steps)
    if given:
        return given
    run = out / source_run_name(game, args.source_visual, args.seed)
    visual = ["--visual", *args.source_visual] if args.source_visual else []
    if not run_finished(run, args.total_steps):
        train_to(run, args.total_steps, ["--env", game, "--seed", str(args.seed), *visual, *args.extra])
    return run


def merged_with_earlier_sweeps(path: Path, rows: list[dict]) -> list[dict]:
    """This sweep's rows after the earlier ones in `path` of other (game, source domain) pairs, so that sweeps
    of sources in other domains share one table; a pair swept again replaces its old rows."""
    def source(row: dict) -> tuple[str, str]:
        return row["game"], row.get("source_visual", DEFAULT_DOMAIN)

    earlier = [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []
    swept = {source(r) for r in rows}
    return [r for r in earlier if source(r) not in swept] + rows


def main(argv=None) -> list[dict]:
    args = parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    sweep = Sweep(out, args.episodes, args.val_levels, args.device)
    rows = []
    for game in args.games:
        run = source_of(game, args, out)
        mode = PROTOCOLS[json.loads((run / "config.json").read_text())["protocol"]].distribution_mode
        own = visual_domain(args.source_visual)

        def row_of(visual: list[str], split: str) -> dict:
            return shift_row(game, visual, sweep.agent(game, run, own, own, split),
                             sweep.agent(game, run, own, visual, split), sweep.floor(game, mode, split), split, own)

        val_rows = []
        for visual in shifts_from(own):
            row = row_of(visual, "val")
            row["chosen"] = hurts(row)
            val_rows.append(row)
            print(f"{game} {domain_name(own)} -> {domain_name(visual)} (val): cost {row['cost']}", flush=True)
        rows += val_rows
        # the chosen pairs on the test episodes, for the tables that report them
        rows += [row_of(visual_domain(row["shift"].split("+")), "test") for row in val_rows if row["chosen"]]
    every = merged_with_earlier_sweeps(out / "sweep.jsonl", rows)
    write_text(out / "sweep.jsonl", "".join(json.dumps(r) + "\n" for r in every))
    chosen = [r for r in every if r["split"] == "val" and r["chosen"]]
    report = (f"Validation levels [{VALIDATION_START}, {VALIDATION_START + args.val_levels}), {args.episodes} "
              f"episodes per cell (the choice):\n\n" + table([r for r in every if r["split"] == "val"])
              + f"\n{len(chosen)} pair(s) cost at least a third of a margin over {MARGIN_STANDARD_ERRORS} standard "
              f"errors. Test episodes (full distribution, seed {TEST_SEED}) of the chosen pairs:\n\n"
              + table([r for r in every if r["split"] == "test"]))
    write_text(out / "table.md", report)
    print(report)
    return rows


if __name__ == "__main__":
    main()
