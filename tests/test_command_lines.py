"""What a user gets from the commands when an input or an output goes wrong: one line and nothing lost.

- every numeric option out of range stops at parse time with one line naming the option;
- an --out (or --run-name) that holds a run is refused unless --overwrite, and the run stays as it was;
- a write that fails (a full disk, a file-size limit) is one line naming the file, and the previous
  checkpoint still loads.
"""

import errno
import hashlib
import json
import os
import resource
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from adaptation.cli import adapt_main, datasets_main, evaluate_main, train_source_main
from agents.cli import evaluate_main as evaluate_procgen_main
from agents.cli import train_main
from workbench.checkpoint import load_checkpoint, save_checkpoint
from workbench.files import WriteError
from workbench.logging import write_json

ROOT = Path(__file__).resolve().parents[1]

BAD_NUMBERS = [
    (train_main, ["--num-envs", "0"], "--num-envs"),
    (train_main, ["--num-steps", "-16"], "--num-steps"),
    (train_main, ["--total-steps", "0"], "--total-steps"),
    (train_main, ["--total-steps", "1.5e2.1"], "--total-steps"),
    (train_main, ["--lr", "0"], "--lr"),
    (train_main, ["--mix-alpha", "-0.2"], "--mix-alpha"),
    (train_main, ["--reward-norm-gamma", "1.5"], "--reward-norm-gamma"),
    (train_main, ["--algo", "rainbow", "--batch-size", "0"], "--batch-size"),
    (train_main, ["--buffer-size", "-1"], "--buffer-size"),
    (train_main, ["--eval-episodes", "0"], "--eval-episodes"),
    (train_main, ["--seed", "-3"], "--seed"),
    (evaluate_procgen_main, ["random:coinrun", "--episodes", "0"], "--episodes"),
    (evaluate_procgen_main, ["random:coinrun", "--num-envs", "zero"], "--num-envs"),
    (train_source_main, ["--epochs", "0"], "--epochs"),
    (train_source_main, ["--batch-size", "1"], "--batch-size"),
    (train_source_main, ["--label-noise", "1.0"], "--label-noise"),
    (train_source_main, ["--num-classes", "1"], "--num-classes"),
    (train_source_main, ["--lr", "-0.01"], "--lr"),
    (adapt_main, ["--source", "s", "--target", "t", "--batch-size", "0"], "--batch-size"),
    (adapt_main, ["--source", "s", "--target", "t", "--epochs", "0"], "--epochs"),
    (adapt_main, ["--source", "s", "--target", "t", "--beta", "-1"], "--beta"),
    (adapt_main, ["--source", "s", "--target", "t", "--ema-alpha", "1.5"], "--ema-alpha"),
    (adapt_main, ["--source", "s", "--target", "t", "--mask-ratio", "1"], "--mask-ratio"),
    (adapt_main, ["--source", "s", "--target", "t", "--transfer-batch-size", "1"], "--transfer-batch-size"),
    (adapt_main, ["--source", "s", "--target", "t", "--frames", "0"], "--frames"),
    (evaluate_main, ["--model", "m", "--data", "d", "--steps", "0"], "--steps"),
    (evaluate_main, ["--model", "m", "--data", "d", "--eps", "2"], "--eps"),
]


@pytest.mark.parametrize("main, argv, option", BAD_NUMBERS, ids=[f"{m.__module__}.{m.__name__} {' '.join(a)}"
                                                                   for m, a, _ in BAD_NUMBERS])
def test_a_number_out_of_range_stops_at_parse_time_with_one_line(main, argv, option, capsys):
    with pytest.raises(SystemExit) as stop:
        main(argv)
    assert stop.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and f"argument {option}" in err[0], err
    assert "must be" in err[0] and "--help" in err[0]


def test_any_usage_error_is_one_line(capsys):
    with pytest.raises(SystemExit):
        datasets_main(["bogus"])
    assert len(capsys.readouterr().err.strip().splitlines()) == 1


# ------------------------------------------------------------------ a taken run directory
def fingerprint(run: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(run.iterdir()) if p.is_file()}


def assert_refused(capsys, code: int, run: Path, before: dict, *words: str) -> None:
    assert code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and str(run) in err[0] and "--overwrite" in err[0], err
    assert all(word in err[0] for word in words), err
    assert fingerprint(run) == before  # nothing of the finished run was touched


@pytest.fixture(scope="module")
def domains(tmp_path_factory):
    from test_distributed_adapt import write_domain

    root = tmp_path_factory.mktemp("domains")
    return write_domain(root / "source", False), write_domain(root / "target", True)


def test_train_source_into_a_finished_run_is_refused_unless_overwrite(tmp_path, domains, capsys):
    run = tmp_path / "src"
    argv = ["--data", str(domains[0]), "--backbone", "lenet", "--epochs", "1", "--batch-size", "8", "--transform",
            "digits", "--device", "cpu", "--out", str(run), "--no-progress"]
    assert train_source_main(argv) == 0
    capsys.readouterr()
    before = fingerprint(run)
    assert_refused(capsys, train_source_main(argv), run, before, "finished run", "--resume")
    assert train_source_main([*argv, "--overwrite"]) == 0
    assert len(list(run.glob("events.out.tfevents.*"))) == 1  # the earlier run's curves were removed


def test_adapt_into_a_finished_run_is_refused_unless_overwrite(tmp_path, domains, capsys):
    from adaptation.classification.source import SourceConfig, train_source

    source, run = tmp_path / "src", tmp_path / "adapted"
    train_source(SourceConfig(data=str(domains[0]), backbone="lenet", epochs=1, batch_size=8, transform="digits",
                              device="cpu", run_dir=str(source), progress=False))
    argv = ["--method", "shot-im", "--source", str(source), "--target", str(domains[1]), "--epochs", "1",
            "--batch-size", "8", "--device", "cpu", "--out", str(run), "--no-progress"]
    assert adapt_main(argv) == 0
    capsys.readouterr()
    before = fingerprint(run)
    assert {"adapted.pt", "metrics.json", "predictions.csv"} <= set(before)
    assert_refused(capsys, adapt_main(argv), run, before, "finished run")
    assert adapt_main([*argv, "--overwrite"]) == 0
    assert fingerprint(run)["metrics.json"] != before["metrics.json"]  # a new run wrote there
    assert len(list(run.glob("events.out.tfevents.*"))) == 1


PROCGEN = ["--env", "bigfish", "--num-envs", "2", "--num-steps", "16", "--no-mixreg", "--eval-interval", "100",
           "--eval-episodes", "2", "--no-video", "--no-progress", "--device", "cpu", "--precision", "fp32"]


def test_train_procgen_into_a_taken_run_name_is_refused_unless_overwrite(tmp_path, capsys):
    argv = [*PROCGEN, "--total-steps", "32", "--runs-root", str(tmp_path), "--run-name", "run"]
    assert train_main(argv) == 0
    capsys.readouterr()
    run = tmp_path / "run"
    before = fingerprint(run)
    assert_refused(capsys, train_main(argv), run, before, "--resume")
    assert train_main([*argv, "--overwrite"]) == 0
    assert load_checkpoint(run / "checkpoint.pt", kind="procgen-agent")["agent_state"]["env_steps"] == 32


def test_train_procgen_without_a_run_name_writes_its_run_under_runs_root(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # a run that ignored --runs-root would land in ./runs
    root = tmp_path / "elsewhere"
    assert train_main([*PROCGEN, "--total-steps", "32", "--runs-root", str(root)]) == 0
    runs = list(root.iterdir())
    assert len(runs) == 1 and runs[0].name.startswith("bigfish-ppo-s0-"), runs
    assert load_checkpoint(runs[0] / "checkpoint.pt", kind="procgen-agent")["agent_state"]["env_steps"] == 32
    assert not (tmp_path / "runs").exists()


# ------------------------------------------------------------------ a write that fails
def test_a_checkpoint_write_that_fails_is_one_line_and_keeps_the_previous_file(tmp_path, monkeypatch):
    path = tmp_path / "checkpoint.pt"
    save_checkpoint(path, "procgen-agent", {"step": 1, "weights": torch.arange(4.0)})
    real_save = torch.save

    def disk_full(obj, f):  # what torch.save does on a full disk: some bytes out, then the error, wrapped
        f.write(b"half a checkpoint")
        try:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        except OSError:
            raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 64 vs 0")

    monkeypatch.setattr(torch, "save", disk_full)
    with pytest.raises(WriteError) as failure:
        save_checkpoint(path, "procgen-agent", {"step": 2, "weights": torch.zeros(4)})
    message = str(failure.value)
    assert "\n" not in message and str(path) in message and "[Errno 28] No space left on device" in message
    assert "previous version is kept" in message
    monkeypatch.setattr(torch, "save", real_save)
    kept = load_checkpoint(path, kind="procgen-agent")
    assert kept["step"] == 1 and torch.equal(kept["weights"], torch.arange(4.0))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint.pt"]  # no temporary file left


def test_a_json_write_that_fails_is_one_line_and_keeps_the_previous_file(tmp_path, monkeypatch):
    path = write_json(tmp_path / "metrics.json", {"accuracy": 1.0})

    def refuse(src, dst):
        raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(dst))

    monkeypatch.setattr(os, "replace", refuse)
    with pytest.raises(WriteError, match=r"cannot write .*metrics.json: \[Errno 13\] Permission denied"):
        write_json(path, {"accuracy": 2.0})
    assert json.loads(path.read_text()) == {"accuracy": 1.0}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["metrics.json"]


def test_training_whose_checkpoint_cannot_be_written_stops_with_one_line_and_keeps_the_last(tmp_path):
    """A real failing write: the resumed run may not write files larger than half its checkpoint (a file-size
    limit, as a nearly full disk would), so its first checkpoint fails."""
    assert train_main([*PROCGEN, "--total-steps", "32", "--runs-root", str(tmp_path), "--run-name", "run"]) == 0
    run = tmp_path / "run"
    saved = (run / "checkpoint.pt").read_bytes()
    limit = len(saved) // 2

    def small_files():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # the write fails with EFBIG instead of killing the process
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    result = subprocess.run([sys.executable, str(ROOT / "scripts" / "train_procgen.py"), "--resume", str(run),
                             "--total-steps", "64", "--no-progress"], capture_output=True, text=True, timeout=600,
                            preexec_fn=small_files, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert result.returncode == 1, result.stderr[-2000:]
    err = result.stderr.strip().splitlines()
    assert "Traceback" not in result.stderr and len(err) == 1, result.stderr[-2000:]
    assert err[0].startswith(f"error: cannot write {run / 'checkpoint.pt'}: [Errno 27] File too large"), err
    assert (run / "checkpoint.pt").read_bytes() == saved
    assert load_checkpoint(run / "checkpoint.pt", kind="procgen-agent")["agent_state"]["env_steps"] == 32
    assert not list(run.glob(".*.tmp"))


# ------------------------------------------------------------------ the task registry
def test_every_method_says_which_tasks_it_supports():
    from workbench.tasks import TASKS, load_task, method_tasks, tasks_with

    methods = method_tasks()
    assert methods["mean-teacher"] == ["pose"] and methods["shot++"] == ["classification"]
    assert methods["shot"] == ["classification", "segmentation", "procgen"]
    # agents train elsewhere; tracking has no model of its own (it runs a detector and a pose model)
    assert tasks_with("train_source") == ["classification", "segmentation", "pose", "detection"]
    assert tasks_with("adapt_config") == ["classification", "segmentation", "pose", "procgen"]
    assert [load_task(t).BUILTIN for t in tasks_with("build_builtin")] == ["digits", "scenes", "figures", "crowds"]
    assert list(TASKS) == ["classification", "segmentation", "pose", "detection", "tracking", "procgen"]


def test_a_method_the_task_lacks_is_one_line_naming_where_it_runs(capsys):
    # a procgen target picks the task without reading the source, so the method check comes first
    assert adapt_main(["--source", "nowhere", "--target", "procgen:bigfish", "--method", "mean-teacher"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["error: --method mean-teacher does not run on procgen (mean-teacher runs on pose): choose one "
                   "of shot-im, shot, anchored-im, bufr, pad"]


@pytest.mark.parametrize("main, argv, line", [
    (adapt_main, ["--source", "nowhere", "--target", "procgen:bigfish", "--ema-alpha", "0.9"],
     "--ema-alpha applies to pose adapt, not procgen: drop it"),
    (adapt_main, ["--source", "nowhere", "--target", "procgen:bigfish", "--precision", "bf16"],
     "--precision applies to segmentation and pose adapt, not procgen: drop it"),
    (adapt_main, ["--source", "nowhere", "--target", "procgen:bigfish", "--test-on", "x"],
     "--test-on applies to classification, segmentation and pose adapt, not procgen: drop it"),
    (adapt_main, ["--source", "nowhere", "--target", "procgen:bigfish", "--workers", "2"],
     "--workers applies to classification, segmentation and pose adapt, not procgen: drop it"),
    (adapt_main, ["--task", "pose", "--source", "nowhere", "--target", "t", "--frames", "64"],
     "--frames applies to procgen adapt, not pose: drop it"),
    (train_source_main, ["--task", "pose", "--objective", "at"],
     "--objective applies to classification train-source, not pose: drop it"),
    (train_source_main, ["--task", "pose", "--num-classes", "3"],
     "--num-classes applies to classification and segmentation train-source, not pose: drop it"),
    (evaluate_main, ["--task", "segmentation", "--model", "m", "--data", "d", "--attack", "pgd"],
     "--attack applies to classification evaluate, not segmentation: drop it"),
])
def test_an_option_of_another_task_is_one_line_not_ignored(main, argv, line, capsys):
    assert main(argv) == 2
    assert capsys.readouterr().err.strip().splitlines() == [f"error: {line}"]


def test_a_new_task_brings_its_own_options_without_editing_the_command_line(monkeypatch, tmp_path, capsys):
    """A task module with `add_adapt_options` adds its group to `workbench adapt` through the registry; an
    option it shares with another task is one option whose help names both; its options are refused
    elsewhere."""
    import types

    from adaptation.cli import _adapt_parser
    from workbench import tasks

    toy = types.ModuleType("toy_task")
    toy.METHODS, toy.DISTRIBUTED = ("tent",), False
    toy.adapt_defaults = lambda: types.SimpleNamespace(method="tent")

    def add_adapt_options(options):
        options.add_argument("--toy-steps", type=int, default=3, help="steps per toy batch")
        options.add_argument("--test-on", default=None, help="toy held-out data")

    toy.add_adapt_options, toy.adapt_config = add_adapt_options, lambda a: a
    monkeypatch.setitem(tasks.TASKS, "toy", "toy_task")
    monkeypatch.setitem(sys.modules, "toy_task", toy)
    parser, options = _adapt_parser()
    help_text = " ".join(parser.format_help().split())
    assert "toy options: --toy-steps TOY_STEPS toy: steps per toy batch" in help_text
    assert "toy: toy held-out data" in help_text and "classification: held-out target data" in help_text
    args = parser.parse_args(["--source", "s", "--target", "t", "--toy-steps", "5", "--test-on", "x"])
    options.check(args, "toy")
    with pytest.raises(ValueError, match="--toy-steps applies to toy adapt, not classification"):
        options.check(args, "classification")


def test_an_option_two_tasks_declare_with_different_defaults_is_refused():
    from workbench.arguments import ArgumentParser, TaskOptions

    options = TaskOptions(ArgumentParser(prog="x"), "x")
    options.for_task("a").add_argument("--steps", type=int, default=3, help="a's")
    with pytest.raises(ValueError, match="--steps: b gives default 4, a 3; one option has one default"):
        options.for_task("b").add_argument("--steps", type=int, default=4, help="b's")
    options.parser.add_argument("--seed", default=0)
    with pytest.raises(ValueError, match="--seed is a common option of x; b must not add it"):
        options.for_task("b").add_argument("--seed", default=0, help="b's")


def test_output_into_a_closed_pipe_ends_quietly(tmp_path, monkeypatch, capsys):
    """`workbench datasets list | head -1`: the reader goes away; the command exits 0 without a traceback."""
    from workbench.cli import main as workbench_main

    sink = open(tmp_path / "sink", "w")

    class ClosedPipe:
        def write(self, text):
            raise BrokenPipeError(32, "Broken pipe")

        def flush(self):
            pass

        def fileno(self):
            return sink.fileno()

    monkeypatch.setattr("sys.stdout", ClosedPipe())
    assert workbench_main(["heads"]) == 0
    sink.close()
    assert capsys.readouterr().err == ""
