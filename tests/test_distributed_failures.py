"""torchrun jobs that fail: a failing worker ends the job within seconds with its error, and bad input
stops every worker with one line. Each test launches real `torchrun` jobs of 2 gloo processes on the CPU.

- PPO, Rainbow, train-source and adapt with an error injected on rank 1 mid-run: the job ends well inside
  the time limit (before this, PPO and Rainbow hung until the 30-minute collective timeout), rank 1's
  error is in the log, rank 0 says in one line that another worker failed (no traceback of its own),
  and the checkpoint written before the failure loads with the step it was written at;
- a worker that torchrun terminates (SIGTERM) while it is in no collective says so in one line;
- a missing target under torchrun: the one error line, no worker traceback;
- a GPU job's process group carries gloo for CPU tensors beside NCCL (checked without a GPU);
- a torchrun job of one process joins a group of one and runs its collectives.
"""

import os
import re
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from workbench.checkpoint import load_checkpoint

ROOT = Path(__file__).resolve().parents[1]
LIMIT = 150  # seconds a failing job may take here (2 shared cores; it took about 20-40 s when written)

# Runs an entry point as a torchrun worker, with an error injected on rank 1 at the Nth call of a function.
WORKER = textwrap.dedent("""
    import importlib, os, sys
    sys.path.insert(0, {root!r})
    target, calls, entry = os.environ["FAIL_AT"], int(os.environ["FAIL_AFTER"]), os.environ["ENTRY"]
    if os.environ["RANK"] == "1" and calls:
        module_name, _, attribute = target.partition(":")
        owner = importlib.import_module(module_name)
        *path, name = attribute.split(".")
        for part in path:
            owner = getattr(owner, part)
        real, count = getattr(owner, name), [0]

        def failing(*args, **kwargs):
            count[0] += 1
            if count[0] == calls:
                raise RuntimeError("injected failure on rank 1")
            return real(*args, **kwargs)

        setattr(owner, name, failing)
    module_name, _, function = entry.partition(":")
    sys.exit(getattr(importlib.import_module(module_name), function)(sys.argv[1:]))
""")


def torchrun(tmp_path: Path, entry: str, argv: list[str], fail_at: str = "", fail_after: int = 0,
             processes: int = 2) -> tuple[subprocess.CompletedProcess, float]:
    script = tmp_path / "worker.py"
    script.write_text(WORKER.format(root=str(ROOT)))
    env = dict(os.environ, FAIL_AT=fail_at, FAIL_AFTER=str(fail_after), ENTRY=entry, OMP_NUM_THREADS="1",
               PYTHONUNBUFFERED="1")
    start = time.time()
    try:
        result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node",
                                 str(processes), str(script), *argv], cwd=tmp_path, env=env, capture_output=True,
                                text=True, timeout=LIMIT)
    except subprocess.TimeoutExpired as exc:
        pytest.fail(f"the job was still running after {LIMIT} s (a worker waits in a collective): "
                    f"{(exc.stderr or b'')[-2000:]!r}")
    return result, time.time() - start


def assert_failed_cleanly(result: subprocess.CompletedProcess) -> None:
    """Rank 1's injected error is in the log; rank 0 reports it in one line, without a traceback of its own."""
    log = result.stdout + result.stderr
    assert result.returncode != 0
    assert "RuntimeError: injected failure on rank 1" in log, log[-3000:]
    # in its collective (the peer's connection closed) or, if it was between collectives, on torchrun's SIGTERM
    assert re.search(r"^error: worker 0 stopped because (another worker of the job failed|torchrun ended the job)",
                     log, re.M), log[-3000:]
    assert not re.search(r"^\[rank0\]:.*Traceback", log, re.M), log[-3000:]
    assert "Connection closed by peer" not in log, log[-3000:]


SLEEPER = textwrap.dedent("""
    import time
    from workbench.distributed import init_distributed, worker_main

    def body():
        group = init_distributed("cpu")
        group.barrier()
        if group.rank == 1:
            raise RuntimeError("injected failure on rank 1")
        time.sleep(100)  # rank 0 is in no collective: only torchrun's SIGTERM can stop it
        return 0

    def main(argv):
        return worker_main(body)
""")


def test_a_worker_that_torchrun_terminates_between_collectives_says_so_in_one_line(tmp_path):
    (tmp_path / "sleeper.py").write_text(SLEEPER)
    result, seconds = torchrun(tmp_path, "sleeper:main", [])
    assert_failed_cleanly(result)
    assert "torchrun ended the job" in result.stderr and seconds < 60, (seconds, result.stderr[-2000:])


PROCGEN = ["--env", "bigfish", "--num-envs", "2", "--eval-interval", "100", "--eval-episodes", "2", "--no-video",
           "--no-progress", "--device", "cpu", "--precision", "fp32", "--runs-root", "runs", "--run-name", "run"]


def test_ppo_job_with_a_failing_worker_ends_and_keeps_its_last_checkpoint(tmp_path):
    # 2 envs x 16 steps per iteration: rank 1 fails in the third rollout, after two checkpoints
    result, seconds = torchrun(tmp_path, "agents.cli:train_main", [*PROCGEN, "--num-steps", "16", "--no-mixreg",
                                                                     "--total-steps", "1000"],
                               fail_at="envs.procgen:ProcgenVecEnv.step_numpy", fail_after=40)
    assert_failed_cleanly(result)
    state = load_checkpoint(tmp_path / "runs" / "run" / "checkpoint.pt", kind="procgen-agent")
    assert state["agent_state"]["env_steps"] == 2 * 2 * 2 * 16 and state["world_size"] == 2
    assert not list((tmp_path / "runs" / "run").glob(".*.tmp"))
    print(f"PPO job with a failing worker ended in {seconds:.1f} s")


def test_rainbow_job_with_a_failing_worker_ends_and_keeps_its_checkpoint_and_replay_shards(tmp_path):
    # 64 vector steps per iteration; rank 1 fails in the second, after the first checkpoint (256 env steps)
    result, _ = torchrun(tmp_path, "agents.cli:train_main", [*PROCGEN, "--algo", "rainbow", "--no-mixreg",
                                                               "--buffer-size", "1000", "--warmup-steps", "64",
                                                               "--batch-size", "8", "--update-every", "8",
                                                               "--save-replay", "--total-steps", "10000"],
                         fail_at="envs.procgen:ProcgenVecEnv.step_numpy", fail_after=100)
    assert_failed_cleanly(result)
    run = tmp_path / "runs" / "run"
    state = load_checkpoint(run / "checkpoint.pt", kind="procgen-agent")
    assert state["agent_state"]["env_steps"] == 64 * 2 * 2 and "replay" not in state["agent_state"]
    replays = []
    for rank in range(2):  # every worker's own replay, written by that worker, named by the checkpoint
        shard = load_checkpoint(run / state["ranks"][rank]["shard"], kind="procgen-agent-shard")
        assert shard["rank"] == rank and shard["env_steps"] == 256
        replays.append(shard["agent_state"]["replay"])
        assert replays[-1]["t"] == 64  # rows of 2 transitions written in the first iteration
    assert not (replays[0]["obs"][:64] == replays[1]["obs"][:64]).all()  # two workers' own envs
    assert sorted(p.name for p in (run / "ranks").iterdir()) == ["rank-0.step-256.pt", "rank-1.step-256.pt"]


@pytest.fixture(scope="module")
def class_folders(tmp_path_factory):
    from test_distributed_adapt import write_domain

    root = tmp_path_factory.mktemp("domains")
    return write_domain(root / "source", False), write_domain(root / "target", True)


def test_source_training_with_a_failing_worker_ends_and_keeps_its_training_state(tmp_path, class_folders):
    source, _ = class_folders
    # 19 images per rank, batches of 8: 3 steps an epoch, 9 in all, each one checked and its state written
    result, _ = torchrun(tmp_path, "adaptation.cli:train_source_main",
                         ["--data", str(source), "--backbone", "lenet", "--epochs", "3", "--batch-size", "8",
                          "--transform", "digits", "--device", "cpu", "--out", "src", "--no-progress"],
                         fail_at="adaptation.classification.source:take_step", fail_after=5)
    assert_failed_cleanly(result)
    state = load_checkpoint(tmp_path / "src" / "train-state.pt", kind="source-training")
    assert state["step"] == 4
    load_checkpoint(tmp_path / "src" / "source.pt", kind="source-model")
    assert not (tmp_path / "src" / "metrics.json").exists()


@pytest.fixture(scope="module")
def source_run(tmp_path_factory, class_folders):
    from adaptation.classification.source import SourceConfig, train_source

    out = tmp_path_factory.mktemp("source") / "run"
    train_source(SourceConfig(data=str(class_folders[0]), backbone="lenet", epochs=2, batch_size=8,
                              transform="digits", device="cpu", run_dir=str(out), progress=False))
    return out


def test_adaptation_with_a_failing_worker_ends_and_writes_no_partial_result(tmp_path, class_folders, source_run):
    result, _ = torchrun(tmp_path, "adaptation.cli:adapt_main",
                         ["--method", "shot", "--source", str(source_run), "--target", str(class_folders[1]),
                          "--epochs", "2", "--batch-size", "8", "--device", "cpu", "--out", "adapt", "--no-progress"],
                         fail_at="workbench.adapt.loop:take_step", fail_after=3)
    assert_failed_cleanly(result)
    assert not (tmp_path / "adapt" / "adapted.pt").exists() and not (tmp_path / "adapt" / "metrics.json").exists()


def test_bad_input_under_torchrun_is_one_line_from_every_worker_alike(tmp_path, source_run):
    result, _ = torchrun(tmp_path, "adaptation.cli:adapt_main",
                         ["--source", str(source_run), "--target", str(tmp_path / "nowhere.txt"), "--device", "cpu",
                          "--out", "adapt", "--no-progress"])
    assert result.returncode != 0
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "nowhere.txt" in errors[0], result.stderr[-3000:]
    assert not re.search(r"^\[rank\d\]:", result.stderr, re.M), result.stderr[-3000:]  # no worker traceback
    assert not (tmp_path / "adapt").exists()


# ------------------------------------------------------------------ the process group itself
def test_a_gpu_job_joins_a_group_with_gloo_for_cpu_tensors_beside_nccl(monkeypatch):
    """Without a GPU here, init_distributed is shown a CUDA machine; the group it asks for must carry a CPU
    backend, or every CPU tensor a collective sends (PPO's reward statistics) has no backend on GPUs."""
    import torch.distributed as dist

    from workbench import distributed

    asked = []
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "set_device", lambda device: None)
    monkeypatch.setattr(dist, "is_initialized", lambda: False)
    monkeypatch.setattr(dist, "init_process_group", lambda backend: asked.append(backend))
    monkeypatch.setattr(dist, "get_rank", lambda: 1)
    monkeypatch.setattr(dist, "get_world_size", lambda: 2)
    world = distributed.init_distributed("auto")
    assert asked == ["cpu:gloo,cuda:nccl"]
    assert (world.rank, world.world_size, world.local_rank, world.enabled) == (1, 2, 1, True)


def test_a_torchrun_job_of_one_process_runs_its_collectives(monkeypatch):
    import torch.distributed as dist

    from workbench.distributed import free_port, init_distributed, shutdown_distributed

    for name, value in dict(TORCHELASTIC_RUN_ID="test", WORLD_SIZE="1", RANK="0", LOCAL_RANK="0",
                            MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port())).items():
        monkeypatch.setenv(name, value)
    world = init_distributed("cpu")
    try:
        assert world.enabled and world.world_size == 1 and dist.is_initialized()
        assert world.mean({"loss": 2.5}) == {"loss": 2.5}
        assert torch.equal(world.gather_cat(torch.arange(3)), torch.arange(3))
    finally:
        shutdown_distributed()
    assert not dist.is_initialized()
