"""Source-free adaptation of a Procgen agent to a visual domain (issue 15)."""

import json
import os
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from adaptation.cli import adapt_main
from agents.adapt import (ADAPT_STATE, ProcgenAdaptConfig, ProcgenAdapter, TargetFrames, collect_frames, paired_frames,
                          parse_procgen_target, policy_divergence)
from agents.cli import evaluate_main
from agents.evaluate import UniformRandomPolicy, evaluate_checkpoint, evaluate_random_policy
from agents.train import Trainer, TrainConfig
from envs.procgen import ProcgenVecEnv, visual_options
from workbench.checkpoint import CheckpointError, load_checkpoint

TARGET = "procgen:bigfish:no-backgrounds+monochrome"


def tiny_source(run_dir, algo="ppo", visual=()):
    agent = {"num_envs": 4, "num_steps": 32, "num_minibatches": 4} if algo == "ppo" else \
        {"num_envs": 4, "buffer_size": 512, "warmup_steps": 64, "batch_size": 16, "update_every": 16}
    Trainer(TrainConfig(env="bigfish", algo=algo, total_steps=128, eval_interval=100, eval_episodes=2,
                        num_test_envs=2, precision="fp32", run_dir=str(run_dir), progress=False, video=False,
                        feature_stats_frames=64, visual=list(visual), agent=agent)).run()
    return run_dir


@pytest.fixture(scope="module")
def source_run(tmp_path_factory):
    return tiny_source(tmp_path_factory.mktemp("procgen-source"))


def tiny_adapt(source, run_dir, **overrides):
    cfg = dict(source=str(source), target=TARGET, frames=128, num_envs=8, epochs=2, eval_episodes=0, paired_steps=0,
               run_dir=str(run_dir), progress=False, device="cpu")
    return ProcgenAdapter(ProcgenAdaptConfig(**{**cfg, **overrides})).run()


def test_visual_options_reach_the_renderer_for_the_same_levels():
    plain = ProcgenVecEnv("bigfish", 2, num_levels=1, start_level=7, seed=3).reset()
    other = ProcgenVecEnv("bigfish", 2, num_levels=1, start_level=7, seed=3,
                          **visual_options(["no-backgrounds", "monochrome"])).reset()
    again = ProcgenVecEnv("bigfish", 2, num_levels=1, start_level=7, seed=3).reset()
    assert torch.equal(plain, again)  # same level, same frames ...
    assert (plain != other).float().mean() > 0.2  # ... and the target domain looks different


def test_adaptation_keeps_the_policy_head_trains_the_encoder_and_evaluates(source_run, tmp_path):
    rc = adapt_main(["--source", str(source_run), "--target", TARGET, "--method", "shot", "--frames", "128",
                     "--epochs", "2", "--eval-episodes", "0", "--paired-steps", "3", "--device", "cpu",
                     "--out", str(tmp_path / "adapt"),
                     "--no-progress"])
    assert rc == 0
    metrics = json.loads((tmp_path / "adapt" / "metrics.json").read_text())
    before = load_checkpoint(source_run, kind="procgen-agent")["agent_state"]["model"]
    after_ckpt = load_checkpoint(tmp_path / "adapt", kind="procgen-agent")
    after = after_ckpt["agent_state"]["model"]
    for name in before:
        if name.startswith(("policy_head.", "value_head.")):
            assert torch.equal(before[name], after[name]), name  # byte-identical
    assert any(not torch.equal(before[n], after[n]) for n in before if n.startswith("backbone."))
    assert after_ckpt["config"]["visual"] == ["no-backgrounds", "monochrome"]
    assert len(metrics["epochs"]) == 2 and 0 <= metrics["epochs"][0]["action_agreement_with_pseudo_labels"] <= 1
    paired = metrics["paired_states"]
    assert paired["frames"] == 3 * 32 and 0 <= paired["adapted_agent"]["tv_from_source_policy"] <= 1
    assert paired["adapted_agent"] != paired["source_agent"]  # the encoder moved, so did the policy on those states
    frames = TargetFrames.load(tmp_path / "adapt" / "frames.npz", "bigfish")
    assert frames.frames.shape == frames.next_frames.shape == (128, 64, 64, 3) and len(frames.actions) == 128
    rc = evaluate_main([str(tmp_path / "adapt"), "--episodes", "2", "--num-envs", "2", "--device", "cpu"])
    assert rc == 0


def test_paired_states_are_the_same_states_in_both_visuals(source_run):
    """Same levels, same actions: the source policy's states rendered twice. With the same visuals the two
    renderings are equal, so the divergence of a policy from itself is zero; monochrome changes the pixels
    and keeps the game in lockstep."""
    adapter = ProcgenAdapter(ProcgenAdaptConfig(source=str(source_run), target=TARGET, device="cpu"))
    same = paired_frames(adapter.agent, "bigfish", [], [], 5, 4, 0, "easy", stride=3)
    assert torch.equal(same[0], same[1]) and same[0].shape == (20, 64, 64, 3)
    shifted = paired_frames(adapter.agent, "bigfish", [], ["monochrome"], 5, 4, 0, "easy", stride=3)
    assert shifted[2] == 0 and torch.equal(shifted[0], same[0]) and not torch.equal(shifted[1], same[1])
    d = policy_divergence(torch.tensor([[0.5, 0.5]]), torch.tensor([[0.5, 0.5]]))
    assert d["tv_from_source_policy"] == 0 and d["js_from_source_policy"] == 0


class DivergingEnvs:
    """Procgen's vectorised env as paired_frames drives it, for 3 envs whose frames show (step, env); the
    target copy (any visual option) rewards env 1 at its 5th step and the source copy does not, as a hitbox
    that restrict-themes resized would."""

    def __init__(self, game, num_envs, mode, num_levels, start_level, device, seed, **options):
        self.t, self.num_envs, self.target = 0, num_envs, bool(options)

    def reset(self):
        return self.as_tensor(self.last_frames)

    @property
    def last_frames(self) -> np.ndarray:
        frames = np.zeros((self.num_envs, 64, 64, 3), np.uint8)
        frames[:, 0, 0, 0], frames[:, 0, 0, 1] = self.t, np.arange(self.num_envs)
        return frames

    def step_numpy(self, actions):
        self.t += 1
        rewards = np.zeros(self.num_envs, np.float32)
        rewards[1] = float(self.target and self.t == 5)
        return self.last_frames, rewards, np.zeros(self.num_envs, bool)

    @staticmethod
    def as_tensor(frames):
        return torch.from_numpy(frames)


def test_an_env_that_falls_out_of_step_is_left_out_from_then_on(monkeypatch):
    from types import SimpleNamespace

    import agents.adapt.core as core

    monkeypatch.setattr(core, "ProcgenVecEnv", DivergingEnvs)
    agent = SimpleNamespace(rt=SimpleNamespace(device="cpu"), act=lambda obs: torch.zeros(len(obs), dtype=torch.long))
    source, target, fell_out = paired_frames(agent, "starpilot", [], ["restrict-themes"], 4, 3, 0, "easy", stride=2)
    kept = [(int(f[0, 0, 0]), int(f[0, 0, 1])) for f in source]   # (step, env) of every pair kept
    # steps 0, 2 and 4 of every env (env 1's 5th step ends its pairing after the step-4 state), step 6 of 0 and 2
    assert kept == [(0, 0), (0, 1), (0, 2), (2, 0), (2, 1), (2, 2), (4, 0), (4, 1), (4, 2), (6, 0), (6, 2)]
    assert torch.equal(source, target) and fell_out == 1
    both = paired_frames(agent, "starpilot", ["restrict-themes"], ["restrict-themes"], 4, 3, 0, "easy", stride=2)
    assert len(both[0]) == 12 and both[2] == 0


def test_paired_states_measured_again_for_a_finished_run_are_the_runs_own(source_run, tmp_path, load_script, capsys):
    script = load_script("procgen_paired_states")
    run = tmp_path / "adapt"
    tiny_adapt(source_run, run, paired_steps=3)
    metrics = json.loads((run / "metrics.json").read_text())
    assert script.main([str(run), "--device", "cpu"]) == 0
    assert "measured again exactly" in capsys.readouterr().out
    (run / "metrics.json").write_text(json.dumps({k: v for k, v in metrics.items() if k != "paired_states"}))
    assert script.main([str(run), "--device", "cpu"]) == 0
    again = json.loads((run / "metrics.json").read_text())["paired_states"]
    assert again == metrics["paired_states"] and again["envs_out_of_step"] == 0
    tiny_adapt(source_run, tmp_path / "unpaired", paired_steps=0)
    assert script.main([str(tmp_path / "unpaired"), "--device", "cpu"]) == 2
    assert "--paired-steps 0" in capsys.readouterr().err


def test_paired_states_are_kept_every_stride_steps_over_the_episodes(source_run):
    """With stride 3 the kept states are steps 0, 3, 6 ... of the same play that stride 1 keeps whole."""
    adapter = ProcgenAdapter(ProcgenAdaptConfig(source=str(source_run), target=TARGET, device="cpu"))
    every = paired_frames(adapter.agent, "bigfish", [], [], 7, 4, 0, "easy", stride=1)[0].view(7, 4, 64, 64, 3)
    strided = paired_frames(adapter.agent, "bigfish", [], [], 3, 4, 0, "easy", stride=3)[0].view(3, 4, 64, 64, 3)
    assert torch.equal(strided, every[[0, 3, 6]])


def test_policy_divergence_by_hand():
    p, q = np.array([[0.5, 0.5], [0.9, 0.1], [1.0, 0.0]]), np.array([[0.25, 0.75], [0.9, 0.1], [0.0, 1.0]])
    d = policy_divergence(torch.tensor(p), torch.tensor(q))
    assert d["tv_from_source_policy"] == pytest.approx((0.25 + 0 + 1) / 3, abs=1e-9)

    def kl(a, b):   # in nats, 0 log 0 = 0
        return sum(x * np.log(x / y) for x, y in zip(a, b) if x > 0)
    js = [0.5 * kl(a, (a + b) / 2) + 0.5 * kl(b, (a + b) / 2) for a, b in zip(p, q)]
    assert js[2] == pytest.approx(np.log(2))       # disjoint policies: the bound, not a clamp's 18 nats
    assert d["js_from_source_policy"] == pytest.approx(np.mean(js), abs=1e-9)
    assert d["argmax_agreement"] == pytest.approx(1 / 3)
    h = [-(0.25 * np.log(0.25) + 0.75 * np.log(0.75)), -(0.9 * np.log(0.9) + 0.1 * np.log(0.1)), 0.0]
    assert d["policy_entropy"] == pytest.approx(np.mean(h), abs=1e-9)


def test_collected_transitions_are_strided_play_with_their_actions(source_run):
    """Uniform actions from a seeded generator: the kept transitions are steps 0, 2, 4 of that play, each
    with the action taken and the frame that followed, replayed here step by step."""
    adapter = ProcgenAdapter(ProcgenAdaptConfig(source=str(source_run), target=TARGET, device="cpu"))
    got = collect_frames(adapter.agent, "bigfish", ["monochrome"], 12, 4, "random", 9, "easy", stride=2)
    env = ProcgenVecEnv("bigfish", 4, "easy", num_levels=0, seed=9, **visual_options(["monochrome"]))
    rng = np.random.default_rng(9)
    env.reset()
    for step in range(5):
        actions = rng.integers(0, env.num_actions, 4)
        before = env.last_frames.copy()
        after, _, first = env.step_numpy(actions)
        if step % 2 == 0:
            rows = slice(step // 2 * 4, step // 2 * 4 + 4)
            assert np.array_equal(got.frames[rows].numpy(), before)
            assert np.array_equal(got.actions[rows].numpy(), actions)
            assert np.array_equal(got.next_frames[rows].numpy(), after)
            assert np.array_equal(got.continues[rows].numpy(), ~first.astype(bool))


def test_saved_frames_repeat_an_experiment(source_run, tmp_path):
    im = tiny_adapt(source_run, tmp_path / "a", method="shot-im", seed=5)
    assert json.loads((tmp_path / "a" / "config.json").read_text())["beta"] == 0  # SHOT-IM: no pseudo-labels
    assert all(e["action_agreement_with_pseudo_labels"] is None for e in im["epochs"])
    frames = tmp_path / "a" / "frames.npz"
    one = tiny_adapt(source_run, tmp_path / "b", method="shot-im", frames_file=str(frames), seed=5)
    two = tiny_adapt(source_run, tmp_path / "c", method="shot-im", frames_file=str(frames), seed=5)
    a = load_checkpoint(tmp_path / "b", kind="procgen-agent")["agent_state"]["model"]
    b = load_checkpoint(tmp_path / "c", kind="procgen-agent")["agent_state"]["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert one["epochs"] == two["epochs"]


def test_clear_errors_for_mismatched_sources_and_targets(source_run, tmp_path):
    with pytest.raises(ValueError, match="trained on bigfish but the target is starpilot"):
        tiny_adapt(source_run, tmp_path / "x", target="procgen:starpilot:monochrome")
    with pytest.raises(ValueError, match="unknown visual option"):
        parse_procgen_target("procgen:bigfish:sepia")
    with pytest.raises(ValueError, match="unknown Procgen game"):
        parse_procgen_target("procgen:bigfsh")
    with pytest.raises(ValueError, match="procgen:<game>"):
        parse_procgen_target("bigfish")
    rainbow = tiny_source(tmp_path / "rainbow", algo="rainbow")
    with pytest.raises(CheckpointError, match="needs a policy head"):
        tiny_adapt(rainbow, tmp_path / "y")


@pytest.mark.parametrize("method, epochs, stop_after", [("shot", 3, 2), ("anchored-im", 2, 1),
                                                         ("bufr", 2, 3)])   # BUFR: within its second block
def test_a_resumed_adaptation_ends_where_an_uninterrupted_one_does(source_run, tmp_path, interrupt_adaptation,
                                                                    capsys, method, epochs, stop_after):
    settings = dict(method=method, epochs=epochs, frames=64, batch_size=16, source_frames=64)
    whole = tiny_adapt(source_run, tmp_path / "whole", **settings)
    with interrupt_adaptation(after=stop_after):
        tiny_adapt(source_run, tmp_path / "cut", **settings)
    assert not (tmp_path / "cut" / "metrics.json").exists()
    assert adapt_main(["--source", str(source_run), "--target", TARGET, "--out", str(tmp_path / "cut")]) == 2
    assert re.search("already holds an unfinished run .*continue it with --resume", capsys.readouterr().err)
    with pytest.raises(ValueError, match="made with epochs=.*pass the same settings"):
        tiny_adapt(source_run, tmp_path / "cut", **{**settings, "epochs": epochs + 1}, resume=True)
    twin = shutil.copytree(source_run, tmp_path / "twin")
    with pytest.raises(ValueError, match="was adapting .*: resume it with the same --source"):
        tiny_adapt(twin, tmp_path / "cut", **settings, resume=True)
    resumed = tiny_adapt(os.path.relpath(source_run), tmp_path / "cut", **settings, resume=True)   # the same source
    assert resumed["epochs"] == whole["epochs"]   # every epoch's statistics, the first ones from before the cut
    assert resumed["resumed_after_epoch"] == stop_after and "resumed_after_epoch" not in whole
    whole_model = load_checkpoint(tmp_path / "whole", kind="procgen-agent")["agent_state"]["model"]
    resumed_model = load_checkpoint(tmp_path / "cut", kind="procgen-agent")["agent_state"]["model"]
    for name, weights in whole_model.items():
        assert torch.equal(weights, resumed_model[name]), name
    assert not (tmp_path / "cut" / ADAPT_STATE).exists()   # a finished run keeps its checkpoint only
    with pytest.raises(ValueError, match="holds a finished run .*nothing to resume"):
        tiny_adapt(source_run, tmp_path / "cut", **settings, resume=True)


def test_resume_needs_a_run_to_continue(source_run, tmp_path, capsys):
    with pytest.raises(ValueError, match="has no train-state.pt to resume from"):
        tiny_adapt(source_run, tmp_path / "empty", resume=True)
    assert adapt_main(["--source", str(source_run), "--target", TARGET, "--resume", "--overwrite",
                       "--out", str(tmp_path / "x"), "--device", "cpu"]) == 2
    assert "--resume continues the run in --out and --overwrite replaces it" in capsys.readouterr().err
    assert adapt_main(["--source", str(source_run), "--target", TARGET, "--resume", "--device", "cpu"]) == 2
    assert "--resume continues the run in --out: give its folder" in capsys.readouterr().err


def replaced(argv: list[str], flag: str, *values: str) -> list[str]:
    """argv with `flag`'s values replaced by `values`."""
    start = end = argv.index(flag) + 1
    while end < len(argv) and not argv[end].startswith("--"):
        end += 1
    return [*argv[:start], *values, *argv[end:]]


def test_adaptation_benchmark_tabulates_what_its_runs_score_and_resumes(source_run, tmp_path, capsys, load_script):
    """The table's figures are the adaptation runs' and the target-trained agent's own evaluations; the
    reference agent repeats the source recipe in the target visuals; a second call retrains nothing."""
    bench = load_script("run_procgen_adapt_benchmark")
    argv = ["--games", "bigfish", "--source-run", f"bigfish={source_run}", "--total-steps", "128", "--methods",
            "shot-im", "--visual", "no-backgrounds", "monochrome", "--frames", "64", "--epochs", "1", "--episodes", "2",
            "--paired-steps", "2", "--out", str(tmp_path), "--jobs", "2"]
    bench.main(argv)
    # side by side, every command's line and output go to a log beside its run
    assert "--visual no-backgrounds monochrome" in (tmp_path / "bigfish-target-s0.log").read_text()
    assert f"adapt --source {source_run}" in (tmp_path / "bigfish-shot-im-s0" / "adapt.log").read_text()
    rows = {r["column"]: r["return"] for r in map(json.loads, (tmp_path / "results.jsonl").read_text().splitlines())}
    adapted = json.loads((tmp_path / "bigfish-shot-im-s0" / "metrics.json").read_text())
    assert rows["shot-im, target"] == adapted["adapted_agent"]["target"]["mean_return"]
    assert rows["source agent, source"] == adapted["source_agent"]["source"]["mean_return"]
    target_run = tmp_path / "bigfish-target-s0"
    config = json.loads((target_run / "config.json").read_text())
    source_config = json.loads((source_run / "config.json").read_text())
    assert config["visual"] == ["no-backgrounds", "monochrome"] and config["env"] == "bigfish"
    assert config["agent"]["num_envs"] == source_config["agent"]["num_envs"]
    assert config["agent"]["num_steps"] == source_config["agent"]["num_steps"]
    assert json.loads((target_run / "metrics.json").read_text())["env_steps"] >= 128
    evaluation = json.loads((target_run / "evaluation_target_2.json").read_text())
    assert rows["trained in target, target"] == evaluation["mean_return"] and evaluation["episodes"] == 2
    # the floor: the uniform random policy on the same evaluation levels, in each domain
    floor = evaluate_random_policy("bigfish", 2, visual=["no-backgrounds", "monochrome"])
    assert rows["random policy, target"] == floor["mean_return"] and floor["episodes"] == 2
    assert rows["random policy, source"] == evaluate_random_policy("bigfish", 2)["mean_return"]
    # the validation levels: each agent's evaluation there, in the target visuals, gives the validation fraction
    val_name = "evaluation_no-backgrounds+monochrome_val_2.json"
    val = {name: json.loads((run / val_name).read_text())
           for name, run in (("adapted", tmp_path / "bigfish-shot-im-s0"), ("source", source_run), ("ceiling", target_run))}
    assert {v["start_level"] for v in val.values()} == {10_000} and {v["num_levels"] for v in val.values()} == {500}
    fraction = json.loads((tmp_path / "fractions.jsonl").read_text().splitlines()[0])
    assert fraction["val_return"] == val["adapted"]["mean_return"]
    assert fraction["val_fraction"] == bench.recovered_fraction(val["adapted"], val["source"], val["ceiling"])["fraction"]
    table = (tmp_path / "table.md").read_text()
    assert "| bigfish |" in table
    # the return table's columns are those a run filled, none for the methods not run here
    header = next(line for line in table.splitlines() if line.startswith("| game |"))
    returns = next(line for line in table.splitlines() if line.startswith("| bigfish |"))
    assert "| shot-im, target |" in header and "bufr" not in header and "—" not in returns
    tv = adapted["paired_states"]["adapted_agent"]["tv_from_source_policy"]
    assert f"| bigfish: shot-im | {tv:.3f} (n=1) |" in table
    stamp = (target_run / "checkpoint.pt").stat().st_mtime_ns
    bench.main(argv)
    assert (target_run / "checkpoint.pt").stat().st_mtime_ns == stamp
    # a later call with the same setting adds its method to the same table; nothing earlier is lost
    bench.main(replaced(argv, "--methods", "anchored-im"))
    columns = [r["column"] for r in map(json.loads, (tmp_path / "results.jsonl").read_text().splitlines())]
    assert {"shot-im, target", "anchored-im, target"} <= set(columns) and len(columns) == len(set(columns))
    fractions = [r["method"] for r in map(json.loads, (tmp_path / "fractions.jsonl").read_text().splitlines())]
    assert fractions == ["shot-im", "anchored-im"]
    table = (tmp_path / "table.md").read_text()
    assert "| bigfish: shot-im |" in table and "| bigfish: anchored-im |" in table
    header = next(line for line in table.splitlines() if line.startswith("| game |"))
    assert "| shot-im, target | anchored-im, target |" in header and "bufr" not in header
    assert (target_run / "checkpoint.pt").stat().st_mtime_ns == stamp
    # another setting is refused in one line, before anything runs or is written
    with pytest.raises(SystemExit, match="holds a benchmark with episodes 2 \\(now 3\\)"):
        bench.main(replaced(argv, "--episodes", "3"))
    assert (tmp_path / "table.md").read_text() == table
    twin = shutil.copytree(source_run, tmp_path.parent / f"{tmp_path.name}-twin")   # as good a source, but another
    with pytest.raises(SystemExit, match="bigfish-s0 source and ceiling"):
        bench.main(replaced(argv, "--source-run", f"bigfish={twin}"))
    # and without the setting file, the runs themselves are checked before they are reused
    (tmp_path / "setting.json").unlink()
    with pytest.raises(SystemExit, match="bigfish-shot-im-s0 was adapted with other settings \\(frames 64"):
        bench.main(replaced(argv, "--frames", "32"))
    with pytest.raises(SystemExit, match="bigfish-target-s0 was trained in the no-backgrounds\\+monochrome visuals"):
        bench.main(replaced(replaced(argv, "--visual", "monochrome"), "--methods", "bufr"))
    # a source run of another game is refused in one line
    with pytest.raises(SystemExit, match="give a PPO run on starpilot"):
        bench.main(["--games", "starpilot", "--source-run", f"starpilot={source_run}", "--out", str(tmp_path / "x")])


def test_benchmark_adapts_a_source_from_restricted_visuals_to_the_default_ones(source_run, tmp_path, load_script):
    """--source-visual/--visual default: the source trained in monochrome adapts to the renderer's own visuals;
    a given --target-run (trained in the default visuals) is the ceiling and no agent trains; the floor and
    every evaluation play the right domain; runs in other visuals are refused in one line."""
    bench = load_script("run_procgen_adapt_benchmark")
    plain = tiny_source(tmp_path / "plain", visual=["monochrome"])
    out = tmp_path / "out"
    argv = ["--games", "bigfish", "--source-visual", "monochrome", "--visual", "default", "--source-run",
            f"bigfish={plain}", "--target-run", f"bigfish={source_run}", "--total-steps", "128", "--methods",
            "shot-im", "--frames", "64", "--epochs", "1", "--episodes", "2", "--paired-steps", "0", "--out", str(out)]
    bench.main(argv)
    adapted = json.loads((out / "bigfish-shot-im-s0" / "metrics.json").read_text())
    assert adapted["target"] == "procgen:bigfish" and adapted["visual"] == []
    checkpoint = load_checkpoint(out / "bigfish-shot-im-s0" / "checkpoint.pt", kind="procgen-agent")
    assert checkpoint["config"]["visual"] == []
    assert not (out / "bigfish-target-s0").exists() and not (out / "bigfish-source-s0").exists()
    rows = {r["column"]: r["return"] for r in map(json.loads, (out / "results.jsonl").read_text().splitlines())}
    ceiling = json.loads((source_run / "evaluation_target_2.json").read_text())
    assert rows["trained in target, target"] == ceiling["mean_return"]
    source_in_source, _ = evaluate_checkpoint(plain, episodes=2, num_envs=2, visual=["monochrome"], device="cpu")
    assert rows["source agent, source"] == source_in_source["mean_return"]
    assert rows["random policy, source"] == evaluate_random_policy("bigfish", 2, visual=["monochrome"])["mean_return"]
    assert "source visuals monochrome, target visuals default" in (out / "table.md").read_text()
    with pytest.raises(SystemExit, match="trained in the default visuals"):   # a ceiling in the wrong domain
        bench.main([*argv[:-2], "--target-run", f"bigfish={plain}", "--out", str(tmp_path / "x")])
    with pytest.raises(SystemExit, match="both monochrome"):
        bench.main(["--games", "bigfish", "--source-visual", "monochrome", "--visual", "monochrome"])


def test_benchmark_runs_pad_online_as_pads_evaluation_and_trains_its_head(tmp_path, load_script):
    """pad-online is `--method pad --online` on the same source; either PAD trains the source with the head; a
    target in the default visuals is `procgen:<game>` with no options."""
    import argparse

    bench = load_script("run_procgen_adapt_benchmark")
    args = argparse.Namespace(given={"coinrun": None}, visual=[], source_visual=["monochrome"], frames=64, epochs=None,
                              episodes=8, paired_steps=0, methods=["pad-online"], precision="auto", extra=[])
    command = bench.adapt_command(tmp_path, "coinrun", "pad-online", 1, args)
    flags = command[command.index("adapt") + 1:]
    assert flags[flags.index("--target") + 1] == "procgen:coinrun"
    assert flags[flags.index("--method") + 1:flags.index("--method") + 3] == ["pad", "--online"]
    assert flags[flags.index("--source") + 1] == str(tmp_path / "coinrun-monochrome-source-s1")   # the sweep's name
    assert flags[flags.index("--out") + 1] == str(tmp_path / "coinrun-pad-online-s1")
    source = bench.source_args("coinrun", 1, args)
    assert source[source.index("--aux") + 1] == "inverse-dynamics" and source[-2:] == ["--visual", "monochrome"]
    assert "--visual" not in bench.target_args("coinrun", 1, args)      # the ceiling: the renderer's own visuals
    assert "--aux" not in bench.source_args("coinrun", 1, argparse.Namespace(**{**vars(args), "methods": ["bufr"]}))
    whole = bench.adapt_command(tmp_path, "coinrun", "pad-whole-encoder", 1, args)
    assert whole[whole.index("--method") + 1:whole.index("--method") + 3] == ["pad", "--no-pad-keep-fc"]
    assert "--pad-keep-fc" not in command and "--no-pad-keep-fc" not in command   # PAD's split is the default
    settings = {method: bench.adaptation_settings(tmp_path, "coinrun", method, 1, args)
                for method in ("pad", "pad-online", "pad-whole-encoder", "pad-online-whole-encoder", "bufr")}
    assert {m: (s["method"], s["pad_online"], s.get("pad_keep_fc")) for m, s in settings.items()} == {
        "pad": ("pad", False, True), "pad-online": ("pad", True, True), "pad-whole-encoder": ("pad", False, False),
        "pad-online-whole-encoder": ("pad", True, False), "bufr": ("bufr", False, None)}
    assert "pad-whole-encoder" not in bench.DEFAULT_METHODS and "pad-whole-encoder" in bench.BENCH_METHODS
    assert set(bench.ONLINE_METHODS) == {"pad-online", "pad-online-whole-encoder"}
    # online PAD's validation figure is the method run again on the validation levels, in the run's validation/
    val = bench.adapt_command(tmp_path, "coinrun", "pad-online", 1, args, split="val")
    assert val[val.index("--eval-split") + 1] == "val" and val[val.index("--paired-steps") + 1] == "0"
    assert val[val.index("--out") + 1] == str(tmp_path / "coinrun-pad-online-s1" / "validation")
    assert command[command.index("--eval-split") + 1] == "test"
    # a PAD run from before --pad-keep-fc existed adapted the whole encoder: reused as that ablation, not as pad
    old_run = tmp_path / "coinrun-pad-s1"
    old_run.mkdir()
    recorded = {k: v for k, v in settings["pad-whole-encoder"].items() if k != "pad_keep_fc"}
    (old_run / "config.json").write_text(json.dumps(recorded))
    bench.check_reusable(old_run, settings["pad-whole-encoder"])
    with pytest.raises(SystemExit, match="pad_keep_fc False \\(this driver: True\\)"):
        bench.check_reusable(old_run, settings["pad"])


def test_benchmark_validation_plays_checkpoints_there_and_runs_online_pad_again(tmp_path, load_script, monkeypatch):
    import argparse

    bench = load_script("run_procgen_adapt_benchmark")
    args = argparse.Namespace(given={"coinrun": None}, visual=["monochrome"], source_visual=[], frames=64,
                              epochs=None, episodes=8, paired_steps=0, methods=["pad-online", "bufr"],
                              precision="auto", extra=[], threads=None)
    commands, evaluated = [], []

    def run_logged(command, threads, log):   # records the command and finishes the run
        commands.append(command)
        out = Path(command[command.index("--out") + 1])
        out.mkdir(parents=True)
        (out / "metrics.json").write_text(json.dumps({"adapted_agent": {"target": {"mean_return": 4.0}}}))

    def final_evaluation(run, episodes, visual, name, threads, split):
        evaluated.append((run, episodes, visual, name, split))
        return {"mean_return": 3.0}

    monkeypatch.setattr(bench, "run_logged", run_logged)
    monkeypatch.setattr(bench, "final_evaluation", final_evaluation)
    assert bench.adapted_validation(tmp_path, "coinrun", "pad-online", 0, args)["mean_return"] == 4.0
    assert bench.adapted_validation(tmp_path, "coinrun", "pad-online", 0, args)["mean_return"] == 4.0  # kept
    assert len(commands) == 1 and commands[0][commands[0].index("--eval-split") + 1] == "val"
    assert bench.adapted_validation(tmp_path, "coinrun", "bufr", 0, args)["mean_return"] == 3.0
    assert evaluated == [(tmp_path / "coinrun-bufr-s0", 8, ["monochrome"], "evaluation_monochrome_val_8.json",
                          "val")]


def test_benchmark_resumes_an_interrupted_adaptation_and_restarts_one_cut_in_its_first_epoch(tmp_path, load_script,
                                                                                            monkeypatch):
    import argparse

    bench = load_script("run_procgen_adapt_benchmark")
    args = argparse.Namespace(given={"coinrun": None}, visual=[], source_visual=["monochrome"], frames=64, epochs=None,
                              episodes=8, paired_steps=0, methods=["bufr"], precision="auto", extra=[], threads=None)
    commands = []

    def run_logged(command, threads, log):   # records the command and finishes the run
        commands.append(command)
        (Path(command[command.index("--out") + 1]) / "metrics.json").write_text("{}")

    monkeypatch.setattr(bench, "run_logged", run_logged)
    cut, fresh = tmp_path / "coinrun-bufr-s0", tmp_path / "coinrun-bufr-s1"
    cut.mkdir()
    (cut / ADAPT_STATE).write_bytes(b"")
    bench.adapted_metrics(tmp_path, "coinrun", "bufr", 0, args)
    bench.adapted_metrics(tmp_path, "coinrun", "bufr", 1, args)
    bench.adapted_metrics(tmp_path, "coinrun", "bufr", 1, args)   # finished: not run again
    assert [c[c.index("--out") + 1:] for c in commands] == [[str(cut), "--no-progress", "--resume"],
                                                             [str(fresh), "--no-progress", "--overwrite"]]


def test_benchmark_jobs_run_side_by_side_and_fail_loudly(load_script):
    """run_all runs `jobs` tasks at once (two tasks meeting at a barrier deadlock when run one after the
    other), keeps the task order in its results and raises a task's failure."""
    import threading

    bench = load_script("run_procgen_adapt_benchmark")
    barrier = threading.Barrier(2, timeout=10)
    assert bench.run_all(2, [lambda: barrier.wait() * 0 + 1, lambda: barrier.wait() * 0 + 2]) == [1, 2]
    barrier = threading.Barrier(2, timeout=0.5)  # one at a time, the first task waits alone
    with pytest.raises(threading.BrokenBarrierError):
        bench.run_all(1, [barrier.wait, barrier.wait])

    def fail():
        raise RuntimeError("adaptation failed")
    with pytest.raises(RuntimeError, match="adaptation failed"):
        bench.run_all(2, [lambda: 1, fail])


def test_uniform_random_policy_is_uniform_and_evaluates_from_the_command_line(tmp_path, capsys):
    """`evaluate_procgen.py random:<game>`: every action equally often (chi-square over 15 actions), the same
    episodes again for the same seeds, and an unknown game refused in one line."""
    actions = UniformRandomPolicy(15, seed=0).act(torch.zeros(30_000, 64, 64, 3, dtype=torch.uint8))
    counts = np.bincount(actions.numpy(), minlength=15)
    chi2 = ((counts - 2000) ** 2 / 2000).sum()
    assert chi2 < 36.1  # the 0.999 quantile of chi-square with 14 degrees of freedom
    out = tmp_path / "random.json"
    argv = ["random:bigfish", "--episodes", "4", "--num-envs", "4", "--visual", "monochrome", "--out", str(out)]
    assert evaluate_main(argv) == 0
    result = json.loads(out.read_text())
    assert result["policy"] == "uniform random" and result["episodes"] == 4 and result["visual"] == ["monochrome"]
    assert result["mean_return"] == evaluate_random_policy("bigfish", 4, num_envs=4, visual=["monochrome"])[
        "mean_return"]
    capsys.readouterr()
    assert evaluate_main(["random:bigfsh", "--out", str(tmp_path / "x.json")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "'bigfsh'" in err[0] and "bigfish" in err[0]
    assert evaluate_main(["random:bigfish", "--deterministic", "--out", str(tmp_path / "x.json")]) == 2
    assert "--deterministic" in capsys.readouterr().err
    assert not (tmp_path / "x.json").exists()


def test_anchored_im_terms_by_hand():
    from agents.adapt.anchored import anchor_kl, marginal_kl

    probs = torch.tensor([[0.7, 0.2, 0.1], [0.1, 0.6, 0.3]])
    marginal = torch.tensor([0.5, 0.25, 0.25])
    p_bar = np.array([0.4, 0.4, 0.2])
    assert marginal_kl(probs, marginal).item() == pytest.approx(
        sum(p * np.log(p / m) for p, m in zip(p_bar, [0.5, 0.25, 0.25])), abs=1e-6)
    source = torch.tensor([[1.0, 0.0, 0.0], [0.2, 0.3, 0.5]])
    logits = torch.tensor([[2.0, 0.0, -1.0], [0.0, 1.0, 0.5]])
    q = torch.softmax(logits, 1).numpy()
    by_hand = [sum(p * np.log(p / b) for p, b in zip(row, qrow) if p > 0) for row, qrow in zip(source.numpy(), q)]
    assert anchor_kl(source, logits).item() == pytest.approx(np.mean(by_hand), abs=1e-6)
    assert anchor_kl(torch.softmax(logits, 1), logits).item() == pytest.approx(0, abs=1e-6)


def test_the_kl_anchor_keeps_the_policys_entropy_near_the_sources(source_run, tmp_path):
    """A source policy whose action marginal on the target frames is far from its marginal in its own visuals
    (TV 0.36 here), so the diversity term pulls hard: without the anchor the policy's entropy on the target
    frames falls by more than 0.2 nats in three epochs; with a strong anchor it stays within 0.05 nats of
    the source policy's on the same frames."""

    from agents.adapt import features_and_policy, policy_entropy
    from workbench.checkpoint import save_checkpoint

    # a source policy with structure to lose: the tiny run's policy head (orthogonal, gain 0.01) scaled up
    shutil.copytree(source_run, tmp_path / "source")
    source_run = tmp_path / "source"
    state = load_checkpoint(source_run, kind="procgen-agent")
    state["agent_state"]["model"]["policy_head.weight"] *= 10
    save_checkpoint(source_run / "checkpoint.pt", "procgen-agent", state)
    runs = {}
    for weight in (0.0, 100.0):
        runs[weight] = tiny_adapt(source_run, tmp_path / f"anchor-{weight}", method="anchored-im", frames=256,
                                  epochs=3, seed=1, source_frames=256, anchor_weight=weight)
    data = TargetFrames.load(tmp_path / "anchor-0.0" / "frames.npz", "bigfish")

    def entropy_of(run) -> float:
        adapter = ProcgenAdapter(ProcgenAdaptConfig(source=str(run), target=TARGET, device="cpu"))
        return policy_entropy(features_and_policy(adapter.model, data.frames, adapter.rt)[1])
    source_entropy = entropy_of(source_run)
    assert runs[0.0]["epochs"][0]["source_policy_entropy"] == pytest.approx(source_entropy, abs=1e-5)
    assert runs[0.0]["epochs"][0]["marginal_tv_to_source"] > 0.2
    assert entropy_of(tmp_path / "anchor-0.0") < source_entropy - 0.2
    assert abs(entropy_of(tmp_path / "anchor-100.0") - source_entropy) < 0.05   # 0.009 here


def test_recovered_fraction_and_its_interval_by_hand(load_script):
    bench = load_script("run_procgen_adapt_benchmark")
    adapted, source, ceiling = ({"mean_return": 5.0, "stderr_return": 0.3}, {"mean_return": 3.0, "stderr_return": 0.2},
                                {"mean_return": 7.0, "stderr_return": 0.4})
    got = bench.recovered_fraction(adapted, source, ceiling)
    f = 0.5
    sd = np.sqrt(0.3 ** 2 + (f - 1) ** 2 * 0.2 ** 2 + f ** 2 * 0.4 ** 2) / 4.0
    assert got["fraction"] == pytest.approx(f) and got["low"] == pytest.approx(f - 1.96 * sd)
    assert got["high"] == pytest.approx(f + 1.96 * sd)
    assert bench.recovered_fraction(adapted, ceiling, source)["fraction"] is None   # no gap to win back
    rows = [{"game": "g", "method": "m", "seed": s, "fraction": v, "low": None, "high": None}
            for s, v in enumerate((0.2, 0.4, 0.9))]
    half = 4.302652729911275 * np.std([0.2, 0.4, 0.9], ddof=1) / np.sqrt(3)   # t(0.975, 2)
    assert f"| g | m | 0.50 | [{0.5 - half:.2f}, {0.5 + half:.2f}] | 3 |" in bench.fraction_table(rows)


def test_the_method_is_chosen_on_its_validation_fraction_and_reported_on_test(load_script):
    """The choice reads the validation fractions only: the method with the best test figure is not chosen when
    another is better on validation, and a method without a validation figure on every seed is not a candidate."""
    bench = load_script("run_procgen_adapt_benchmark")

    def row(method, seed, test, val):
        return {"game": "g", "method": method, "seed": seed, "fraction": test, "low": None, "high": None,
                "val_fraction": val}

    rows = [row("best-on-test", 0, 0.9, 0.1), row("best-on-test", 1, 0.8, 0.2),
            row("best-on-val", 0, 0.3, 0.5), row("best-on-val", 1, 0.5, 0.3),
            row("unvalidated", 0, 0.2, 0.9), row("unvalidated", 1, 0.2, None)]
    [(game, method, val, summary)] = bench.chosen_on_validation(rows)
    assert (game, method, val) == ("g", "best-on-val", pytest.approx(0.4))
    assert summary[0] == pytest.approx(0.4) and summary[3] == 2   # its test fraction over its seeds
    table = bench.fraction_table(rows)
    assert "- g: best-on-val (validation fraction 0.40); on the test episodes 0.40" in table
    assert "| g | best-on-test | 0.85 |" in table and table.count("| 0.15 |") == 1   # its validation mean
    assert bench.chosen_on_validation([{**r, "val_fraction": None} for r in rows]) == []


def test_a_validation_without_a_gap_to_the_ceiling_is_named_not_left_blank(load_script):
    """Where every seed was evaluated on the validation levels but the ceiling did not beat the source agent there
    (recovered_fraction gives None), the cell says so; a method never evaluated there keeps a blank cell."""
    bench = load_script("run_procgen_adapt_benchmark")
    source, ceiling = {"mean_return": 4.4, "stderr_return": 0.5}, {"mean_return": 3.8, "stderr_return": 0.5}
    assert bench.recovered_fraction({"mean_return": 0.4}, source, ceiling)["fraction"] is None

    def row(method, val_return):
        return {"game": "g", "method": method, "seed": 0, "fraction": -8.0, "low": -27.7, "high": 11.7,
                "val_fraction": None, "val_return": val_return}

    table = bench.fraction_table([row("evaluated", 0.4), row("unevaluated", None)])
    assert "| g | evaluated | -8.00 | [-27.70, 11.70] | 1 | — (no gap to the ceiling) |" in table
    assert "| g | unevaluated | -8.00 | [-27.70, 11.70] | 1 |  |" in table
    assert "chosen on the validation levels" not in table
    mixed = bench.fraction_table([row("mixed", 0.4), {**row("mixed", 1.0), "seed": 1, "val_fraction": 0.3}])
    assert "no gap" not in mixed and mixed.rstrip().endswith("| 2 |  |")   # one seed had a gap: no mean, no claim


def test_shifts_table_counts_the_pairs_each_method_wins_half_of(load_script, tmp_path):
    bench = load_script("run_procgen_adapt_benchmark")

    def benchmark(name: str, visual: list[str], fractions: list[tuple], source: str = "s") -> Path:
        """(method, seed, fraction, low, high[, validation fraction]) rows of one folder."""
        out = tmp_path / name
        out.mkdir()
        (out / bench.SETTING_FILE).write_text(json.dumps({"source_visual": ["monochrome"], "visual": visual,
                                                          "source_and_ceiling": {"starpilot-s0": [source, "c"]}}))
        (out / "fractions.jsonl").write_text("".join(json.dumps(
            {"game": "starpilot", "method": m, "seed": s, "fraction": f, "low": lo, "high": hi,
             "val_fraction": val[0] if val else None}) + "\n" for m, s, f, lo, hi, *val in fractions))
        return out

    first = benchmark("a", [], [("bufr", 0, 0.6, 0.1, 1.1, 0.2), ("pad", 0, 0.7, -0.1, 1.5, 0.1)])
    # a folder of the same shift and source agent: its method joins the choice on validation
    variant = benchmark("a2", [], [("pad-online", 0, 0.45, 0.2, 0.7, 0.4)])
    # the same shift from another source agent is another pair
    other = benchmark("a3", [], [("bufr", 0, 0.9, 0.8, 1.0, 0.9)], source="another")
    # three seeds whose mean is just below the bar: 0.497 is not half, whatever it rounds to
    second = benchmark("b", ["no-backgrounds"], [("bufr", 0, 0.53, 0, 0), ("bufr", 1, 0.55, 0, 0),
                                                ("bufr", 2, 0.411, 0, 0)])
    table = bench.shifts_table([first, variant, second, other])
    half = 4.302652729911275 * np.std([0.53, 0.55, 0.411], ddof=1) / np.sqrt(3)   # t(0.975, 2)
    shift, again = "monochrome → default (from s)", "monochrome → default (from another)"
    assert f"| starpilot | {shift} | bufr | 0.600 | [0.10, 1.10] | 1 | yes |" in table
    assert f"| starpilot | {shift} | pad | 0.700 | [-0.10, 1.50] | 1 | no |" in table   # touches zero
    assert (f"| starpilot | monochrome → no-backgrounds | bufr | 0.497 | [{0.497 - half:.2f}, {0.497 + half:.2f}] "
            "| 3 | no |") in table
    assert f"- bufr: 2 of the 3 pairs it ran on (starpilot {shift}; starpilot {again})" in table
    assert "- pad: 0 of the 1 pairs it ran on" in table
    # chosen on validation: pad-online (0.4) over bufr (0.2) on the first source, whatever the test figures say;
    # no choice where no method has a validation figure
    assert f"| starpilot | {shift} | chosen on validation (pad-online) | 0.450 | [0.20, 0.70] | 1 | no |" in table
    assert f"| starpilot | {again} | chosen on validation (bufr) | 0.900 | [0.80, 1.00] | 1 | yes |" in table
    assert table.count("chosen on validation (") == 2
    assert f"- chosen on validation: 1 of the 2 pairs it ran on (starpilot {again})" in table
    with pytest.raises(SystemExit, match="holds no benchmark"):
        bench.shifts_table([first, tmp_path / "missing"])
