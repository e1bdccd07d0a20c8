"""Run directories, TensorBoard scalars and videos, progress bars, JSON results.

Every long job writes into one run directory:

    runs/<run-name>/
        config.json      the resolved configuration (also in TensorBoard: TEXT tab and HPARAMS tab)
        events.out.*     TensorBoard events
        learning_curve.png  training and test return against env steps (Procgen runs)
        checkpoint.pt    the latest checkpoint (atomic)
        metrics.json     final metrics
"""

from __future__ import annotations

import dataclasses
import io
import itertools
import json
import os
import shutil
import time
from pathlib import Path
from typing import Any, Mapping

import numpy as np
from torch.utils.tensorboard import SummaryWriter
from tqdm.auto import tqdm

from .files import atomic_write


def default_run_name(*parts: str) -> str:
    stamp = time.strftime("%Y%m%d-%H%M%S")
    return "-".join([p for p in parts if p] + [stamp])


def mean_sd(values, digits: int = 1, count: bool = False) -> str:
    """'m ± sd' of a list of figures for result tables (the sample sd; no sd for one value), with
    ' (n=k)' when `count`."""
    values = [float(v) for v in values]
    text = f"{np.mean(values):.{digits}f}"
    if len(values) > 1:
        text += f" ± {np.std(values, ddof=1):.{digits}f}"
    return text + (f" (n={len(values)})" if count else "")


def seed_table(rows: list[dict], row_key: str, columns, value_key: str, digits: int = 1, order=None) -> str:
    """A markdown table of `mean_sd` over seeds: a line per distinct row[row_key] (in `order`, default
    sorted), a cell per entry of `columns` (matched against row["column"]), "—" where nothing was run."""
    lines = [f"| {row_key} | " + " | ".join(columns) + " |", "|---" * (len(columns) + 1) + "|"]
    names = {r[row_key] for r in rows}
    for name in [n for n in order if n in names] if order is not None else sorted(names):
        cells = []
        for column in columns:
            values = [r[value_key] for r in rows if (r[row_key], r["column"]) == (name, column)]
            cells.append(mean_sd(values, digits, count=True) if values else "—")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_json(path: str | os.PathLike, data: Mapping[str, Any]) -> Path:
    """Write JSON atomically (temp file + rename), so readers never see half a file; WriteError on failure."""
    text = json.dumps(data, indent=2, sort_keys=True, default=_json_default) + "\n"
    return atomic_write(path, lambda f: f.write(text.encode()))


# The outputs that show a run has written to a directory: a checkpoint or its final metrics.
RUN_OUTPUTS = ("metrics.json", "checkpoint.pt", "adapted.pt", "source.pt", "train-state.pt")
# What --overwrite clears before a new run writes there, so that nothing of the earlier run mixes with it
# (TensorBoard curves, stale snapshots, a metrics.json that a failed new run would leave looking finished).
EARLIER_RUN_FILES = (*RUN_OUTPUTS, "config.json", "predictions.csv", "keypoints.json", "evaluation.json",
                     "events.out.tfevents.*", "learning_curve.png")
EARLIER_RUN_FOLDERS = ("snapshots", "ranks", "predictions")


def claim_run_dir(run_dir: str | os.PathLike, overwrite: bool = False, option: str = "--out",
                  resume_hint: str = "") -> None:
    """Refuse a run directory that holds an earlier run's outputs (RUN_OUTPUTS) unless `overwrite`, which
    first removes the earlier run's files (EARLIER_RUN_FILES and _FOLDERS; nothing else in the folder).
    The refusal is one line naming the folder, what it holds and the ways on (`resume_hint` for commands
    that can continue it)."""
    run = Path(run_dir)
    held = [name for name in RUN_OUTPUTS if (run / name).exists()]
    if not held:
        return
    if not overwrite:
        state = "a finished run" if "metrics.json" in held else "an unfinished run"
        ways = [resume_hint] if resume_hint else []
        raise ValueError(f"{run} already holds {state} ({', '.join(held)}): " + ", ".join(
            ways + ["pass --overwrite to replace it", f"or choose another {option}"]))
    for pattern in EARLIER_RUN_FILES:
        for path in run.glob(pattern):
            if path.is_file():
                path.unlink()
    for name in EARLIER_RUN_FOLDERS:
        if (run / name).is_dir():
            shutil.rmtree(run / name)


# Where and how a run ran and what it kept, not what it computes: free to differ when a benchmark resumes.
PLACE_SETTINGS = ("run_dir", "progress", "device", "workers", "save_predictions")


def finished_run(run_dir: str | os.PathLike, config) -> dict | None:
    """A finished run's metrics.json, or None while it has none (not started, or stopped before the end).

    Benchmarks skip finished runs when started again, so a folder must not mix runs made with other
    settings: a setting in the run's config.json that differs from `config` (a dataclass instance)
    raises. Settings left at None in `config` are resolved by the run itself and not compared."""
    run = Path(run_dir)
    metrics = run / "metrics.json"
    if not metrics.exists():
        return None
    check_same_settings(run, config)
    return json.loads(metrics.read_text())


def check_same_settings(run_dir: str | os.PathLike, config, ignored: tuple[str, ...] = ()) -> None:
    """Raise where the run's config.json differs from `config` (a dataclass instance) in a setting that is
    not a place setting (PLACE_SETTINGS), not in `ignored`, and not left at None in `config`."""
    run = Path(run_dir)
    written = json.loads((run / "config.json").read_text())
    wanted = json.loads(json.dumps(dataclasses.asdict(config), default=_json_default))
    differ = [k for k, v in wanted.items() if v is not None and k not in (*PLACE_SETTINGS, *ignored)
              and k in written and written[k] != v]
    if differ:
        raise ValueError(f"{run} was made with " + ", ".join(f"{k}={written[k]!r}" for k in differ)
                         + " and this run asks for " + ", ".join(f"{k}={wanted[k]!r}" for k in differ)
                         + ": pass the same settings to resume that folder, or a new --out")


def finished_or_trained(run_dir: str | os.PathLike, config, train, train_missing: bool = True) -> dict | None:
    """A benchmark's resumable step: the run's metrics (see `finished_run`), after `train()` if it has none
    and `train_missing` (a report-only pass gives False, and gets None for an unfinished run)."""
    if train_missing and finished_run(run_dir, config) is None:
        train()
    return finished_run(run_dir, config)


def _json_default(obj):
    if isinstance(obj, (np.integer, np.floating)):
        return obj.item()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


class RunLogger:
    """TensorBoard writer bound to a run directory, with a tqdm progress bar.

    `scalars` logs a dict of values under one prefix; `video` writes an
    animated GIF summary (TensorBoard shows it in the Images tab) without
    needing moviepy.
    """

    def __init__(self, run_dir: str | os.PathLike, total: int | None = None, initial: int = 0,
                 desc: str = "", progress: bool = True, purge_step: int | None = None):
        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.writer = SummaryWriter(log_dir=str(self.run_dir), purge_step=purge_step)
        self.desc, self.total, self.count = desc, total, initial
        self._last_status = 0.0
        self.bar = tqdm(total=total, initial=initial, desc=desc, unit="step", unit_scale=True,
                        dynamic_ncols=True, disable=not progress, smoothing=0.1)

    def scalars(self, prefix: str, values: Mapping[str, float], step: int) -> None:
        for name, value in values.items():
            if value is None:
                continue
            self.writer.add_scalar(f"{prefix}/{name}", float(value), step)

    def config(self, config: Mapping[str, Any], metrics: tuple[str, ...] = (), step: int = 0) -> None:
        """The run's configuration in TensorBoard, as SB3 and CleanRL users find it: the whole of it as JSON
        in the TEXT tab (tag `config`), and its flat values as hyperparameters of this run in the HPARAMS tab,
        read against the scalar tags in `metrics`. Written into this run's own event file (SummaryWriter's
        add_hparams would start a separate run in a subfolder)."""
        from torch.utils.tensorboard.summary import hparams

        text = json.dumps(config, indent=2, sort_keys=True, default=_json_default)
        self.writer.add_text("config", "```\n" + text + "\n```", step)  # a code block keeps the layout
        flat = {k: (v if isinstance(v, (bool, int, float, str)) else json.dumps(v, default=_json_default))
                for k, v in _flatten(json.loads(text)).items()}
        for summary in hparams(flat, dict.fromkeys(metrics)):
            self.writer._get_file_writer().add_summary(summary, step)

    def video(self, tag: str, frames: np.ndarray, step: int, fps: int = 15) -> None:
        """frames: (T, H, W, 3) uint8."""
        from PIL import Image
        from tensorboard.compat.proto.summary_pb2 import Summary

        if len(frames) == 0:
            return
        images = [Image.fromarray(np.asarray(f, dtype=np.uint8)) for f in frames]
        buf = io.BytesIO()
        images[0].save(buf, format="GIF", save_all=True, append_images=images[1:],
                       duration=int(1000 / fps), loop=0)
        h, w = frames.shape[1:3]
        image = Summary.Image(height=h, width=w, colorspace=3, encoded_image_string=buf.getvalue())
        self.writer._get_file_writer().add_summary(Summary(value=[Summary.Value(tag=tag, image=image)]), step)

    def advance(self, n: int, status_every: float = 10.0, **postfix: float) -> None:
        """Move the progress bar; without a bar (batch jobs, --no-progress) print a status line
        at most every `status_every` seconds and at the end."""
        self.bar.update(n)
        self.count += n
        shown = {k: f"{v:.3g}" for k, v in postfix.items()}
        if self.bar.disable:
            now = time.time()
            if now - self._last_status < status_every and self.count != self.total:
                return
            self._last_status = now
            status = " ".join(f"{k}={v}" for k, v in shown.items())
            print(f"{self.desc}: step {self.count}/{self.total} {status}", flush=True)
        elif shown:
            self.bar.set_postfix(shown, refresh=False)

    def stage(self, desc: str, total: int) -> None:
        """Start the bar again for another stage of the run (SHOT++'s rotation pre-training and labeling
        transfer, around its adaptation loop): its own name and length, counted from zero."""
        self.desc, self.total, self.count, self._last_status = desc, total, 0, 0.0
        self.bar.reset(total=total)
        self.bar.set_description(desc, refresh=False)

    def write(self, message: str) -> None:
        """Print a line without breaking the progress bar."""
        self.bar.write(message)

    def flush(self) -> None:
        self.writer.flush()

    def close(self) -> None:
        self.bar.close()
        self.writer.close()


def _flatten(config: Mapping[str, Any], prefix: str = "") -> dict:
    """{"agent": {"lr": 1}} -> {"agent.lr": 1}; lists and None stay values."""
    flat = {}
    for key, value in config.items():
        if isinstance(value, Mapping) and value:
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = "None" if value is None else value
    return flat


def read_scalars(run_dir: str | os.PathLike, tags) -> dict[str, list[tuple[int, float]]]:
    """The (step, value) points of each tag in `tags` from a run directory's TensorBoard events (every
    event file in it, so a resumed run's curve is whole); a tag never written gets []."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run_dir), size_guidance={"scalars": 0, "images": 1, "tensors": 1})
    events.Reload()
    written = set(events.Tags().get("scalars", []))
    return {tag: [(e.step, e.value) for e in events.Scalars(tag)] if tag in written else [] for tag in tags}


def plot_learning_curve(path: str | os.PathLike, curves: Mapping[str, list[tuple[int, float]]],
                        levels: Mapping[str, float] | None = None, title: str = "",
                        xlabel: str = "env steps", ylabel: str = "episode return") -> Path:
    """A PNG of `curves` ({label: [(step, value), ...]}) against steps, with `levels` ({label: value}) as
    dashed horizontal lines (a baseline such as the random policy's return). Matplotlib's object API and
    the Agg canvas: no pyplot state, no display needed. Written atomically; WriteError on failure."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7, 4.2), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    for label, points in curves.items():
        if points:
            steps, values = zip(*points)
            ax.plot(steps, values, marker="o" if len(points) < 30 else None, markersize=3, label=label)
    for (label, value), style in zip((levels or {}).items(), itertools.cycle(("--", ":", "-."))):
        ax.axhline(value, linestyle=style, color="grey", label=label)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(loc="best", fontsize="small")
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    return atomic_write(path, lambda f: f.write(buffer.getvalue()))


class NullLogger:
    """RunLogger's interface doing nothing: what the non-zero ranks of a torchrun job log with, so
    that only rank 0 writes TensorBoard events and prints progress."""

    def __init__(self, *args, **kwargs):
        self.count = kwargs.get("initial", 0)

    def scalars(self, prefix: str, values: Mapping[str, float], step: int) -> None:
        pass

    def config(self, config: Mapping[str, Any], metrics: tuple[str, ...] = (), step: int = 0) -> None:
        pass

    def video(self, tag: str, frames: np.ndarray, step: int, fps: int = 15) -> None:
        pass

    def stage(self, desc: str, total: int) -> None:
        self.count = 0

    def advance(self, n: int, status_every: float = 10.0, **postfix: float) -> None:
        self.count += n

    def write(self, message: str) -> None:
        pass

    def flush(self) -> None:
        pass

    def close(self) -> None:
        pass


def run_logger(is_main: bool, *args, **kwargs) -> RunLogger | NullLogger:
    """A RunLogger on the process that writes (rank 0), a NullLogger on every other rank."""
    return RunLogger(*args, **kwargs) if is_main else NullLogger(*args, **kwargs)
