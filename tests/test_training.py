"""Few-update training runs: TensorBoard content, checkpoints, resume, interruption, bad input."""

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from agents.cli import config_from_args, evaluate_main, parse_train_args, train_main
from agents.ppo import PPOConfig
from agents.train import Trainer, TrainConfig
from workbench.checkpoint import CheckpointError, load_checkpoint, save_checkpoint

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--env", "bigfish", "--num-envs", "4", "--num-steps", "32", "--eval-episodes", "2",
        "--eval-interval", "2", "--no-progress", "--precision", "fp32"]

EXPECTED_SCALARS = {"train/episode_return", "train/normalized_score", "test/episode_return",
                    "test/normalized_score", "losses/policy_loss", "losses/value_loss", "losses/entropy",
                    "losses/approx_kl", "losses/clip_fraction", "losses/explained_variance",
                    "perf/steps_per_second", "perf/learning_rate"}


def tiny_config(run_dir, total_steps=256, **agent):
    return TrainConfig(env="bigfish", total_steps=total_steps, eval_interval=2, eval_episodes=2, num_test_envs=2,
                       precision="fp32", run_dir=str(run_dir), progress=False, video=False,
                       agent={"num_envs": 4, "num_steps": 32, "num_minibatches": 4, **agent})


def test_training_run_writes_tensorboard_tags_checkpoint_and_metrics(tmp_path):
    rc = train_main(TINY + ["--total-steps", "512", "--runs-root", str(tmp_path), "--run-name", "r"])
    assert rc == 0
    run = tmp_path / "r"
    acc = EventAccumulator(str(run))
    acc.Reload()
    assert EXPECTED_SCALARS <= set(acc.Tags()["scalars"])
    assert "test/video" in acc.Tags()["images"]
    steps = [e.step for e in acc.Scalars("losses/policy_loss")]
    assert steps == [128, 256, 384, 512]
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["env_steps"] == 512 and metrics["iterations"] == 4 and metrics["mixreg"] is True
    assert metrics["test"]["episodes"] == 2
    ckpt = load_checkpoint(run, kind="procgen-agent")
    assert ckpt["agent_state"]["env_steps"] == 512
    assert ckpt["agent_state"]["reward_normalizer"]["count"] > 512 - 1
    assert json.loads((run / "config.json").read_text())["agent_resolved"]["mixreg"] is True


def test_resume_continues_counters_from_the_checkpoint_weights(tmp_path):
    Trainer(tiny_config(tmp_path, total_steps=256)).run()  # 2 iterations of 128 steps
    saved = load_checkpoint(tmp_path, kind="procgen-agent")
    resumed = Trainer.resume(tmp_path, total_steps=512, progress=False)
    assert resumed.agent.env_steps == 256 and resumed.agent.iterations == 2
    for name, tensor in saved["agent_state"]["model"].items():
        assert torch.equal(resumed.agent.model.state_dict()[name], tensor), name
    assert resumed.agent.optimizer.state_dict()["state"][0]["step"] == saved["agent_state"]["optimizer"]["state"][0]["step"]
    metrics = resumed.run()
    assert metrics["env_steps"] == 512 and metrics["iterations"] == 4
    assert load_checkpoint(tmp_path)["agent_state"]["iterations"] == 4


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_signal_writes_a_checkpoint_before_exit(tmp_path, signum):
    cmd = [sys.executable, str(ROOT / "scripts" / "train_procgen.py"), *TINY, "--total-steps", "1000000",
           "--runs-root", str(tmp_path), "--run-name", "sig"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    ckpt = tmp_path / "sig" / "checkpoint.pt"
    deadline = time.time() + 120
    while not ckpt.exists() and time.time() < deadline:
        time.sleep(0.2)
    assert ckpt.exists(), proc.communicate(timeout=5)[0] if proc.poll() is not None else "no checkpoint"
    proc.send_signal(signum)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signum, out
    assert f"{signal.Signals(signum).name} received" in out
    state = load_checkpoint(ckpt)
    metrics = json.loads((tmp_path / "sig" / "metrics.json").read_text())
    assert metrics["interrupted"] is True
    assert state["agent_state"]["env_steps"] == metrics["env_steps"] >= 128


def test_bad_input_gives_one_line_errors(tmp_path, capsys):
    assert train_main(["--env", "coinrunn", "--no-progress"]) == 2
    assert train_main(["--algo", "a3c", "--no-progress"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and "coinrunn" in err[0] and "valid games" in err[0] and "a3c" in err[1]

    truncated = tmp_path / "truncated.pt"
    save_checkpoint(tmp_path / "good.pt", "procgen-agent", {"x": torch.zeros(1000)})
    truncated.write_bytes((tmp_path / "good.pt").read_bytes()[:500])
    foreign = tmp_path / "foreign.pt"
    torch.save({"state_dict": {}}, foreign)
    wrong_kind = save_checkpoint(tmp_path / "shot.pt", "shot-source", {})
    for path, pattern in [(truncated, "truncated"), (foreign, "not a workbench checkpoint"),
                          (wrong_kind, "'shot-source' checkpoint"), (tmp_path / "missing", "no checkpoint")]:
        with pytest.raises(CheckpointError, match=pattern):
            load_checkpoint(path, kind="procgen-agent")
        assert evaluate_main([str(path), "--episodes", "1"]) == 2
        assert pattern.split("'")[0] in capsys.readouterr().err


@pytest.mark.parametrize("steps", ["-5", "0"])
def test_a_run_without_steps_is_refused_with_one_line(tmp_path, capsys, steps):
    with pytest.raises(SystemExit) as stop:  # at parse time, as every number out of range
        train_main(["--total-steps", steps, "--no-progress", "--runs-root", str(tmp_path), "--run-name", "r"])
    assert stop.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--total-steps" in err[0] and steps in err[0]
    assert not (tmp_path / "r").exists()


def test_reward_scaler_discount_is_its_own_flag_recorded_in_the_config():
    assert config_from_args(parse_train_args([])).agent["reward_norm_gamma"] == 0.99
    cfg = config_from_args(parse_train_args(["--reward-norm-gamma", "0.999"]))
    assert cfg.agent["reward_norm_gamma"] == 0.999  # cfg.agent is what config.json records
    assert PPOConfig(**cfg.agent).reward_norm_gamma == 0.999


def test_evaluate_script_writes_json(tmp_path):
    Trainer(tiny_config(tmp_path, total_steps=128)).run()
    out = tmp_path / "eval.json"
    assert evaluate_main([str(tmp_path), "--episodes", "3", "--num-envs", "3", "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["episodes"] == 3 and result["num_levels"] == 0 and result["env_steps"] == 128
    assert result["normalized_score"] == pytest.approx((result["mean_return"] - 1) / 39)


@pytest.mark.parametrize("regularizer", ["cutout_color", "random_crop", "random_conv", "l2", "batchnorm"])
def test_comparison_regularizers_train(tmp_path, regularizer):
    rc = train_main(TINY + ["--total-steps", "128", "--no-mixreg", "--regularizer", regularizer, "--no-video",
                            "--runs-root", str(tmp_path), "--run-name", regularizer])
    assert rc == 0
    metrics = json.loads((tmp_path / regularizer / "metrics.json").read_text())
    assert metrics["env_steps"] == 128
    # the paper's test workers: network randomisation plays through random kernels, the rest on clean frames
    assert metrics["test"]["clean_frames"] is (regularizer != "random_conv")
    if regularizer == "random_conv":
        out = tmp_path / "clean.json"
        assert evaluate_main([str(tmp_path / regularizer), "--episodes", "2", "--num-envs", "2", "--clean-frames",
                              "--out", str(out)]) == 0
        assert json.loads(out.read_text())["clean_frames"] is True


def test_clean_frame_evaluation_is_a_training_flag_recorded_in_the_config():
    assert config_from_args(parse_train_args(["--eval-clean-frames"])).eval_clean_frames is True
    assert config_from_args(parse_train_args([])).eval_clean_frames is False


def test_training_with_the_coordinate_attention_backbone(tmp_path):
    rc = train_main(TINY + ["--total-steps", "128", "--backbone", "impala_1x_ca", "--no-video",
                            "--runs-root", str(tmp_path), "--run-name", "ca"])
    assert rc == 0
    state = load_checkpoint(tmp_path / "ca")["agent_state"]
    assert any("attention" in k for k in state["model"])


def test_seed_table_cells_are_mean_sd_over_the_rows_of_each_cell():
    from workbench.logging import seed_table

    rows = [{"head": "fcn", "column": "a", "miou": 10.0}, {"head": "fcn", "column": "a", "miou": 14.0},
            {"head": "fcn", "column": "b", "miou": 3.0}, {"head": "issa", "column": "b", "miou": 5.25}]
    lines = seed_table(rows, "head", ("a", "b"), "miou").splitlines()
    assert lines[0] == "| head | a | b |" and lines[1] == "|---|---|---|"
    # sample sd of 10 and 14 is 2.83; one value has no sd; an empty cell is a dash
    assert lines[2] == "| fcn | 12.0 ± 2.8 (n=2) | 3.0 (n=1) |" and lines[3] == "| issa | — | 5.2 (n=1) |"
    # a given order of the lines (metrics in their reading order, not sorted); names never run are left out
    ordered = seed_table(rows, "head", ("a", "b"), "miou", order=("issa", "ocr", "fcn")).splitlines()
    assert ordered[2:] == [lines[3], lines[2]]


def test_finished_run_compares_what_the_run_computes_and_ignores_where_it_ran(tmp_path):
    from dataclasses import dataclass

    from workbench.logging import finished_run, write_json

    @dataclass
    class Config:
        epochs: int = 3
        input_size: tuple | None = None
        run_dir: str = ""

    run = tmp_path / "run"
    write_json(run / "config.json", {"epochs": 3, "input_size": [96, 128], "run_dir": "elsewhere", "task": "pose"})
    assert finished_run(run, Config()) is None  # no metrics.json yet: not finished
    write_json(run / "metrics.json", {"pck@0.1": 97.1})
    # a setting left at None is the run's to resolve; run_dir and keys the config lacks are not compared
    assert finished_run(run, Config(run_dir=str(run))) == {"pck@0.1": 97.1}
    assert finished_run(run, Config(input_size=(96, 128))) == {"pck@0.1": 97.1}  # a tuple is JSON's list
    with pytest.raises(ValueError, match=r"made with epochs=3 and this run asks for epochs=60"):
        finished_run(run, Config(epochs=60))
    with pytest.raises(ValueError, match=r"input_size=\[96, 128\] .* input_size=\[64, 64\]"):
        finished_run(run, Config(input_size=(64, 64)))
