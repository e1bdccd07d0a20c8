"""PAD (Hansen et al. 2021) for the Procgen agents: the inverse-dynamics head trained beside PPO and Rainbow
(train_procgen.py --aux inverse-dynamics) and `workbench adapt --method pad`, offline and online."""

import json
import shutil
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from adaptation.cli import adapt_config, adapt_main
from agents.adapt import ProcgenAdaptConfig, ProcgenAdapter, pad
from agents.adapt.pad import pad_step
from agents.cli import config_from_args, parse_train_args, train_main
from agents.evaluate import evaluate_checkpoint, split_levels
from agents.inverse_dynamics import (AUX_WEIGHT, HIDDEN_DIM, PAD_BATCH_SIZE, PAD_LR, InverseDynamicsHead,
                                     action_accuracy, cropped_transitions, inverse_dynamics_loss)
from agents.ppo import PPO, ActorCritic, PPOConfig
from agents.rainbow import Rainbow, RainbowConfig
from agents.regularizers import RandomCrop
from agents.replay import PrioritizedReplay
from agents.rollouts import TargetFrames
from agents.train import Trainer, TrainConfig
from envs.procgen import ProcgenVecEnv
from workbench.backbones import create_backbone
from workbench.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from workbench.logging import read_scalars
from workbench.runtime import Runtime

TARGET = "procgen:bigfish:no-backgrounds+monochrome"
HEAD = "inverse_dynamics."
# the finished run's feature statistics (BUFR's) take longer than the tiny run itself: left out here
QUICK = {"feature_stats_frames": 0} if "feature_stats_frames" in TrainConfig.__dataclass_fields__ else {}


def tiny_run(run_dir, algo="ppo", aux="inverse-dynamics", mixreg=False):
    agent = {"num_envs": 4, "num_steps": 32, "num_minibatches": 4} if algo == "ppo" else \
        {"num_envs": 4, "buffer_size": 512, "warmup_steps": 64, "batch_size": 16, "update_every": 16}
    agent.update(backbone="impala_half", mixreg=mixreg, **({"aux": aux} if aux != "none" else {}))
    Trainer(TrainConfig(env="bigfish", algo=algo, total_steps=128, eval_interval=100, eval_episodes=2,
                        num_test_envs=2, precision="fp32", run_dir=str(run_dir), progress=False, video=False,
                        agent=agent, **QUICK)).run()
    return run_dir


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("pad-sources")
    return {"ppo": tiny_run(root / "ppo"), "rainbow": tiny_run(root / "rainbow", "rainbow"),
            "plain": tiny_run(root / "plain", aux="none")}


def tiny_pad(source, run_dir, **overrides):
    cfg = dict(source=str(source), target=TARGET, method="pad", frames=64, num_envs=8, epochs=2, batch_size=16,
               eval_episodes=0, paired_steps=0, run_dir=str(run_dir), progress=False, device="cpu")
    return ProcgenAdapter(ProcgenAdaptConfig(**{**cfg, **overrides})).run()


def network(state: dict) -> dict:
    """The acting network's weights in a Procgen checkpoint."""
    agent = state["agent_state"]
    return agent["model"] if "model" in agent else agent["online"]


# ---------------------------------------------------------------- the head and its loss
def test_head_is_pads_mlp_and_the_loss_leaves_out_episode_ends():
    torch.manual_seed(0)
    head = InverseDynamicsHead(4, 15)
    layers = [m for m in head.trunk if isinstance(m, torch.nn.Linear)]
    assert [(m.in_features, m.out_features) for m in layers] == [(8, HIDDEN_DIM), (HIDDEN_DIM, HIDDEN_DIM),
                                                                 (HIDDEN_DIM, 15)]
    for m in layers:  # orthogonal (gain 1), zero biases, as PAD's weight_init
        w = m.weight.double()
        gram = w.T @ w if w.shape[0] >= w.shape[1] else w @ w.T
        torch.testing.assert_close(gram, torch.eye(len(gram), dtype=torch.float64), atol=1e-5, rtol=0)
        assert not m.bias.any()
    f, f_next = torch.randn(5, 4), torch.randn(5, 4)
    x = np.concatenate([f.numpy(), f_next.numpy()], 1).astype(np.float64)
    for i, m in enumerate(layers):
        x = x @ m.weight.detach().double().numpy().T + m.bias.detach().double().numpy()
        x = np.maximum(x, 0) if i < 2 else x
    logits = head(f, f_next)
    np.testing.assert_allclose(logits.detach().numpy(), x, rtol=1e-4, atol=1e-5)

    logits = torch.tensor([[2.0, 0.5, -1.0], [0.0, 3.0, 1.0], [1.0, 1.0, 1.0], [-2.0, 0.0, 4.0]], requires_grad=True)
    actions, continues = torch.tensor([0, 2, 1, 2]), torch.tensor([True, False, True, True])
    z = logits.detach().numpy().astype(np.float64)
    log_softmax = z - np.log(np.exp(z).sum(1, keepdims=True))
    by_hand = -np.mean([log_softmax[i, a] for i, a in enumerate(actions.numpy()) if continues[i]])   # rows 0, 2, 3
    loss = inverse_dynamics_loss(logits, actions, continues)
    assert loss.item() == pytest.approx(by_hand, abs=1e-6)
    loss.backward()
    assert not logits.grad[1].any()  # the episode's end teaches nothing
    assert action_accuracy(logits, actions, continues).item() == pytest.approx(2 / 3)  # rows 0 and 3 of 0, 2, 3
    nothing = torch.zeros(2, 3, requires_grad=True)
    none = inverse_dynamics_loss(nothing, torch.tensor([0, 1]), torch.tensor([False, False]))
    none.backward()
    assert none.item() == 0 and not nothing.grad.any()


MOVES = np.array([1, 3, 5, 7])  # left, down, up, right


def fixed_policy_transitions(count: int, seed: int) -> TargetFrames:
    """Coinrun played by a fixed policy, uniform over the four moves: its camera follows the agent, so a move
    shows in the whole frame, and the action is visible in (s_t, s_{t+1}) but not in s_t alone."""
    env = ProcgenVecEnv("coinrun", 16, "easy", num_levels=0, seed=seed)
    env.reset()
    rng = np.random.default_rng(seed)
    frames, actions, following, continues = [], [], [], []
    while len(frames) * 16 < count:
        a = MOVES[rng.integers(0, len(MOVES), 16)]
        frames.append(env.last_frames.copy())
        after, _, first = env.step_numpy(a)
        actions.append(a), following.append(after.copy()), continues.append(~first.astype(bool))
    return TargetFrames(*(torch.from_numpy(np.concatenate(x)) for x in (frames, actions, following, continues)))


def test_the_head_predicts_actions_better_than_chance_on_a_trained_encoder():
    """A head trained with its encoder on the inverse-dynamics loss (PAD's update) predicts held-out actions of
    unseen levels far better than chance (1/15), than the best guess that ignores the frames (the most frequent
    action, counted here), and than the same head trained as long on a frozen random-initialised encoder."""
    train, test = fixed_policy_transitions(2048, seed=1), fixed_policy_transitions(512, seed=2)
    kept = test.continues.numpy()
    majority = np.bincount(test.actions.numpy()[kept], minlength=15).max() / kept.sum()
    accuracy = {}
    for trained_encoder in (True, False):
        torch.manual_seed(0)
        net = ActorCritic(create_backbone("impala_half"), 15, inverse_dynamics=True)
        net.requires_grad_(False)
        net.inverse_dynamics.requires_grad_(True)
        net.backbone.requires_grad_(trained_encoder)
        optimizer = torch.optim.Adam([p for p in net.parameters() if p.requires_grad], lr=PAD_LR)
        generator = torch.Generator().manual_seed(0)
        for _ in range(120):
            idx = train.continues.nonzero().squeeze(1)[torch.randint(int(train.continues.sum()), (32,),
                                                                     generator=generator)]
            pad_step(net, optimizer, train.frames[idx], train.actions[idx], train.next_frames[idx])
        with torch.no_grad():
            net.eval()
            logits = net.inverse_dynamics(net.encode(test.frames), net.encode(test.next_frames))
        by_hand = float((logits.argmax(1).numpy() == test.actions.numpy())[kept].mean())
        assert action_accuracy(logits, test.actions, test.continues).item() == pytest.approx(by_hand)
        accuracy[trained_encoder] = by_hand
    assert accuracy[True] > max(1 / 15, majority) + 0.15, (accuracy, majority)
    assert accuracy[True] > accuracy[False] + 0.1, accuracy


# ---------------------------------------------------------------- training beside PPO and Rainbow
def ppo_agent(mixreg=False, num_steps=40):
    env = ProcgenVecEnv("bigfish", 3, seed=7)
    cfg = PPOConfig(num_envs=3, num_steps=num_steps, num_minibatches=2, backbone="impala_half", mixreg=mixreg,
                    aux="inverse-dynamics")
    return PPO(env, cfg, Runtime.create("cpu", "fp32"))


def test_ppo_trains_the_head_on_the_rollouts_real_transitions():
    """s_{t+1} of every rollout step is the frame that followed it in play (replayed here with the rollout's
    actions), the rollout's last step included; a transition whose episode ended is left out; with mixreg the
    inverse-dynamics loss is the one of the clean frames, computed here from the model by hand."""
    torch.manual_seed(0)
    agent = ppo_agent(mixreg=True)
    agent.collect_rollout()
    buf, t, n = agent.buffer, agent.cfg.num_steps, agent.cfg.num_envs
    replay = ProcgenVecEnv("bigfish", 3, seed=7)
    replay.reset()
    played, ends = [replay.last_frames.copy()], []
    for step in range(t):
        after, _, first = replay.step_numpy(buf["actions"][step].numpy())
        played.append(after.copy()), ends.append(first.astype(bool))
    played = torch.from_numpy(np.stack(played))
    assert torch.equal(buf["obs"], played[:t]) and torch.equal(buf["dones"], torch.from_numpy(np.stack(ends)))
    assert torch.equal(buf["final_obs"], played[t])
    every = torch.arange(t * n)
    assert torch.equal(agent._next_frames(every), played[1:].flatten(0, 1))

    idx = torch.randperm(t * n)[:32]
    mb = {"obs": buf["obs"].flatten(0, 1)[idx], "actions": buf["actions"].flatten()[idx],
          "old_logprobs": buf["logprobs"].flatten()[idx], "old_values": buf["values"].flatten()[idx],
          "advantages": torch.randn(32), "returns": torch.randn(32),
          "continues": ~buf["dones"].flatten()[idx], "next_obs": played[1:].flatten(0, 1)[idx]}
    model = agent.model
    with torch.no_grad():
        logits = model.inverse_dynamics(model.encode(mb["obs"]), model.encode(mb["next_obs"])).double()
    kept = mb["continues"].numpy()
    by_hand = -F.log_softmax(logits, 1)[torch.arange(32), mb["actions"]].numpy()[kept].mean()
    _, stats = agent._minibatch_loss(mb)   # mixreg mixes the PPO terms' frames, not these
    assert stats["inverse_dynamics"].item() == pytest.approx(by_hand, rel=1e-5)


def test_one_window_crops_both_frames_of_a_transition():
    """cropped_transitions: every transition gets its own window, the same for s_t and s_{t+1}, as a crop
    of the resized frame computed here by hand."""
    torch.manual_seed(3)
    frames = torch.randint(0, 256, (6, 64, 64, 3), dtype=torch.uint8)
    next_frames = torch.randint(0, 256, (6, 64, 64, 3), dtype=torch.uint8)
    crop = RandomCrop()
    cropped, next_cropped = cropped_transitions(frames, next_frames, crop)
    for i in range(6):
        dy, dx = int(crop.dy[i]), int(crop.dx[i])
        for source, out in ((frames, cropped), (next_frames, next_cropped)):
            big = F.interpolate(source[i:i + 1].permute(0, 3, 1, 2).float(), size=(75, 75), mode="bilinear",
                                align_corners=False).permute(0, 2, 3, 1)[0].to(torch.uint8)
            assert torch.equal(out[i], big[dy:dy + 64, dx:dx + 64])
    assert len({(int(y), int(x)) for y, x in zip(crop.dy, crop.dx)}) > 1    # windows differ between transitions


@pytest.mark.parametrize("algo", ["ppo", "rainbow"])
def test_the_head_learns_on_crops_exactly_when_aux_crop_is_set(monkeypatch, algo):
    """With aux_crop the inverse-dynamics loss reads the cropped transitions (PAD's training), its s_t and
    s_{t+1} the batch's own; without it, the frames as stored."""
    import agents.ppo
    import agents.rainbow

    seen = []

    def spy(frames, next_frames, crop=None):
        seen.append((frames.clone(), next_frames.clone()))
        return frames, next_frames

    monkeypatch.setattr(agents.ppo if algo == "ppo" else agents.rainbow, "cropped_transitions", spy)
    for aux_crop in (False, True):
        seen.clear()
        if algo == "ppo":
            agent = PPO(ProcgenVecEnv("bigfish", 2, seed=1), PPOConfig(
                num_envs=2, num_steps=8, num_minibatches=1, backbone="impala_half", aux="inverse-dynamics",
                aux_crop=aux_crop), Runtime.create("cpu", "fp32"))
            mb = {"obs": torch.randint(0, 256, (4, 64, 64, 3), dtype=torch.uint8), "actions": torch.arange(4),
                  "next_obs": torch.randint(0, 256, (4, 64, 64, 3), dtype=torch.uint8),
                  "continues": torch.ones(4, dtype=torch.bool)}
            agent._inverse_dynamics(mb)
            batch = (mb["obs"], mb["next_obs"])
        else:
            agent = Rainbow(ProcgenVecEnv("bigfish", 2, seed=1), RainbowConfig(
                num_envs=2, backbone="impala_half", aux="inverse-dynamics", aux_crop=aux_crop, buffer_size=64),
                Runtime.create("cpu", "fp32"))
            mb = {"obs": torch.randint(0, 256, (4, 64, 64, 3), dtype=torch.uint8), "actions": torch.arange(4),
                  "one_step_obs": torch.randint(0, 256, (4, 64, 64, 3), dtype=torch.uint8),
                  "one_step_continues": torch.ones(4, dtype=torch.bool)}
            agent._inverse_dynamics(mb)
            batch = (mb["obs"], mb["one_step_obs"])
        assert len(seen) == int(aux_crop)
        if aux_crop:
            assert torch.equal(seen[0][0], batch[0]) and torch.equal(seen[0][1], batch[1])


def test_rainbow_replay_gives_one_step_successors_not_the_n_step_frame():
    replay = PrioritizedReplay(capacity=4 * 12, num_envs=4, obs_shape=(1, 1, 1), n_step=3)
    rng = np.random.default_rng(0)
    history, ends = [], []
    for t in range(12):
        frame = (10 * t + np.arange(4)).astype(np.uint8).reshape(4, 1, 1, 1)   # row t, env e -> 10 t + e
        done = rng.random(4) < 0.3
        replay.add(frame, rng.integers(0, 15, 4), np.zeros(4, np.float32), done)
        history.append(frame), ends.append(done)
    sample = replay.sample(64, 0.4, np.random.default_rng(1), one_step=True)
    t, e = sample["obs"].ravel() // 10, sample["obs"].ravel() % 10
    assert np.array_equal(sample["one_step_obs"], np.stack(history)[t + 1, e])
    assert np.array_equal(sample["next_obs"], np.stack(history)[t + 3, e])
    assert np.array_equal(sample["one_step_continues"], ~np.stack(ends)[t, e])
    assert "one_step_obs" not in replay.sample(8, 0.4, np.random.default_rng(1))


@pytest.mark.parametrize("algo", ["ppo", "rainbow"])
def test_training_with_the_head_checkpoints_it_and_evaluation_never_reads_it(runs, tmp_path, algo):
    run = runs[algo]
    state = load_checkpoint(run, kind="procgen-agent")
    weights = network(state)
    assert weights[HEAD + "trunk.0.weight"].shape == (HIDDEN_DIM, 2 * 256)
    assert weights[HEAD + "trunk.4.weight"].shape == (15, HIDDEN_DIM)
    assert state["config"]["agent"]["aux"] == "inverse-dynamics"
    logged = read_scalars(run, ("losses/inverse_dynamics", "losses/inverse_dynamics_accuracy"))
    assert logged["losses/inverse_dynamics"] and all(0 <= a <= 1 for _, a in logged["losses/inverse_dynamics_accuracy"])
    # the head loads back as saved (the adapter builds the agent from the checkpoint's config)
    adapter = ProcgenAdapter(ProcgenAdaptConfig(source=str(run), target=TARGET, method="pad", device="cpu"))
    assert all(torch.equal(v, weights[HEAD + k]) for k, v in adapter.model.inverse_dynamics.state_dict().items())
    # NaN in every weight of the head: evaluation plays exactly the same episodes
    shutil.copytree(run, tmp_path / "nan")
    for k in weights:
        if k.startswith(HEAD):
            weights[k] = torch.full_like(weights[k], float("nan"))
    save_checkpoint(tmp_path / "nan" / "checkpoint.pt", "procgen-agent", state)
    results = []
    for source in (run, tmp_path / "nan"):
        torch.manual_seed(0)
        results.append(evaluate_checkpoint(source, episodes=4, num_envs=2, device="cpu")[0]["mean_return"])
    assert results[0] == results[1]


def test_a_checkpoint_from_before_the_head_still_loads_and_its_config_has_no_head(runs):
    state = load_checkpoint(runs["plain"], kind="procgen-agent")
    assert "aux" not in state["config"]["agent"] and not any(k.startswith(HEAD) for k in network(state))
    assert PPOConfig(**state["config"]["agent"]).aux == "none"
    result, _ = evaluate_checkpoint(runs["plain"], episodes=2, num_envs=2, device="cpu")
    assert result["episodes"] == 2


def test_train_procgen_options():
    cfg = config_from_args(parse_train_args(["--aux", "inverse-dynamics", "--algo", "rainbow"]))
    assert cfg.agent["aux"] == "inverse-dynamics" and cfg.agent["aux_weight"] == AUX_WEIGHT == 1.0
    cfg = config_from_args(parse_train_args(["--aux", "inverse-dynamics", "--aux-weight", "0.5"]))
    assert cfg.agent["aux_weight"] == 0.5 and PPOConfig(**cfg.agent).aux == "inverse-dynamics"
    assert "aux" not in config_from_args(parse_train_args([])).agent
    assert cfg.agent["aux_crop"] is True       # PAD's crops come with the head
    cfg = config_from_args(parse_train_args(["--aux", "inverse-dynamics", "--no-aux-crop"]))
    assert cfg.agent["aux_crop"] is False and PPOConfig().aux_crop is False   # older agents: no crops
    with pytest.raises(ValueError, match="add --aux inverse-dynamics"):
        config_from_args(parse_train_args(["--aux-crop"]))
    cfg = adapt_config(["--source", "x", "--target", TARGET, "--method", "pad", "--online", "--pad-batch-size", "4"])
    assert cfg.pad_online and cfg.pad_batch_size == 4 and cfg.lr == PAD_LR and cfg.batch_size == 128
    assert adapt_config(["--source", "x", "--target", TARGET, "--method", "pad"]).pad_batch_size == PAD_BATCH_SIZE == 32
    # None: PAD's split wherever the encoder has a dense layer (check_source decides, on the loaded agent)
    assert adapt_config(["--source", "x", "--target", TARGET, "--method", "pad"]).pad_keep_fc is None
    assert adapt_config(["--source", "x", "--target", TARGET, "--method", "pad", "--pad-keep-fc"]).pad_keep_fc
    assert adapt_config(["--source", "x", "--target", TARGET, "--method", "pad", "--no-pad-keep-fc"]).pad_keep_fc \
        is False
    for flag in ("--pad-keep-fc", "--no-pad-keep-fc"):
        with pytest.raises(ValueError, match="are PAD's"):
            adapt_config(["--source", "x", "--target", TARGET, "--method", "bufr", flag])


# ---------------------------------------------------------------- adaptation
@pytest.mark.parametrize("algo", ["ppo", "rainbow"])
def test_offline_pad_trains_the_encoder_and_the_head_and_nothing_else(runs, tmp_path, algo):
    metrics = tiny_pad(runs[algo], tmp_path / "pad")
    before = load_checkpoint(runs[algo], kind="procgen-agent")
    after = load_checkpoint(tmp_path / "pad", kind="procgen-agent")
    old, new = network(before), network(after)
    # parameters of everything but the encoder and the head are byte-identical (Rainbow's noise draws may differ)
    buffers = {name for name in new if name.endswith(("eps_in", "eps_out", "eps_bias"))}
    moved = {name for name in old if name not in buffers and not torch.equal(old[name], new[name])}
    assert moved and all(name.startswith(("backbone.", HEAD)) for name in moved), moved
    assert any(name.startswith("backbone.") for name in moved) and any(name.startswith(HEAD) for name in moved)
    if algo == "rainbow":
        target = after["agent_state"]["target"]   # a training-time copy: left as it was
        assert all(torch.equal(v, target[k]) for k, v in before["agent_state"]["target"].items())
    assert len(metrics["epochs"]) == 2 and all(0 <= e["inverse_dynamics_accuracy"] <= 1 for e in metrics["epochs"])
    assert metrics["epochs"][0]["transitions"] == int(TargetFrames.load(tmp_path / "pad" / "frames.npz",
                                                                       "bigfish").continues.sum())
    assert evaluate_checkpoint(tmp_path / "pad", episodes=2, num_envs=2, device="cpu")[0]["episodes"] == 2


@pytest.mark.parametrize("algo", ["ppo", "rainbow"])
def test_offline_pad_keeps_the_encoders_dense_layer_by_default_and_adapts_it_when_told(runs, tmp_path, algo):
    """PAD's split: the conv trunk and the head move, the dense layer the policy (Rainbow: the Q heads, through
    its noisy trunk layer) reads stays as trained; --no-pad-keep-fc moves it too. config.json says which ran."""
    old = network(load_checkpoint(runs[algo], kind="procgen-agent"))
    weights = {name for name in old if not name.endswith(("eps_in", "eps_out", "eps_bias"))}   # not noise draws
    dense = {name for name in weights if name.startswith("backbone.fc.")}
    assert dense   # IMPALA's fc, a NoisyLinear in Rainbow's trunk
    for keep, run in ((None, "default"), (False, "whole")):
        tiny_pad(runs[algo], tmp_path / run, **({} if keep is None else {"pad_keep_fc": keep}))
        new = network(load_checkpoint(tmp_path / run, kind="procgen-agent"))
        moved = {name for name in weights if not torch.equal(old[name], new[name])}
        assert any(name.startswith("backbone.") for name in moved) and any(name.startswith(HEAD) for name in moved)
        assert all(name.startswith(("backbone.", HEAD)) for name in moved), moved
        assert (dense & moved) == (set() if keep is None else dense), moved
        assert json.loads((tmp_path / run / "config.json").read_text())["pad_keep_fc"] is (keep is None)


def test_an_encoder_without_a_dense_layer_adapts_whole_unless_keeping_one_is_asked_for():
    adapter = SimpleNamespace(model=SimpleNamespace(backbone=torch.nn.Conv2d(3, 4, 3), inverse_dynamics=object()),
                              cfg=SimpleNamespace(pad_keep_fc=None), source_path="runs/resnet-agent")
    pad.check_source(adapter)
    assert adapter.cfg.pad_keep_fc is False
    adapter.cfg.pad_keep_fc = True
    with pytest.raises(CheckpointError, match="has none: use an IMPALA agent"):
        pad.check_source(adapter)


@pytest.mark.parametrize("algo", ["ppo", "rainbow"])
def test_offline_pad_resumed_after_an_interruption_ends_where_an_uninterrupted_run_does(runs, tmp_path, algo,
                                                                                         interrupt_adaptation):
    """Crops and Rainbow's noise draw from the random generators, which travel in the train state."""
    whole = tiny_pad(runs[algo], tmp_path / "whole", epochs=3)
    with interrupt_adaptation(after=2):
        tiny_pad(runs[algo], tmp_path / "cut", epochs=3)
    assert tiny_pad(runs[algo], tmp_path / "cut", epochs=3, resume=True)["epochs"] == whole["epochs"]
    expected = network(load_checkpoint(tmp_path / "whole", kind="procgen-agent"))
    resumed = network(load_checkpoint(tmp_path / "cut", kind="procgen-agent"))
    assert all(torch.equal(weights, resumed[name]) for name, weights in expected.items())


def test_online_pad_plays_the_evaluation_episodes_adapting_during_each(runs, tmp_path):
    """With lr 0 online PAD takes its steps without moving anything, so it plays exactly the episodes the
    evaluation plays the source agent on (a policy made deterministic, so that sampling order cannot differ);
    with PAD's lr the encoder moves, and the returns of those episodes are what it reports."""
    shutil.copytree(runs["ppo"], tmp_path / "source")
    state = load_checkpoint(tmp_path / "source", kind="procgen-agent")
    state["agent_state"]["model"]["policy_head.weight"] *= 1e6
    save_checkpoint(tmp_path / "source" / "checkpoint.pt", "procgen-agent", state)
    still = tiny_pad(tmp_path / "source", tmp_path / "still", pad_online=True, eval_episodes=3, pad_batch_size=2,
                     lr=0.0)
    online = still["epochs"][0]
    assert online["episodes"] == len(online["online_returns"]) == 3
    evaluation = still["source_agent"]["target"]
    assert online["online_mean_return"] == pytest.approx(evaluation["mean_return"])
    assert online["online_stderr_return"] == pytest.approx(evaluation["stderr_return"])
    assert all(loss is not None for loss in online["episode_inverse_dynamics_loss"])   # steps were taken
    assert not (tmp_path / "still" / "frames.npz").exists()   # online PAD collects nothing beforehand

    moving = tiny_pad(tmp_path / "source", tmp_path / "moving", pad_online=True, eval_episodes=2, pad_batch_size=2)
    result = moving["epochs"][0]
    assert result["episodes"] == 2 and result["online_mean_return"] == pytest.approx(np.mean(result["online_returns"]))
    # the adapted agent's target figure is PAD's measure, the episodes it adapted in
    assert moving["adapted_agent"]["target"]["mean_return"] == result["online_mean_return"]
    assert moving["adapted_agent"]["target"]["online"] and "last_episode_network_target" in moving["adapted_agent"]
    old, new = network(state), network(load_checkpoint(tmp_path / "moving", kind="procgen-agent"))
    assert any(not torch.equal(old[k], new[k]) for k in old if k.startswith("backbone."))
    assert all(torch.equal(old[k], new[k]) for k in old if k.startswith(("policy_head.", "value_head.")))
    config = json.loads((tmp_path / "moving" / "config.json").read_text())
    assert config["pad_online"] and config["lr"] == PAD_LR


def test_online_pad_and_the_evaluations_play_the_validation_levels_when_told(runs, tmp_path, monkeypatch):
    """--eval-split val: the evaluations of the source agent and the episodes online PAD adapts in are the
    validation levels [10000, 10500) with their seed; by default the test episodes (the full distribution)."""
    import agents.adapt.pad as pad
    import agents.evaluate as evaluation

    class Played(Exception):
        pass

    evaluated, played = [], []

    def evaluate_checkpoint(path, **kwargs):
        evaluated.append({k: kwargs[k] for k in ("num_levels", "start_level", "seed")})
        return {"mean_return": 1.0, "stderr_return": 0.1, "normalized_score": 0.0, "episodes": 2,
                **evaluated[-1]}, None

    def env(*args, **kwargs):
        played.append({k: kwargs[k] for k in ("num_levels", "start_level", "seed")})
        raise Played

    monkeypatch.setattr(evaluation, "evaluate_checkpoint", evaluate_checkpoint)
    monkeypatch.setattr(pad, "ProcgenVecEnv", env)
    for split, levels in (("val", {"num_levels": 500, "start_level": 10_000, "seed": 777}),
                          ("test", {"num_levels": 0, "start_level": 0, "seed": 12345})):
        evaluated.clear(), played.clear()
        with pytest.raises(Played):
            tiny_pad(runs["ppo"], tmp_path / split, pad_online=True, eval_episodes=2, eval_split=split)
        assert evaluated == [levels, levels] and played == [levels] and split_levels(split) == levels
    with pytest.raises(ValueError, match="unknown --eval-split 'dev'"):
        ProcgenAdaptConfig(method="pad", eval_split="dev")


@pytest.mark.parametrize("aux_crop", [False, True])
def test_deployment_crops_exactly_when_the_source_head_learnt_on_crops(runs, tmp_path, monkeypatch, aux_crop):
    """Online PAD's step reads pad_batch_size crops of the transition where the source was trained with
    aux_crop, and the transition itself where it was not; offline PAD crops its minibatches likewise."""
    import agents.adapt.pad as pad

    shutil.copytree(runs["ppo"], tmp_path / "source")
    state = load_checkpoint(tmp_path / "source", kind="procgen-agent")
    state["config"]["agent"]["aux_crop"] = aux_crop
    save_checkpoint(tmp_path / "source" / "checkpoint.pt", "procgen-agent", state)
    batches, crops = [], []
    real_step, real_crop = pad.pad_step, pad.cropped_transitions

    def step(net, optimizer, frames, actions, next_frames):
        batches.append(len(frames))
        return real_step(net, optimizer, frames, actions, next_frames)

    def crop(frames, next_frames, cropper=None):
        crops.append(len(frames))
        return real_crop(frames, next_frames, cropper)

    monkeypatch.setattr(pad, "pad_step", step)
    monkeypatch.setattr(pad, "cropped_transitions", crop)
    tiny_pad(tmp_path / "source", tmp_path / "online", pad_online=True, eval_episodes=2, pad_batch_size=3)
    assert batches and set(batches) == {3 if aux_crop else 1} and len(crops) == (len(batches) if aux_crop else 0)
    batches.clear(), crops.clear()
    tiny_pad(tmp_path / "source", tmp_path / "offline", epochs=1)
    assert batches and crops == (batches if aux_crop else [])


def test_one_line_errors(runs, tmp_path, capsys):
    argv = ["--source", str(runs["plain"]), "--target", TARGET, "--method", "pad", "--eval-episodes", "0",
            "--paired-steps", "0", "--device", "cpu", "--no-progress"]
    assert adapt_main(argv + ["--out", str(tmp_path / "a")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no inverse-dynamics head" in err[0] and "--aux inverse-dynamics" in err[0]
    assert adapt_main(argv[:5] + ["shot", "--online", "--out", str(tmp_path / "b")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--online is PAD's" in err[0]
    assert train_main(["--aux-weight", "2", "--run-name", "x", "--runs-root", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--aux inverse-dynamics" in err[0] and not (tmp_path / "x").exists()
