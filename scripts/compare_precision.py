#!/usr/bin/env python
"""Does PPO learn the same with bf16 autocast as in fp32? Same game, same seeds, both precisions.

For every seed and precision this trains `scripts/train_procgen.py` into <out>/<precision>-s<seed>
(a finished run is skipped, an interrupted one resumed, so the script can be stopped and started
again), scores each final agent on unseen levels with more episodes than the periodic
evaluations (`evaluate_procgen`, in the precision it was trained in), and writes

    <out>/precision.md    final test and training returns per seed, mean +- std per precision,
                          and Welch's t-test of the difference
    <out>/precision.png   training and test return curves: mean over seeds, band = min..max

    python scripts/compare_precision.py --env starpilot --seeds 0 1 2 --total-steps 500000 --out runs/precision

bf16 needs a CPU with native bf16 (AVX-512 BF16 / AMX) or a GPU to be worth running; elsewhere it is
emulated and slow, and the comparison still holds.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from agents.resumable import final_evaluation, train_to  # noqa: E402
from workbench.logging import mean_sd  # noqa: E402

PRECISIONS = ("bf16", "fp32")
CURVES = {"train": "train/episode_return", "test": "test/episode_return"}


def event_files(run: Path) -> list[Path]:
    """A run's event files in the order they were written: by the creation second, then the writer's
    counter (events.out.tfevents.<seconds>.<host>.<pid>.<counter>), both as numbers; by name, a 10th writer
    of one second would come before the 9th."""
    def order(f: Path):
        parts = f.name.split(".")
        return int(parts[3]), int(parts[-1]) if parts[-1].isdigit() else 0

    return sorted(Path(run).glob("events.out.tfevents.*"), key=order)


def curves(run: Path) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    files = []
    for f in event_files(run):
        events = EventAccumulator(str(f), size_guidance={"scalars": 0})
        events.Reload()
        files.append(events)
    out = {}
    for name, tag in CURVES.items():
        points = [p for events in files if tag in events.Tags()["scalars"] for p in events.Scalars(tag)]
        last = {p.step: p.value for p in points}  # a resumed run rewrites the steps it repeats
        steps = np.array(sorted(last), dtype=np.float64)
        out[name] = (steps, np.array([last[s] for s in sorted(last)]))
    return out


def plot(all_curves: dict[str, list[dict]], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    for ax, name in zip(axes, CURVES):
        for precision, runs in all_curves.items():
            series = [c[name] for c in runs if len(c[name][0])]
            if not series:
                continue
            end = min(s[0][-1] for s in series)
            grid = np.linspace(max(s[0][0] for s in series), end, 100)
            ys = np.stack([np.interp(grid, s, v) for s, v in series])
            line, = ax.plot(grid, ys.mean(0), label=f"{precision} ({len(series)} seeds)")
            ax.fill_between(grid, ys.min(0), ys.max(0), color=line.get_color(), alpha=0.2)
        ax.set_title(f"{name} return" + (" (unseen levels)" if name == "test" else ""))
        ax.set_xlabel("env steps")
        ax.legend()
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def welch(a: list[float], b: list[float]) -> tuple[float, float]:
    from scipy.stats import ttest_ind

    if len(a) < 2 or len(b) < 2:
        return float("nan"), float("nan")
    result = ttest_ind(a, b, equal_var=False)
    return float(result.statistic), float(result.pvalue)


def report(rows: list[dict], env: str, total_steps: int, episodes: int) -> str:
    lines = [f"PPO on {env}, {total_steps} env steps per run; final test return = mean over {episodes} episodes "
             "on unseen levels, in the run's own precision.", "",
             "| precision | seed | final test return | train return (last 100 episodes) | env steps/s |",
             "|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['precision']} | {r['seed']} | {r['test']:.2f} | {r['train']:.2f} | {r['sps']:.0f} |")
    lines += ["", "| precision | final test return | train return | env steps/s |", "|---|---|---|---|"]
    by = {p: [r for r in rows if r["precision"] == p] for p in PRECISIONS}
    for p, rs in by.items():
        if rs:
            lines.append(f"| {p} | {mean_sd([r['test'] for r in rs], 2)} | {mean_sd([r['train'] for r in rs], 2)} | "
                         f"{statistics.mean(r['sps'] for r in rs):.0f} |")
    t, pval = welch([r["test"] for r in by["bf16"]], [r["test"] for r in by["fp32"]])
    lines += ["", f"Welch's t-test, final test return bf16 vs fp32: t = {t:.2f}, p = {pval:.2f} "
              "(p < 0.05 would mean they differ beyond seed noise)."]
    return "\n".join(lines) + "\n"


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--env", default="starpilot")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--total-steps", type=int, default=500_000)
    p.add_argument("--episodes", type=int, default=200, help="final evaluation episodes on unseen levels")
    p.add_argument("--out", default="runs/precision")
    p.add_argument("--precisions", nargs="+", default=list(PRECISIONS), choices=PRECISIONS)
    p.add_argument("extra", nargs=argparse.REMAINDER, help="after --: more train_procgen.py flags for every run")
    args = p.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    extra = [a for a in args.extra if a != "--"]
    rows, all_curves = [], {pr: [] for pr in args.precisions}
    for seed in args.seeds:  # seed-major: a stopped run leaves whole bf16/fp32 pairs
        for precision in args.precisions:
            run = out / f"{precision}-s{seed}"
            train_to(run, args.total_steps, ["--env", args.env, "--precision", precision, "--seed", str(seed), *extra])
            metrics = json.loads((run / "metrics.json").read_text())
            final = final_evaluation(run, args.episodes)
            rows.append({"precision": precision, "seed": seed, "test": final["mean_return"],
                         "train": metrics["train_mean_return_last100"], "sps": metrics["steps_per_second"]})
            all_curves[precision].append(curves(run))
            print(f"{precision} seed {seed}: final test return {final['mean_return']:.2f}", flush=True)
            (out / "precision.md").write_text(report(rows, args.env, args.total_steps, args.episodes))
    plot(all_curves, out / "precision.png", f"PPO on {args.env}: bf16 autocast vs fp32")
    print((out / "precision.md").read_text())


if __name__ == "__main__":
    main()
