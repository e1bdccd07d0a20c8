"""What a finished Procgen run leaves beside its TensorBoard events: the learning curve as a PNG, the run's
configuration inside the event file, and the uniform random policy's return on the test episodes (the floor)."""

import json
from pathlib import Path

import matplotlib.image
import numpy as np
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from agents.cli import config_from_args, parse_train_args, train_main
from agents.evaluate import evaluate_random_policy
from agents.resumable import PAPER_RECIPE
from agents.train import LEARNING_CURVE, Trainer, TrainConfig
from workbench.logging import claim_run_dir, plot_learning_curve, read_scalars

TINY = ["--env", "bigfish", "--num-envs", "4", "--num-steps", "32", "--eval-episodes", "2",
        "--eval-interval", "1", "--no-progress", "--precision", "fp32", "--no-video"]


def _image(path):
    image = matplotlib.image.imread(path)
    assert image.ndim == 3 and image.shape[:2] == (420, 700), image.shape  # 7 x 4.2 inches at 100 dpi
    return image


def test_a_run_writes_its_learning_curve_config_and_floor(tmp_path, capsys):
    assert train_main(TINY + ["--total-steps", "256", "--runs-root", str(tmp_path), "--run-name", "r"]) == 0
    run, out = tmp_path / "r", capsys.readouterr().out

    image = _image(run / LEARNING_CURVE)
    assert image[..., :3].std() > 0.05, "a blank image"
    # the plotted points are the ones in the event file: a train point per iteration, a test point per evaluation
    points = read_scalars(run, ("train/episode_return", "test/episode_return", "test/random_policy_return"))
    assert [s for s, _ in points["test/episode_return"]] == [128, 256]
    assert points["train/episode_return"] and all(s <= 256 for s, _ in points["train/episode_return"])

    events = EventAccumulator(str(run))
    events.Reload()
    [config_event] = events.Tensors("config/text_summary")
    text = config_event.tensor_proto.string_val[0].decode()
    written = json.loads(text.strip().removeprefix("```").removesuffix("```"))
    assert written["env"] == "bigfish" and written["total_steps"] == 256
    assert written["agent"]["num_steps"] == 32 and written["agent"]["backbone"] == "impala_half"
    assert events.PluginTagToContent("hparams"), "the configuration is also in the HPARAMS tab"

    metrics = json.loads((run / "metrics.json").read_text())
    floor = metrics["test_random_policy"]
    again = evaluate_random_policy("bigfish", 2, num_envs=2, seed=12345)  # the same test episodes
    assert floor["mean_return"] == again["mean_return"] and floor["episodes"] == metrics["test"]["episodes"] == 2
    assert points["test/random_policy_return"] == [(256, floor["mean_return"])]
    assert "uniform random policy on the same episodes (the floor): mean return" in out
    assert f"{floor['mean_return']:.2f}" in out and str(run / LEARNING_CURVE) in out


def test_a_resumed_run_plots_its_whole_curve(tmp_path):
    cfg = TrainConfig(env="bigfish", total_steps=128, eval_interval=1, eval_episodes=2, num_test_envs=2,
                      precision="fp32", run_dir=str(tmp_path), progress=False, video=False,
                      agent={"num_envs": 4, "num_steps": 32, "num_minibatches": 4})
    Trainer(cfg).run()
    Trainer.resume(tmp_path, total_steps=256, progress=False).run()
    points = read_scalars(tmp_path, ("test/episode_return",))
    assert [s for s, _ in points["test/episode_return"]] == [128, 256]
    _image(tmp_path / LEARNING_CURVE)


def test_plot_learning_curve_draws_curves_and_levels(tmp_path):
    path = plot_learning_curve(tmp_path / "c.png", {"train": [(0, 1.0), (10, 2.0), (20, 3.0)], "test": [],
                                                    "one point": [(5, 2.5)]},
                               {"floor": 1.5}, title="t")
    image = _image(path)
    grey = np.all(np.abs(image[..., :3] - 0.5) < 0.01, axis=-1)  # the dashed floor line (matplotlib's "grey")
    assert grey.sum() > 100


def test_overwrite_removes_the_earlier_curve(tmp_path):
    (tmp_path / "metrics.json").write_text("{}")
    (tmp_path / LEARNING_CURVE).write_bytes(b"png")
    claim_run_dir(tmp_path, overwrite=True)
    assert not (tmp_path / LEARNING_CURVE).exists()


def test_the_main_job_defaults_are_what_the_readme_says():
    """The no-flag run is the Procgen half's quick job; the README's paragraph on it (right under the
    quickstart's) describes it."""
    cfg = config_from_args(parse_train_args([]))
    assert (cfg.env, cfg.protocol, cfg.total_steps, cfg.eval_interval) == ("starpilot", "easy-200", 102_400, 10)
    assert cfg.agent["backbone"] == "impala_half" and cfg.agent["num_steps"] == 128 and cfg.agent["num_envs"] == 16
    assert (cfg.eval_episodes, cfg.num_test_envs) == (100, 64)
    assert TrainConfig.total_steps == cfg.total_steps and TrainConfig.eval_episodes == cfg.eval_episodes
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    first = readme.split("```", 2)[2].split("\n\n")[2]  # the second paragraph under the two top commands
    assert first.startswith("The Procgen half's quick job is `python scripts/train_procgen.py`")
    assert "starpilot" in first and "102,400 steps" in first and "impala_half" in first and "random" in first
    assert "100 episodes" in first


def test_rainbow_keeps_the_papers_network_by_default():
    assert config_from_args(parse_train_args(["--algo", "rainbow"])).agent["backbone"] == "impala_1x"
    assert config_from_args(parse_train_args(["--algo", "rainbow", "--backbone", "impala_half"])
                            ).agent["backbone"] == "impala_half"


def test_the_benchmark_drivers_keep_the_papers_network_and_rollout():
    """Drivers that train through agents.resumable give the paper's recipe before their own flags."""
    cfg = config_from_args(parse_train_args(PAPER_RECIPE + ["--env", "coinrun"]))
    assert cfg.agent["backbone"] == "impala_1x" and cfg.agent["num_steps"] == 256 and cfg.eval_interval == 5
    assert (cfg.eval_episodes, cfg.num_test_envs) == (32, 32)
    assert config_from_args(parse_train_args(PAPER_RECIPE + ["--num-steps", "64"])).agent["num_steps"] == 64
