"""Train-to-a-budget and cached evaluation for drivers that train several Procgen runs into fixed
directories (scripts/compare_precision.py, scripts/run_procgen_adapt_benchmark.py): a finished run
is kept, an interrupted one resumed from its checkpoint, so a driver can be stopped and started again."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from envs.procgen import domain_name, visual_domain

from .evaluate import split_levels

ROOT = Path(__file__).resolve().parents[1]
# The paper's network and rollout length, and the evaluation interval and test episodes the drivers' runs were
# measured with, given before the driver's own flags (which override them): train_procgen.py's defaults are the
# quick Procgen job's.
PAPER_RECIPE = ["--backbone", "impala_1x", "--num-steps", "256", "--eval-interval", "5", "--eval-episodes", "32"]


def source_run_name(game: str, visual: list[str], seed: int) -> str:
    """The drivers' name for a source agent trained in `visual` (the shift sweep and the adaptation benchmark
    share it, so that one trains what the other adapts): <game>[-<domain>]-source-s<seed>."""
    domain = f"-{domain_name(visual)}" if visual else ""
    return f"{game}{domain}-source-s{seed}"


def run_finished(run: Path, total_steps: int) -> bool:
    path = Path(run) / "metrics.json"
    if not path.exists():
        return False
    m = json.loads(path.read_text())
    return not m["interrupted"] and m["env_steps"] >= total_steps


def given_run(specs: list[str], game: str, flag: str, visual: list[str], total_steps: int,
              algo: str | None = None) -> Path | None:
    """The run a driver was given for `game` as `--<flag>-run GAME=RUN` (None when it was given none), checked
    to be a finished run on `game` trained in `visual` (and by `algo` where one is needed), or a one-line
    SystemExit naming what to give instead: a driver must not read a checkpoint that is still changing."""
    given = dict(item.split("=", 1) for item in specs).get(game)
    if not given:
        return None
    run = Path(given)
    config = json.loads((run / "config.json").read_text())
    trained_in = visual_domain(config.get("visual") or [])
    if config["env"] != game or trained_in != visual_domain(visual) or (algo and config["algo"] != algo):
        wanted = f"a {algo.upper()} run" if algo else "a run"
        raise SystemExit(f"error: --{flag}-run {game}={run} is a {config['algo']} run on {config['env']} in the "
                         f"{domain_name(trained_in)} visuals: give {wanted} on {game} trained in the "
                         f"{domain_name(visual)} visuals")
    if not run_finished(run, total_steps):
        raise SystemExit(f"error: --{flag}-run {run} has not finished {total_steps} steps: let it finish (or "
                         "resume it) first, or lower --total-steps")
    return run


def thread_env(threads: int | None) -> dict | None:
    """This process's environment with OMP/MKL limited to `threads` (None: unchanged)."""
    return {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)} if threads else None


def run_logged(cmd: list[str], threads: int | None = None, log: Path | None = None) -> None:
    """Run a workbench command to completion: with `threads`, its OMP/MKL thread count (for several
    commands side by side); with `log`, its output appended there instead of this process's."""
    env = thread_env(threads)
    if log is None:
        subprocess.run(cmd, check=True, env=env)
        return
    with open(log, "a") as out:
        out.write(" ".join(cmd) + "\n")
        out.flush()
        code = subprocess.run(cmd, stdout=out, stderr=subprocess.STDOUT, env=env).returncode
    if code:
        raise RuntimeError(f"a command exited with code {code}; its command line and output are in {log}")


def train_to(run: Path, total_steps: int, train_args: list[str], threads: int | None = None,
             log: Path | None = None) -> None:
    """`scripts/train_procgen.py` into `run` until `total_steps`: a new run with `train_args`, or the
    saved run resumed (its own config; `train_args` are not reapplied). `threads`, `log`: run_logged."""
    run = Path(run)
    if run_finished(run, total_steps):
        return
    script = [sys.executable, str(ROOT / "scripts" / "train_procgen.py"), "--no-progress", "--no-video"]
    if (run / "checkpoint.pt").exists():
        cmd = script + ["--resume", str(run), "--total-steps", str(total_steps)]
    else:
        cmd = script + [*PAPER_RECIPE, *train_args, "--total-steps", str(total_steps), "--runs-root", str(run.parent),
                        "--run-name", run.name]
    print(" ".join(cmd), flush=True)
    run_logged(cmd, threads, log)


def final_evaluation(run: Path, episodes: int, visual: list[str] | None = None, name: str | None = None,
                     threads: int | None = None, split: str = "test") -> dict:
    """`scripts/evaluate_procgen.py` on unseen levels, the test episodes (evaluate_procgen's default) or
    the validation ones (agents.evaluate.split_levels), cached as JSON in the run: `visual=None` plays the visuals
    the agent was trained in, a list (empty: the game's own) others."""
    out = Path(run) / (name or f"final_evaluation_{episodes}.json")
    if not out.exists():
        levels = split_levels(split)
        cmd = [sys.executable, str(ROOT / "scripts" / "evaluate_procgen.py"), str(run), "--episodes", str(episodes),
               "--num-levels", str(levels["num_levels"]), "--start-level", str(levels["start_level"]),
               "--seed", str(levels["seed"]), "--out", str(out)]
        if visual is not None:
            cmd += ["--visual", *visual]
        subprocess.run(cmd, check=True, capture_output=True, env=thread_env(threads))
    return json.loads(out.read_text())
