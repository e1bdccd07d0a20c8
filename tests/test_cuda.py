"""The GPU check suite: `python -m pytest -m cuda` runs every CUDA path of the workbench, small, on one GPU.

README asks to run it first whenever a GPU machine is at hand (a few minutes on one GPU; without
CUDA every test here is skipped, and the default `addopts` deselect the `cuda` marker altogether).
It covers, each with a check of what came out (a loss that moved, figures in range, agreement with
the CPU, files with the right content), not just the absence of a crash:

- PPO on the GPU (fp32 and bf16 autocast, mixreg): finite losses, parameters and buffers on the GPU,
  the checkpoint holds the GPU model and computes what it computes on the CPU, evaluation and resume;
  the mixreg paper's comparison regularisers (random conv, cutout-color, random crop, batch norm);
- Rainbow on the GPU (replay, C51 projection, mixreg): updates happen, the KL loss is finite;
- torchrun of one process on the GPU: the process group (`cpu:gloo,cuda:nccl`) and every collective
  helper, with CPU and GPU tensors; a PPO run, `train-source` and `adapt --method shot`, whose
  config.json and checkpoints record a world of 1 on cuda:0;
- classification: source training (plain, SAT, PGD adversarial, Core-tuning), SHOT and SHOT++, with
  the source model's GPU predictions equal to its CPU predictions;
- SHOT clusters the GPU features on the GPU; faiss's GPU index gives the torch and CPU-faiss labels;
- segmentation (pixel SHOT) and pose (mean teacher) source training and adaptation, bf16 autocast;
- Procgen agent adaptation to a visual domain;
- bf16: `auto` picks it on a GPU that computes it, and a bf16 PPO gradient points as the fp32 one.

WORKBENCH_CUDA_SUITE_DEVICE=cpu runs these tests on the CPU instead (skipping the few that only mean
something on a GPU): it checks the suite itself, not the GPU paths.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import subprocess
import sys
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
SUITE_DEVICE_VARIABLE = "WORKBENCH_CUDA_SUITE_DEVICE"
DEVICE = os.environ.get(SUITE_DEVICE_VARIABLE, "cuda")
if DEVICE not in ("cuda", "cpu"):
    raise ValueError(f"{SUITE_DEVICE_VARIABLE}={DEVICE!r}: use cuda (the default) or cpu")
ON_GPU = DEVICE == "cuda"
# The device a torchrun worker reports: its own GPU (LOCAL_RANK 0), or the CPU.
TORCHRUN_DEVICE = "cuda:0" if ON_GPU else "cpu"

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(ON_GPU and not torch.cuda.is_available(),
                       reason=f"no CUDA GPU visible: this is the GPU check suite ({SUITE_DEVICE_VARIABLE}=cpu runs it "
                              f"on the CPU to check the suite itself)"),
]
gpu_only = pytest.mark.skipif(not ON_GPU, reason=f"{SUITE_DEVICE_VARIABLE}=cpu: this check means something on a "
                                                 f"GPU only")

# bf16 autocast for the dense pipelines on the GPU; on a CPU without native bf16 it is emulated and takes minutes
DENSE_PRECISION = "bf16" if ON_GPU else "fp32"
COMMAND_TIMEOUT = 300 if ON_GPU else 600  # seconds for one torchrun command (a few on a GPU)
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "1"]
CLASSES, IMAGES_PER_CLASS = 3, 14
PROCGEN_TARGET = "procgen:bigfish:no-backgrounds+monochrome"


@pytest.fixture
def device() -> str:
    """The device every test runs on: cuda, or cpu under WORKBENCH_CUDA_SUITE_DEVICE=cpu."""
    return DEVICE


# ------------------------------------------------------------------ helpers
@contextmanager
def exact_fp32():
    """TF32 off (Runtime.create turns it on for CUDA), so that fp32 on the GPU matches the CPU to rounding."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def on_device(tensor: torch.Tensor) -> bool:
    return tensor.device.type == DEVICE


def read_json(path) -> dict:
    return json.loads(Path(path).read_text())


def finite(value) -> bool:
    return value is not None and math.isfinite(float(value))


def percent(value) -> bool:
    return finite(value) and 0.0 <= float(value) <= 100.0


def run_command(args: list[str], timeout: int = COMMAND_TIMEOUT) -> str:
    """Run a command from the repository root in a session of its own; its output, after checking it exited 0.
    On a timeout the whole session (torchrun and its worker) is killed."""
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR",
                                                             "MASTER_PORT", "TORCHELASTIC_RUN_ID")}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])])
    proc = subprocess.Popen(args, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    try:
        output, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        output, _ = proc.communicate()
        pytest.fail(f"{' '.join(args)} did not finish within {timeout} s:\n{output[-6000:]}")
    assert proc.returncode == 0, f"{' '.join(args)} exited {proc.returncode}:\n{output[-6000:]}"
    return output


def write_domain(root: Path, inverted: bool) -> Path:
    """Class folders of 32x32 images: class c is a bright horizontal band at height c (inverted: dark on bright)."""
    g = np.random.default_rng(1 if inverted else 0)
    for c in range(CLASSES):
        folder = root / f"class{c}"
        folder.mkdir(parents=True)
        for i in range(IMAGES_PER_CLASS):
            img = g.normal(60, 25, (32, 32, 3))
            top = 4 + 9 * c + int(g.integers(-2, 3))
            img[top:top + 6] += 150
            img = 255 - img if inverted else img
            Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(folder / f"{i}.png")
    return root


def changed(before: dict, after: dict, prefix: str = "") -> bool:
    """Whether any floating-point tensor under `prefix` differs between two state dicts (compared on the CPU)."""
    return any(not torch.equal(before[k].cpu(), after[k].cpu()) for k in before
               if k.startswith(prefix) and before[k].is_floating_point())


# ------------------------------------------------------------------ PPO
def tiny_ppo(run_dir, precision: str, total_steps: int, **agent):
    """PPO with mixreg (the paper's default), 4 envs x 32 steps an iteration, on the suite's device."""
    from agents.train import TrainConfig

    return TrainConfig(env="bigfish", total_steps=total_steps, eval_interval=2, eval_episodes=2, num_test_envs=2,
                       device=DEVICE, precision=precision, run_dir=str(run_dir), progress=False, video=False,
                       agent={"num_envs": 4, "num_steps": 32, "num_minibatches": 4, "mixreg": True, **agent})


def run_recording(trainer) -> tuple[dict, list[dict], dict, dict]:
    """Run a Trainer, recording each iteration's losses, the dtypes the backbone computed in (inside the
    training iterations, and after them: the end-of-run pass that measures BUFR's feature statistics), and the
    parameters it started from."""
    agent, iterations, dtypes = trainer.agent, [], {"training": set(), "after": set()}
    model = agent.model if hasattr(agent, "model") else agent.online
    initial = {k: v.detach().clone() for k, v in model.state_dict().items()}
    real, phase = agent.train_iteration, ["after"]

    def train_iteration(should_stop):
        phase[0] = "training"
        try:
            metrics = real(should_stop)
        finally:
            phase[0] = "after"
        iterations.append(metrics)
        return metrics

    agent.train_iteration = train_iteration
    hook = model.backbone.register_forward_hook(lambda module, args, out: dtypes[phase[0]].add(out.dtype))
    try:
        metrics = trainer.run()
    finally:
        hook.remove()
    return metrics, iterations, dtypes, initial


def skip_evaluations(trainer) -> list[int]:
    """Leave out a run's test episodes (the steps at which they were due are recorded): an episode of a barely
    trained agent can last 1000 steps, one forward each (a minute on a CPU). Acting on the device is what the
    rollouts do anyway; the fp32 PPO run, its resume and the torchrun run keep their evaluations."""
    due: list[int] = []

    def evaluate(logger=None, record_video=False):
        due.append(trainer.agent.env_steps)
        return {"episodes": 0, "mean_return": float("nan"), "normalized_score": float("nan")}

    trainer.evaluate = evaluate
    return due


def check_ppo_losses(iterations: list[dict]) -> None:
    for m in iterations:
        for key in ("policy_loss", "value_loss", "entropy", "approx_kl", "clip_fraction", "grad_norm"):
            assert finite(m[key]), (key, m)
        assert m["value_loss"] >= 0 and m["grad_norm"] > 0 and 0 <= m["clip_fraction"] <= 1, m
        assert 0 < m["entropy"] <= math.log(15) + 1e-4, m  # a distribution over bigfish's 15 actions


@pytest.fixture(scope="module")
def ppo_run(tmp_path_factory):
    """A 2-iteration fp32 PPO run on the device: (run dir, trainer, metrics, per-iteration losses, dtypes, start)."""
    from agents.train import Trainer

    run = tmp_path_factory.mktemp("ppo") / "run"
    trainer = Trainer(tiny_ppo(run, "fp32", total_steps=256))
    metrics, iterations, dtypes, initial = run_recording(trainer)
    return run, trainer, metrics, iterations, dtypes, initial


def test_ppo_trains_on_the_device_and_its_checkpoint_computes_the_same_on_the_cpu(ppo_run):
    from agents.ppo import ActorCritic
    from workbench.backbones import create_backbone
    from workbench.checkpoint import load_checkpoint

    run, trainer, metrics, iterations, dtypes, initial = ppo_run
    agent = trainer.agent
    assert metrics["env_steps"] == 256 and metrics["iterations"] == 2 and metrics["world_size"] == 1
    assert torch.device(metrics["device"]).type == DEVICE and metrics["precision"] == "fp32"
    assert metrics["test"]["episodes"] == 2 and finite(metrics["test"]["mean_return"])
    assert len(iterations) == 2
    check_ppo_losses(iterations)
    assert dtypes == {"training": {torch.float32}, "after": {torch.float32}}
    assert all(on_device(p) for p in agent.model.parameters())
    assert all(on_device(t) for t in agent.buffer.values()), "the rollout buffer lives on the device"
    assert all(on_device(s["exp_avg"]) for s in agent.optimizer.state.values())
    assert changed(initial, agent.model.state_dict()), "two PPO updates left the weights as they were"
    written = read_json(run / "metrics.json")
    assert written["env_steps"] == 256 and torch.device(written["device"]).type == DEVICE
    assert torch.device(read_json(run / "config.json")["runtime"]["device"]).type == DEVICE

    saved = load_checkpoint(run, kind="procgen-agent")
    assert saved["agent_state"]["env_steps"] == 256 and saved["world_size"] == 1
    live = agent.model.state_dict()
    for name, tensor in saved["agent_state"]["model"].items():
        assert tensor.device.type == "cpu" and torch.equal(tensor, live[name].cpu()), name
    # the saved weights on the CPU compute what the device model computes
    cpu_model = ActorCritic(create_backbone("impala_1x"), 15)
    cpu_model.load_state_dict(saved["agent_state"]["model"])
    obs = torch.randint(0, 256, (16, 64, 64, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    agent.model.eval()
    with torch.no_grad(), exact_fp32():
        logits, values = agent.model(obs.to(agent.rt.device))
        cpu_logits, cpu_values = cpu_model.eval()(obs)
    assert on_device(logits)
    torch.testing.assert_close(logits.cpu(), cpu_logits, rtol=1e-2, atol=1e-3)
    torch.testing.assert_close(values.cpu(), cpu_values, rtol=1e-2, atol=1e-3)


def test_ppo_checkpoint_evaluates_and_resumes_on_the_device(ppo_run, tmp_path):
    from agents.cli import evaluate_main
    from agents.train import Trainer
    from workbench.checkpoint import load_checkpoint

    run = shutil.copytree(ppo_run[0], tmp_path / "run")
    out = tmp_path / "eval.json"
    assert evaluate_main([str(run), "--episodes", "2", "--num-envs", "2", "--device", DEVICE, "--out", str(out)]) == 0
    result = read_json(out)
    assert result["episodes"] == 2 and result["env_steps"] == 256 and finite(result["mean_return"])

    saved = load_checkpoint(run, kind="procgen-agent")
    assert ("cuda" in saved["rng"]) == torch.cuda.is_available()  # the GPU generators travel with the run
    resumed = Trainer.resume(run, total_steps=384, progress=False)
    assert resumed.agent.env_steps == 256 and resumed.runtime.device.type == DEVICE
    for name, tensor in saved["agent_state"]["model"].items():
        assert torch.equal(resumed.agent.model.state_dict()[name].cpu(), tensor), name
    assert all(on_device(s["exp_avg"]) for s in resumed.agent.optimizer.state.values())
    metrics, iterations, _, initial = run_recording(resumed)
    assert metrics["env_steps"] == 384 and metrics["iterations"] == 3 and len(iterations) == 1
    check_ppo_losses(iterations)
    assert changed(initial, resumed.agent.model.state_dict())
    assert load_checkpoint(run)["agent_state"]["env_steps"] == 384


def test_ppo_trains_under_bf16_autocast_on_the_device(tmp_path):
    from agents.train import Trainer
    from workbench.checkpoint import load_checkpoint

    trainer = Trainer(tiny_ppo(tmp_path / "run", "bf16", total_steps=128))
    assert trainer.runtime.amp_dtype == torch.bfloat16
    due = skip_evaluations(trainer)
    metrics, iterations, dtypes, initial = run_recording(trainer)
    assert metrics["precision"] == "bf16" and metrics["env_steps"] == 128 and len(iterations) == 1 and due == [128]
    assert dtypes["training"] == {torch.bfloat16}, f"the backbone computed in {dtypes} under bf16 autocast"
    # After training, BUFR's source frames are played as the agent plays (bf16) and their statistics measured in
    # fp32, the precision the restoration computes in (agents/adapt/bufr.py)
    assert dtypes["after"] == {torch.bfloat16, torch.float32}, f"the statistics pass computed in {dtypes['after']}"
    check_ppo_losses(iterations)
    assert all(p.dtype == torch.float32 and on_device(p) for p in trainer.agent.model.parameters())
    assert changed(initial, trainer.agent.model.state_dict())
    saved = load_checkpoint(tmp_path / "run", kind="procgen-agent")
    assert saved["config"]["precision"] == "bf16" and saved["agent_state"]["env_steps"] == 128
    assert read_json(tmp_path / "run" / "config.json")["runtime"]["precision"] == "bf16"


@pytest.mark.parametrize("regularizer", ["random_conv", "cutout_color", "random_crop", "batchnorm"])
def test_ppo_comparison_regularizers_on_the_device(tmp_path, regularizer):
    """The mixreg paper's comparison regularisers: augmentation parameters drawn on the device, random conv's
    feature matching, batch norm kept in training mode."""
    from agents.train import Trainer, apply_regularizer

    trainer = Trainer(tiny_ppo(tmp_path / "run", "fp32", total_steps=128,
                               **apply_regularizer({"mixreg": False}, regularizer, 1e-4)))
    due = skip_evaluations(trainer)
    metrics, iterations, _, initial = run_recording(trainer)
    assert metrics["env_steps"] == 128 and len(iterations) == 1 and due == [128]
    check_ppo_losses(iterations)
    agent = trainer.agent
    assert changed(initial, agent.model.state_dict())
    if regularizer == "batchnorm":
        norms = [m for m in agent.model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
        assert norms and all(on_device(m.running_mean) for m in norms)
        assert any(float(m.running_var.sub(1).abs().max()) > 0 for m in norms), "the update set no statistics"
    else:
        drawn = [v for v in vars(agent.augmentation).values() if isinstance(v, torch.Tensor)]
        assert drawn and all(on_device(v) for v in drawn), "the rollout's augmentation was drawn off the device"
    if regularizer == "random_conv":
        assert finite(iterations[0]["feature_matching"]) and iterations[0]["feature_matching"] >= 0


# ------------------------------------------------------------------ Rainbow
def test_rainbow_updates_on_the_device(tmp_path):
    from agents.train import Trainer, TrainConfig
    from workbench.checkpoint import load_checkpoint

    cfg = TrainConfig(env="bigfish", algo="rainbow", total_steps=512, eval_interval=2, eval_episodes=2,
                      num_test_envs=2, device=DEVICE, precision="fp32", run_dir=str(tmp_path / "run"),
                      progress=False, video=False,
                      agent={"num_envs": 4, "buffer_size": 2048, "warmup_steps": 128, "batch_size": 32,
                             "update_every": 16, "target_update": 128, "steps_per_iteration": 32, "mixreg": True})
    trainer = Trainer(cfg)
    agent = trainer.agent
    due = skip_evaluations(trainer)  # acting on the device, as evaluation acts, is checked below
    metrics, iterations, _, initial = run_recording(trainer)
    assert due == [256, 512]
    assert metrics["env_steps"] == 512 and len(iterations) == 4
    assert agent.updates > 0 and iterations[-1]["updates"] == agent.updates
    learned = [m for m in iterations if "loss" in m]
    assert learned, "no iteration reached an update"
    for m in learned:  # the importance-weighted KL to the projected target: non-negative and finite
        assert finite(m["loss"]) and m["loss"] >= 0 and finite(m["grad_norm"]), m
    assert on_device(agent.support) and all(on_device(p) for p in agent.online.parameters())
    assert all(on_device(p) for p in agent.target.parameters())
    assert changed(initial, agent.online.state_dict())
    obs = trainer.env.as_tensor(trainer.env.last_frames)
    for deterministic in (False, True):  # the noisy network, and the mean network evaluation uses
        actions = agent.act(obs, deterministic=deterministic)
        assert on_device(actions) and actions.shape == (4,) and 0 <= int(actions.min()) <= int(actions.max()) < 15
    saved = load_checkpoint(tmp_path / "run", kind="procgen-agent")["agent_state"]
    assert saved["updates"] == agent.updates and saved["env_steps"] == 512
    assert torch.equal(saved["online"]["value.weight_mu"], agent.online.value.weight_mu.detach().cpu())


# ------------------------------------------------------------------ torchrun of one process
PROBE = r'''
import json, sys
import torch
import torch.distributed as tdist
from workbench.distributed import init_distributed, shutdown_distributed
from workbench.runtime import Runtime

device, out = sys.argv[1], sys.argv[2]
d = init_distributed(device)
rt = Runtime.create(device, "fp32", distributed=d)
dev = rt.device
r = {"enabled": d.enabled, "joined": d.joined, "world_size": d.world_size, "rank": d.rank,
     "backend": str(tdist.get_backend()), "device": str(dev)}
cpu = torch.arange(5, dtype=torch.float64)                       # as the PPO reward scaler's returns
gpu = torch.arange(6, dtype=torch.float32, device=dev).view(3, 2)  # as gathered features
r["gather_cat_cpu"] = d.gather_cat(cpu).tolist()
gathered = d.gather_cat(gpu)
r["gather_cat_device"], r["gather_cat_device_on"] = gathered.cpu().tolist(), str(gathered.device)
r["sum_device"] = d.sum(gpu).cpu().tolist()
r["sum_int_device"] = d.sum(torch.tensor([3, 4], device=dev)).cpu().tolist()
mean, var = d.moments(torch.tensor([1.0, 2.0, 3.0, 4.0], device=dev))
r["moments"] = [float(mean), float(var)]
r["mean"] = d.mean({"a": 1.5, "b": -2.0})
r["any"] = [d.any(True), d.any(False)]
r["objects"] = d.gather_objects({"rank": d.rank})
r["to_main"] = d.gather_objects_to_main([d.rank])
r["broadcast_object"] = d.broadcast_object("from rank 0")
model = torch.nn.Linear(3, 2).to(dev)
model.weight.grad = torch.ones_like(model.weight)
model.bias.grad = torch.full_like(model.bias, 2.0)
d.average_gradients(model.parameters())
r["gradient_sums"] = [model.weight.grad.sum().item(), model.bias.grad.sum().item()]
before = model.weight.detach().clone()
d.broadcast_module(model)
r["broadcast_module_kept"] = bool(torch.equal(before, model.weight))
d.barrier()
d.agree(None)
r["main_first"] = d.main_first(lambda: 7, (ValueError,))
if d.is_main:
    with open(out, "w") as f:
        json.dump(r, f)
shutdown_distributed()
'''


def test_torchrun_of_one_process_joins_the_group_and_every_collective_runs(tmp_path):
    """Every helper of workbench.distributed under torchrun of one process; on a GPU the group is
    `cpu:gloo,cuda:nccl` and CPU and GPU tensors each find their backend."""
    from workbench.distributed import CPU_BACKEND, GPU_BACKENDS

    probe, out = tmp_path / "probe.py", tmp_path / "probe.json"
    probe.write_text(PROBE)
    run_command([*TORCHRUN, str(probe), DEVICE, str(out)])
    r = read_json(out)
    assert r["enabled"] and r["joined"] and r["world_size"] == 1 and r["rank"] == 0
    expected = GPU_BACKENDS if ON_GPU else CPU_BACKEND  # cpu:gloo,cuda:nccl on GPUs
    assert set(r["backend"].split(",")) == set(expected.split(",")), r["backend"]
    assert r["device"] == TORCHRUN_DEVICE and r["gather_cat_device_on"] == TORCHRUN_DEVICE
    assert r["gather_cat_cpu"] == [0.0, 1.0, 2.0, 3.0, 4.0]
    assert r["gather_cat_device"] == r["sum_device"] == [[0.0, 1.0], [2.0, 3.0], [4.0, 5.0]]
    assert r["sum_int_device"] == [3, 4]
    assert r["moments"] == pytest.approx([2.5, 5 / 3])
    assert r["mean"] == {"a": 1.5, "b": -2.0} and r["any"] == [True, False]
    assert r["objects"] == [{"rank": 0}] and r["to_main"] == [[0]] and r["broadcast_object"] == "from rank 0"
    assert r["gradient_sums"] == [6.0, 4.0] and r["broadcast_module_kept"] and r["main_first"] == 7


@gpu_only
def test_torchrun_process_group_has_nccl_for_gpu_tensors():
    from workbench.distributed import GPU_BACKENDS

    assert "cuda:nccl" in GPU_BACKENDS and "cpu:gloo" in GPU_BACKENDS
    assert torch.distributed.is_nccl_available(), "this torch build has no NCCL: torchrun on GPUs cannot work"


def test_torchrun_ppo_on_the_device(tmp_path):
    """One torchrun worker: PPO through the process group (gradients, advantages and the reward scaler's
    returns all go through collectives); before the gloo+NCCL group, a CPU tensor sent through an NCCL-only
    group crashed every GPU run at its first env step."""
    from workbench.checkpoint import load_checkpoint

    output = run_command([*TORCHRUN, "scripts/train_procgen.py", "--env", "bigfish", "--num-envs", "2",
                          "--num-steps", "16", "--total-steps", "64", "--eval-interval", "1", "--eval-episodes", "2",
                          "--no-video", "--no-progress", "--device", DEVICE, "--run-name", "tr",
                          "--runs-root", str(tmp_path)])
    run = tmp_path / "tr"
    assert "1 workers" in output and f"device {TORCHRUN_DEVICE}" in output, output
    config = read_json(run / "config.json")
    assert config["distributed"]["world_size"] == 1 and config["device"] == DEVICE
    assert config["runtime"]["device"] == TORCHRUN_DEVICE
    metrics = read_json(run / "metrics.json")
    assert metrics["world_size"] == 1 and metrics["env_steps"] == 64 and metrics["iterations"] == 2
    assert metrics["device"] == TORCHRUN_DEVICE and metrics["test"]["episodes"] == 2
    saved = load_checkpoint(run, kind="procgen-agent")
    assert saved["world_size"] == 1 and len(saved["ranks"]) == 1 and saved["agent_state"]["env_steps"] == 64
    assert saved["ranks"][0]["agent_state"]["reward_normalizer"]["count"] > 64 - 1  # the gathered returns


def workbench_command() -> list[str]:
    """`workbench` as README runs it under torchrun (--no-python), or its module where it is not on PATH."""
    return ["--no-python", "workbench"] if shutil.which("workbench") else ["-m", "workbench.cli"]


def test_torchrun_source_training_and_shot_on_the_device(domains, tmp_path):
    from workbench.checkpoint import load_checkpoint

    source, target = domains
    src, adapted = tmp_path / "src", tmp_path / "shot"
    run_command([*TORCHRUN, "-m", "workbench.cli", "train-source", "--data", str(source), "--backbone", "lenet",
                 "--epochs", "2", "--batch-size", "8", "--transform", "digits", "--device", DEVICE, "--out", str(src),
                 "--no-progress"])
    assert read_json(src / "config.json")["distributed"] == {"world_size": 1, "effective_batch_size": 8}
    metrics = read_json(src / "metrics.json")
    assert percent(metrics["selection_accuracy"]) and metrics["distributed"]["world_size"] == 1
    assert load_checkpoint(src / "source.pt", kind="source-model")["model_config"]["num_classes"] == CLASSES

    output = run_command([*TORCHRUN, *workbench_command(), "adapt", "--method", "shot", "--source", str(src),
                          "--target", str(target), "--epochs", "1", "--batch-size", "8", "--device", DEVICE,
                          "--out", str(adapted), "--no-progress"])
    assert "shot: target accuracy" in output, output
    config = read_json(adapted / "config.json")
    assert config["distributed"]["world_size"] == 1 and config["distributed"]["effective_batch_size"] == 8
    metrics = read_json(adapted / "metrics.json")
    assert metrics["samples"] == CLASSES * IMAGES_PER_CLASS and len(metrics["accuracy_per_epoch"]) == 1
    assert percent(metrics["source_only_accuracy"]) and percent(metrics["accuracy"])
    assert load_checkpoint(adapted / "adapted.pt", kind="adapted-model")["method"] == "shot"
    assert len((adapted / "predictions.csv").read_text().splitlines()) == CLASSES * IMAGES_PER_CLASS + 1


# ------------------------------------------------------------------ classification: source training and SHOT
@pytest.fixture(scope="module")
def domains(tmp_path_factory):
    root = tmp_path_factory.mktemp("domains")
    return write_domain(root / "source", False), write_domain(root / "target", True)


@pytest.fixture(scope="module")
def source_run(domains, tmp_path_factory):
    from adaptation.classification.source import SourceConfig, train_source

    out = tmp_path_factory.mktemp("source") / "run"
    metrics = train_source(SourceConfig(data=str(domains[0]), backbone="lenet", epochs=2, batch_size=8,
                                        transform="digits", device=DEVICE, run_dir=str(out), progress=False))
    return out, metrics


def test_source_training_on_the_device_predicts_as_on_the_cpu(source_run, domains):
    from adaptation.classification.data import load_target
    from adaptation.classification.model import load_model
    from workbench.adapt.training import accuracy, make_loader, predict
    from workbench.checkpoint import load_checkpoint
    from workbench.runtime import Runtime

    out, metrics = source_run
    # 38 training images (4 held out for selection) in batches of 8: 5 steps an epoch, 10 in all, each one checked
    assert percent(metrics["selection_accuracy"]) and 1 <= metrics["iteration"] <= 10
    assert read_json(out / "config.json")["device"] == DEVICE
    state = load_checkpoint(out / "source.pt", kind="source-model")
    assert state["iteration"] == metrics["iteration"] and all(t.device.type == "cpu" for t in state["model"].values())
    assert load_checkpoint(out / "train-state.pt", kind="source-training")["step"] == 10

    outputs = {}
    for where in (DEVICE, "cpu"):
        rt = Runtime.create(where, "fp32")
        model, saved = load_model(out / "source.pt", rt)
        assert all(p.device.type == where for p in model.parameters())
        data = load_target(str(domains[0]), saved["model_config"])
        with exact_fp32():
            outputs[where] = predict(model, make_loader(data, 16, train=False), rt)
    device_out, cpu_out = outputs[DEVICE], outputs["cpu"]
    torch.testing.assert_close(device_out["probs"], cpu_out["probs"], rtol=1e-3, atol=1e-4)
    torch.testing.assert_close(device_out["features"], cpu_out["features"], rtol=1e-3, atol=1e-3)
    # the task is a band's height: two epochs learn it (100% on the CPU)
    assert accuracy(device_out["probs"].argmax(1), device_out["labels"]) >= 60


@pytest.mark.parametrize("method", ["shot", "shot++"])
def test_shot_adaptation_on_the_device(source_run, domains, tmp_path, method):
    from adaptation.cli import adapt_main
    from adaptation.classification.evaluate import evaluate_model
    from workbench.checkpoint import load_checkpoint

    src, _ = source_run
    run = tmp_path / "run"
    argv = ["--method", method, "--source", str(src), "--target", str(domains[1]), "--epochs", "2", "--batch-size", "8",
            "--device", DEVICE, "--out", str(run), "--no-progress"]
    if method == "shot++":
        argv += ["--rotation-epochs", "1", "--transfer-epochs", "1", "--transfer-batch-size", "4"]
    assert adapt_main(argv) == 0
    metrics = read_json(run / "metrics.json")
    samples = CLASSES * IMAGES_PER_CLASS
    assert metrics["samples"] == samples and metrics["config"]["device"] == DEVICE
    assert percent(metrics["source_only_accuracy"]) and percent(metrics["accuracy"])
    assert len(metrics["accuracy_per_epoch"]) == 2 and all(percent(a) for a in metrics["accuracy_per_epoch"])
    assert sum(metrics["class_spread"]) == samples
    source = load_checkpoint(src / "source.pt")["model"]
    adapted = load_checkpoint(run / "adapted.pt", kind="adapted-model")
    assert adapted["method"] == method and changed(source, adapted["model"], "backbone.")
    if method == "shot":  # the source hypothesis is frozen (SHOT++'s labeling transfer trains a new one)
        classifier = [k for k in source if k.startswith("classifier.")]
        assert classifier and all(torch.equal(source[k], adapted["model"][k]) for k in classifier)
    else:
        transfer = metrics["transfer"]
        assert transfer["labelled"] + transfer["unlabelled"] == samples
        assert all(percent(a) for a in transfer.get("accuracy_checks", []))
        assert percent(metrics["rotation_pretrain"]["accuracy"])
    assert len((run / "predictions.csv").read_text().splitlines()) == samples + 1
    # the adapted checkpoint scores what the run reported (one sample's flip allowed: a new pass on the device)
    rescored = evaluate_model(run / "adapted.pt", str(domains[1]), device=DEVICE)["accuracy"]
    assert rescored == pytest.approx(metrics["accuracy"], abs=100 / samples + 1e-6)


def test_shot_clusters_the_features_on_the_device(source_run, domains, tmp_path, monkeypatch):
    """adaptation/classification/shot.py passes its features to shot_pseudo_labels on the runtime device (faiss's GPU index
    or torch there), and uses the labels there."""
    import adaptation.classification.shot as shot
    from adaptation.cli import adapt_main

    seen = []
    real = shot.shot_pseudo_labels

    def recording(features, probs, *args, **kwargs):
        labels = real(features, probs, *args, **kwargs)
        seen.append((features.device.type, probs.device.type, labels.device.type, len(labels)))
        return labels

    monkeypatch.setattr(shot, "shot_pseudo_labels", recording)
    assert adapt_main(["--method", "shot", "--source", str(source_run[0]), "--target", str(domains[1]), "--epochs",
                       "1", "--batch-size", "8", "--device", DEVICE, "--out", str(tmp_path / "run"),
                       "--no-progress"]) == 0
    assert seen == [(DEVICE, DEVICE, DEVICE, CLASSES * IMAGES_PER_CLASS)]


@pytest.mark.parametrize("objective", ["sat", "at", "core-tuning"])
def test_robust_source_objectives_on_the_device(source_run, domains, tmp_path, objective):
    from adaptation.classification.source import SourceConfig, train_source
    from workbench.checkpoint import load_checkpoint

    extra = {"init_from": str(source_run[0])} if objective == "core-tuning" else {}
    metrics = train_source(SourceConfig(data=str(domains[0]), backbone="lenet", epochs=2, batch_size=8,
                                        transform="digits", objective=objective, device=DEVICE,
                                        run_dir=str(tmp_path / "run"), progress=False, **extra))
    assert percent(metrics["selection_accuracy"]) and metrics["objective"] == objective
    state = load_checkpoint(tmp_path / "run" / "source.pt", kind="source-model")
    final = load_checkpoint(tmp_path / "run" / "train-state.pt", kind="source-training")  # after the last step
    assert final["step"] == 10
    if objective == "at":  # selection on PGD accuracy, the clean one beside it
        assert percent(metrics["robust_accuracy"]) and percent(metrics["robust_clean_accuracy"])
        assert percent(metrics["clean_selection_accuracy"])
    elif objective == "sat":  # the second epoch moves the soft targets (the first is plain CE)
        targets = final["objective"]["targets"]
        assert targets["updates"] > 0 and targets["targets"].shape[1] == CLASSES
        assert ((targets["targets"] > 0) & (targets["targets"] < 1)).any()
        torch.testing.assert_close(targets["targets"].sum(1), torch.ones(len(targets["targets"])))
    else:
        head = state["objective_state"]["projection_head"]
        assert head and all(torch.isfinite(t).all() for t in head.values())


# ------------------------------------------------------------------ clustering
def clustered_features(n=600, k=6, d=24, seed=0):
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(k, d, generator=g) * 5
    y = torch.randint(0, k, (n,), generator=g)
    features = centres[y] + torch.randn(n, d, generator=g) * 0.5
    probs = (torch.randn(n, k, generator=g) + 2 * torch.nn.functional.one_hot(y, k)).softmax(1)
    return features, probs, y


def test_pseudo_labels_on_device_features_equal_the_cpu_labels():
    from workbench.adapt.cluster import faiss_available, shot_pseudo_labels

    features, probs, y = clustered_features()
    on_cpu = shot_pseudo_labels(features, probs, backend="torch")
    assert len(on_cpu.unique()) > 1 and (on_cpu == y).float().mean() > 0.9  # the clusters are found
    here = shot_pseudo_labels(features.to(DEVICE), probs.to(DEVICE), backend="torch")
    assert on_device(here) and torch.equal(here.cpu(), on_cpu)
    auto = shot_pseudo_labels(features.to(DEVICE), probs.to(DEVICE))  # faiss GPU, faiss CPU or torch: as installed
    assert on_device(auto) and torch.equal(auto.cpu(), on_cpu)
    if faiss_available():
        assert torch.equal(shot_pseudo_labels(features, probs, backend="faiss"), on_cpu)


@gpu_only
def test_faiss_gpu_index_gives_the_torch_and_cpu_faiss_labels():
    import workbench.adapt.cluster as cluster

    if not cluster.faiss_gpu_available():
        pytest.skip("faiss has no GPU index here (or sees no GPU): install the GPU build: pip install -e '.[gpu]' "
                    "(pip uninstall -y faiss-cpu first if faiss.get_num_gpus() prints 0)")
    features, probs, _ = clustered_features(n=2000, k=10, d=64, seed=1)
    gpu_features, gpu_probs = features.cuda(), probs.cuda()
    assert cluster.check_backend("auto", gpu_features.device) == "faiss"
    with_faiss_gpu = cluster.shot_pseudo_labels(gpu_features, gpu_probs, backend="faiss")
    assert cluster._GPU_RESOURCES, "the faiss index was not put on the GPU"
    assert with_faiss_gpu.is_cuda
    with_torch_gpu = cluster.shot_pseudo_labels(gpu_features, gpu_probs, backend="torch")
    with_faiss_cpu = cluster.shot_pseudo_labels(features, probs, backend="faiss")
    assert len(with_faiss_cpu.unique()) > 1
    assert torch.equal(with_faiss_gpu, with_torch_gpu) and torch.equal(with_faiss_gpu.cpu(), with_faiss_cpu)


# ------------------------------------------------------------------ segmentation and pose
@pytest.fixture
def tiny_dense_data(tmp_path, monkeypatch):
    """Built-in scenes and figures, a few images per split, built into this test's folder."""
    monkeypatch.setenv("WORKBENCH_DATA", str(tmp_path / "wbdata"))
    monkeypatch.setenv("WORKBENCH_SCENES_N", "24,8")
    monkeypatch.setenv("WORKBENCH_FIGURES_N", "12,6")


def test_segmentation_source_and_pixel_shot_on_the_device(tiny_dense_data, tmp_path):
    from adaptation.cli import adapt_main, train_source_main
    from adaptation.segmentation.data import load_segmentation
    from adaptation.segmentation.evaluate import evaluate_dense_model
    from adaptation.dense.model import load_dense_model
    from workbench.checkpoint import load_checkpoint
    from workbench.runtime import Runtime

    src, run = tmp_path / "src", tmp_path / "shot"
    assert train_source_main(["--task", "segmentation", "--data", "builtin:scenes/printed", "--backbone", "dtn",
                              "--head", "fcn", "--head-channels", "16", "--epochs", "1", "--batch-size", "8",
                              "--device", DEVICE, "--out", str(src), "--no-progress"]) == 0
    source_metrics = read_json(src / "metrics.json")
    assert percent(source_metrics["miou"]) and len(source_metrics["per_class_iou"]) == 11
    assert adapt_main(["--source", str(src), "--target", "builtin:scenes/textured", "--epochs", "1", "--batch-size",
                       "8", "--precision", DENSE_PRECISION, "--device", DEVICE, "--out", str(run),
                       "--no-progress"]) == 0
    metrics = read_json(run / "metrics.json")
    assert metrics["config"]["device"] == DEVICE and metrics["config"]["precision"] == DENSE_PRECISION
    for key in ("source_only_miou", "miou", "pixel_accuracy", "test_miou", "source_only_test_miou"):
        assert percent(metrics[key]), (key, metrics[key])
    assert len(metrics["pseudo_label_miou_per_epoch"]) == 1 and finite(metrics["pseudo_label_miou_per_epoch"][0])
    assert len(list((run / "predictions").glob("*.png"))) == 24
    source = load_checkpoint(src / "source.pt")["model"]
    adapted = load_checkpoint(run / "adapted.pt", kind="adapted-model")
    classifier = [k for k in source if k.startswith("head.classifier.")]
    assert classifier and all(torch.equal(source[k], adapted["model"][k]) for k in classifier)
    assert changed(source, adapted["model"], "backbone.") and changed(source, adapted["model"], "head.")
    # the reported test mIoU is the checkpoint's (fp32 scoring), and the device computes the CPU's logits
    assert evaluate_dense_model(run, "builtin:scenes/textured:test", device=DEVICE)["miou"] == \
        pytest.approx(metrics["test_miou"], abs=0.5)
    images = torch.stack([load_segmentation("builtin:scenes/textured:test", train=False)[i][0] for i in range(4)])
    logits = {}
    for where in (DEVICE, "cpu"):
        rt = Runtime.create(where, "fp32")
        model, _ = load_dense_model(run, rt)
        with torch.no_grad(), exact_fp32():
            logits[where] = model(rt.images(images)).float().cpu()
    torch.testing.assert_close(logits[DEVICE], logits["cpu"], rtol=1e-2, atol=1e-3)


def test_pose_source_and_mean_teacher_on_the_device(tiny_dense_data, tmp_path):
    from adaptation.cli import adapt_main, train_source_main
    from adaptation.pose.evaluate import evaluate_pose_model
    from workbench.checkpoint import load_checkpoint

    src, run = tmp_path / "src", tmp_path / "mt"
    assert train_source_main(["--task", "pose", "--data", "builtin:figures/flat", "--backbone", "dtn", "--head",
                              "deconv", "--head-channels", "16", "--epochs", "1", "--batch-size", "8", "--precision",
                              DENSE_PRECISION, "--device", DEVICE, "--out", str(src), "--no-progress"]) == 0
    source_metrics = read_json(src / "metrics.json")
    assert percent(source_metrics["ap"]) and percent(source_metrics["pck@0.1"])
    assert adapt_main(["--source", str(src), "--target", "builtin:figures/textured", "--epochs", "1", "--batch-size",
                       "8", "--precision", DENSE_PRECISION, "--device", DEVICE, "--out", str(run),
                       "--no-progress"]) == 0
    metrics = read_json(run / "metrics.json")
    assert metrics["method"] == "mean-teacher" and metrics["config"]["device"] == DEVICE
    for key in ("source_only_ap", "ap", "pck@0.05", "pck@0.1", "test_ap", "test_pck@0.1", "source_only_test_pck@0.1"):
        assert percent(metrics[key]), (key, metrics[key])
    assert len(metrics["ap_per_epoch"]) == 1 and percent(metrics["pck@0.1_per_epoch"][0])
    results = read_json(run / "keypoints.json")
    assert len(results) == metrics["persons"] and len(results[0]["keypoints"]) == 3 * 14
    assert all(finite(v) for person in results for v in person["keypoints"])
    source = load_checkpoint(src / "source.pt")["model"]
    adapted = load_checkpoint(run / "adapted.pt", kind="adapted-model")["model"]
    frozen = [k for k in source if k.startswith("head.classifier.")]
    assert frozen and all(torch.equal(source[k], adapted[k]) for k in frozen)
    assert changed(source, adapted, "backbone."), "the teacher did not move with the student"
    # the saved teacher scores what the run reported (a new pass on the same device: a joint may flip)
    assert evaluate_pose_model(run, "builtin:figures/textured:test", device=DEVICE)["pck@0.1"] == \
        pytest.approx(metrics["test_pck@0.1"], abs=2.0)


# ------------------------------------------------------------------ Procgen agent adaptation
def test_procgen_agent_adaptation_on_the_device(ppo_run, tmp_path):
    from adaptation.cli import adapt_main
    from workbench.checkpoint import load_checkpoint

    source = ppo_run[0]
    out = tmp_path / "adapt"
    assert adapt_main(["--source", str(source), "--target", PROCGEN_TARGET, "--method", "shot", "--frames", "128",
                       "--epochs", "1", "--eval-episodes", "0", "--paired-steps", "2", "--device", DEVICE,
                       "--out", str(out), "--no-progress"]) == 0
    metrics = read_json(out / "metrics.json")
    epoch = metrics["epochs"][0]
    assert len(metrics["epochs"]) == 1 and 0 <= epoch["action_agreement_with_pseudo_labels"] <= 1
    assert 0 < epoch["policy_entropy"] <= math.log(15) + 1e-4
    paired = metrics["paired_states"]
    assert paired["frames"] == 2 * 32 and finite(paired["adapted_agent"]["js_from_source_policy"])
    before = load_checkpoint(source, kind="procgen-agent")["agent_state"]["model"]
    after = load_checkpoint(out, kind="procgen-agent")["agent_state"]["model"]
    for name in before:
        if name.startswith(("policy_head.", "value_head.")):
            assert torch.equal(before[name], after[name]), name
    assert changed(before, after, "backbone.")


@pytest.mark.parametrize("method, extra", [("anchored-im", []), ("bufr", []), ("pad", []),
                                           ("pad", ["--online", "--eval-episodes", "2", "--pad-batch-size", "4"])])
def test_procgen_adaptation_methods_on_the_device(tmp_path, method, extra):
    """An agent trained on the device with PAD's head and BUFR's statistics, adapted on the device by each
    issue-36 method: finite losses, the encoder moved, the policy and value heads untouched."""
    import dataclasses

    from adaptation.cli import adapt_main
    from agents.train import Trainer
    from workbench.checkpoint import load_checkpoint

    source = tmp_path / "source"
    cfg = dataclasses.replace(tiny_ppo(source, "fp32", total_steps=256, aux="inverse-dynamics"),
                              feature_stats_frames=64)
    Trainer(cfg).run()
    stats = load_checkpoint(source, kind="procgen-agent")["feature_statistics"]["layers"]
    assert all(finite(float(layer["counts"].sum())) for layer in stats.values())
    out = tmp_path / method
    argv = ["--source", str(source), "--target", PROCGEN_TARGET, "--method", method, "--frames", "128", "--epochs",
            "1", "--eval-episodes", "0", "--paired-steps", "0", "--device", DEVICE, "--out", str(out), "--no-progress"]
    assert adapt_main(argv + extra) == 0
    metrics = read_json(out / "metrics.json")
    assert metrics["epochs"] and all(finite(v) for e in metrics["epochs"] for v in e.values()
                                     if isinstance(v, float))
    before = load_checkpoint(source, kind="procgen-agent")["agent_state"]["model"]
    after = load_checkpoint(out, kind="procgen-agent")["agent_state"]["model"]
    assert all(torch.equal(before[k], after[k]) for k in before if k.startswith(("policy_head.", "value_head.")))
    assert changed(before, after, "backbone.")


# ------------------------------------------------------------------ bf16
@gpu_only
def test_auto_precision_is_bf16_where_the_gpu_computes_it():
    from workbench.runtime import Runtime

    rt = Runtime.create("cuda", "auto")
    assert rt.device.type == "cuda"
    expected = torch.bfloat16 if torch.cuda.is_bf16_supported() else None
    assert rt.amp_dtype == expected and rt.precision_name == ("bf16" if expected else "fp32")
    assert torch.cuda.is_bf16_supported() or torch.cuda.get_device_capability()[0] < 8, \
        "an Ampere or newer GPU (an H200 is 9.0) computes bf16"
    with rt.autocast():
        out = torch.nn.Linear(8, 4).cuda()(torch.randn(2, 8, device="cuda"))
    assert out.dtype == (expected or torch.float32)


def test_bf16_ppo_gradient_agrees_with_fp32_on_the_device():
    """As tests/test_precision.py on the CPU: the gradient of the same minibatch loss under bf16 autocast
    points the way the fp32 one does (the fp32 reference without TF32)."""
    from agents.ppo import ActorCritic, PPOConfig, ppo_loss
    from workbench.backbones import create_backbone
    from workbench.runtime import Runtime

    g = torch.Generator().manual_seed(0)
    b = 64
    batch = {"obs": torch.randint(0, 256, (b, 64, 64, 3), generator=g, dtype=torch.uint8),
             "actions": torch.randint(0, 15, (b,), generator=g), "advantages": torch.randn(b, generator=g),
             "returns": torch.randn(b, generator=g), "old_values": torch.randn(b, generator=g) * 0.1,
             "old_logprobs": torch.full((b,), -2.708)}
    runtimes = {"fp32": Runtime.create(DEVICE, "fp32"), "bf16": Runtime.create(DEVICE, "bf16")}
    model = runtimes["fp32"].prepare_module(ActorCritic(create_backbone("impala_1x"), 15))
    batch = {k: v.to(runtimes["fp32"].device) for k, v in batch.items()}
    grads, losses, dtypes = {}, {}, {}
    for precision, rt in runtimes.items():
        model.zero_grad()
        with exact_fp32(), rt.autocast():
            logits, values, features = model(batch["obs"], with_features=True)
            dtypes[precision] = model.backbone(batch["obs"][:2].permute(0, 3, 1, 2).float()).dtype
        loss, _ = ppo_loss(logits, values, batch, PPOConfig())
        loss.backward()
        grads[precision] = torch.cat([p.grad.flatten() for p in model.parameters()])
        losses[precision] = loss.item()
    assert dtypes == {"fp32": torch.float32, "bf16": torch.bfloat16}
    assert on_device(grads["bf16"]) and torch.isfinite(grads["bf16"]).all()
    cosine = torch.nn.functional.cosine_similarity(grads["fp32"], grads["bf16"], dim=0).item()
    assert cosine > 0.99, cosine
    assert abs(losses["fp32"] - losses["bf16"]) < 0.01 * abs(losses["fp32"]) + 1e-3
