"""The comparators inside PPO, as the mixreg paper's runner applies them: the agent acts on the
augmented frames, stores them and trains on them unchanged; mixreg mixes them; random conv (network
randomisation) shares one kernel per rollout, has clean rollouts and a feature-matching loss; batch
norm stays in training mode for rollout, update and evaluation."""

import numpy as np
import pytest
import torch

import agents.ppo as ppo_module
from agents.evaluate import evaluate
from agents.ppo import PPO, PPOConfig
from workbench.runtime import Runtime


class FakeEnv:
    """Random 64x64 frames, a reward of 1 per step, episodes of 3 steps; records every frame it shows."""

    num_actions, observation_shape = 15, (64, 64, 3)
    env_name, distribution_mode, num_levels, start_level = "fake", "easy", 0, 0

    def __init__(self, num_envs, seed=0):
        self.num_envs, self.rng, self.t = num_envs, np.random.default_rng(seed), 0
        self.shown: list[np.ndarray] = []

    def _frames(self):
        self.shown.append(self.rng.integers(0, 256, (self.num_envs, 64, 64, 3), dtype=np.uint8))
        return self.shown[-1]

    def as_tensor(self, array):
        return torch.from_numpy(array)

    def reset(self):
        return self.as_tensor(self._frames())

    def step_numpy(self, actions):
        self.t += 1
        dones = np.full(self.num_envs, self.t % 3 == 0)
        return self._frames(), np.ones(self.num_envs, np.float32), dones

    @property
    def last_frames(self):
        return self.shown[-1]

    def normalized_score(self, mean):
        return mean


def make_agent(num_envs=2, num_steps=4, **cfg):
    env = FakeEnv(num_envs)
    cfg = PPOConfig(num_envs=num_envs, num_steps=num_steps, **{"num_epochs": 1, "num_minibatches": 2, **cfg})
    return PPO(env, cfg, Runtime.create("cpu", "fp32", channels_last=False)), env


def record_network_inputs(agent):
    """Wrap the agent's network call so that every batch it sees is kept."""
    seen, forward = [], agent.forward

    def spy(obs, **kwargs):
        seen.append(obs.detach().clone())
        return forward(obs, **kwargs)
    agent.forward = spy
    return seen


def rows(batch):
    return sorted(row.numpy().tobytes() for row in batch)


@pytest.mark.parametrize("augment", ["cutout_color", "random_crop"])
def test_the_agent_acts_on_stores_and_trains_on_the_same_augmented_frames(augment):
    agent, env = make_agent(augment=augment)
    seen = record_network_inputs(agent)
    agent.collect_rollout()
    buf = agent.buffer
    for t in range(4):
        raw = torch.from_numpy(env.shown[t])
        assert not torch.equal(seen[t].float(), raw.float()), "the agent acts on augmented frames"
        torch.testing.assert_close(seen[t], buf["obs"][t], rtol=0, atol=0)  # stored = acted on
        # one set of parameters per env for the whole rollout
        torch.testing.assert_close(seen[t], agent.augmentation(raw), rtol=0, atol=0)
    # GAE's bootstrap value comes from the next frame under the same parameters
    torch.testing.assert_close(seen[4], agent.augmentation(torch.from_numpy(env.shown[4])), rtol=0, atol=0)

    seen.clear()
    agent.update()
    assert rows(torch.cat(seen)) == rows(buf["obs"].flatten(0, 1)), "the update trains on the stored frames as they are"

    before = agent.augmentation(torch.from_numpy(env.shown[4]))
    agent.collect_rollout()
    assert not torch.equal(agent.augmentation(torch.from_numpy(env.shown[4])), before), "redrawn every rollout"


def test_mixreg_mixes_the_augmented_frames_and_nothing_augments_after_it(monkeypatch):
    agent, _ = make_agent(augment="cutout_color", mixreg=True)
    mixed_in, mixed_out, mix = [], [], ppo_module.mix_ppo_minibatch

    def spy(mb, alpha):
        mixed, idx = mix(mb, alpha)
        mixed_in.append(mb["obs"].clone())
        mixed_out.append(mixed["obs"].clone())
        return mixed, idx
    monkeypatch.setattr(ppo_module, "mix_ppo_minibatch", spy)
    agent.collect_rollout()
    seen = record_network_inputs(agent)
    agent.update()
    assert rows(torch.cat(mixed_in)) == rows(agent.buffer["obs"].flatten(0, 1))
    assert len(seen) == len(mixed_out) == 2
    for network_input, mixed in zip(seen, mixed_out):
        torch.testing.assert_close(network_input, mixed, rtol=0, atol=0)


def numpy_random_conv(frames: torch.Tensor, weight: torch.Tensor) -> np.ndarray:
    """255 * ('same' zero-padded 3x3 cross-correlation of frames / 255 with one (out, in, 3, 3) kernel), float64."""
    x = np.pad(frames.double().numpy() / 255.0, ((0, 0), (1, 1), (1, 1), (0, 0)))
    w = weight.double().numpy()
    h, wd = frames.shape[1:3]
    return 255.0 * sum(x[:, ky:ky + h, kx:kx + wd, :] @ w[:, :, ky, kx].T for ky in range(3) for kx in range(3))


def nearest_rows(batch, candidates) -> list[int]:
    """For each frame of `batch`, the index of the closest frame in `candidates`, checked to be a match."""
    batch, candidates = np.asarray(batch, np.float64), np.asarray(candidates, np.float64)
    out = []
    for row in batch:
        gaps = np.abs(candidates - row).max((1, 2, 3))
        assert gaps.min() < 1e-3, gaps.min()
        out.append(int(gaps.argmin()))
    return out


def first_minibatch_log_ratio(monkeypatch):
    """log pi_new(a|s) - log pi_old(a|s) per minibatch, taken inside the PPO loss. Before the first optimiser step
    the weights are those that acted, so on the first minibatch it is 0 exactly when the loss sees the frames
    acted on."""
    ratios, loss = [], ppo_module.ppo_loss

    def spy(logits, values, batch, cfg, *rest):
        new = torch.log_softmax(logits.detach(), -1).gather(1, batch["actions"].unsqueeze(1)).squeeze(1)
        ratios.append(new - batch["old_logprobs"])
        return loss(logits, values, batch, cfg, *rest)
    monkeypatch.setattr(ppo_module, "ppo_loss", spy)
    return ratios


def test_random_conv_defaults_are_the_papers():
    cfg = PPOConfig(augment="random_conv")
    assert (cfg.clean_rollout_prob, cfg.fm_coef) == (0.1, 0.002)


def test_random_conv_shares_one_kernel_per_rollout_stores_clean_frames_and_trains_on_what_it_acted_on(monkeypatch):
    agent, env = make_agent(augment="random_conv", clean_rollout_prob=0.0)
    seen = record_network_inputs(agent)
    agent.collect_rollout()
    kernel = agent.augmentation.weight.clone()
    for t in range(5):  # t = 4: GAE's bootstrap value
        raw = torch.from_numpy(env.shown[t])
        # every env's frame, at every step, convolved with the one kernel of this rollout
        np.testing.assert_allclose(seen[t].numpy(), numpy_random_conv(raw, kernel), rtol=1e-5, atol=1e-3)
        if t < 4:
            torch.testing.assert_close(agent.buffer["obs"][t], raw, rtol=0, atol=0)  # the clean uint8 frame is kept
    acted_on = torch.cat(seen[:4])

    ratios = first_minibatch_log_ratio(monkeypatch)
    seen.clear()
    metrics = agent.update()
    assert torch.equal(agent.augmentation.weight, kernel), "the update uses the rollout's kernel"
    torch.testing.assert_close(ratios[0], torch.zeros_like(ratios[0]), rtol=0, atol=1e-5)
    # per minibatch: the PPO forward on the convolved frames, then the clean target's forward
    ppo_inputs, targets = torch.cat(seen[0::2]), torch.cat(seen[1::2])
    assert sorted(nearest_rows(ppo_inputs, acted_on)) == list(range(8)), "PPO trains on the frames acted on"
    assert rows(targets) == rows(agent.buffer["obs"].flatten(0, 1))
    assert metrics["feature_matching"] > 0

    agent.collect_rollout()
    assert not torch.equal(agent.augmentation.weight, kernel), "redrawn for the next rollout"


def test_a_clean_rollout_acts_on_and_computes_the_policy_loss_on_clean_frames(monkeypatch):
    agent, env = make_agent(augment="random_conv", clean_rollout_prob=1.0)
    seen = record_network_inputs(agent)
    agent.collect_rollout()
    for t in range(5):
        torch.testing.assert_close(seen[t], torch.from_numpy(env.shown[t]), rtol=0, atol=0)

    ratios = first_minibatch_log_ratio(monkeypatch)
    seen.clear()
    metrics = agent.update()
    torch.testing.assert_close(ratios[0], torch.zeros_like(ratios[0]), rtol=0, atol=1e-5)  # the clean frames
    # per minibatch: the PPO forward on the clean frames, then the convolved frames for feature matching
    stored = agent.buffer["obs"].flatten(0, 1)
    ppo_inputs, randomised = torch.cat(seen[0::2]), torch.cat(seen[1::2])
    assert rows(ppo_inputs) == rows(stored)
    assert sorted(nearest_rows(randomised, numpy_random_conv(stored, agent.augmentation.weight))) == list(range(8))
    assert metrics["feature_matching"] > 0


class TinyTrunk(torch.nn.Module):
    """phi(x) = relu(W mean_hw(x) + b): small enough to compute by hand."""

    out_dim = 4

    def __init__(self):
        super().__init__()
        self.fc = torch.nn.Linear(3, 4)
        with torch.no_grad():
            self.fc.weight.copy_(torch.tensor([[1.0, -2.0, 0.5], [0.3, 0.7, -1.1], [-0.4, 0.2, 0.9], [2.0, 1.0, 1.0]]))
            self.fc.bias.fill_(0.5)

    def forward(self, x):
        return torch.relu(self.fc(x.mean((2, 3))))


@pytest.mark.parametrize("clean", [False, True])
def test_feature_matching_loss_and_its_gradient_by_hand_on_a_tiny_trunk(monkeypatch, clean):
    monkeypatch.setattr(ppo_module, "create_backbone", lambda name, **kwargs: TinyTrunk())
    # Only the feature-matching term has a gradient: zero advantages (so zero normalised advantages), no value
    # or entropy term, no clipping of the gradient.
    monkeypatch.setattr(ppo_module, "compute_gae", lambda rewards, values, *args: (torch.zeros_like(values), values))
    agent, _ = make_agent(augment="random_conv", clean_rollout_prob=float(clean), num_minibatches=1,
                          vf_coef=0.0, ent_coef=0.0, max_grad_norm=1e9)
    agent.collect_rollout()
    w = agent.model.backbone.fc.weight.detach().double().numpy().copy()
    b = agent.model.backbone.fc.bias.detach().double().numpy().copy()
    frames = agent.buffer["obs"].flatten(0, 1)

    def trunk(pixels):  # the network's input is pixels / 255; returns the spatial means and the pre-activations
        m = (pixels / 255.0).mean((1, 2))
        return m, m @ w.T + b
    m_rand, pre_rand = trunk(numpy_random_conv(frames, agent.augmentation.weight))
    _, pre_clean = trunk(frames.double().numpy())
    diff = np.maximum(pre_rand, 0) - np.maximum(pre_clean, 0)
    expected = (diff ** 2).mean()  # over 8 samples x 4 features
    assert expected > 1e-4
    # d/dW of mean((phi(conv s) - stop_gradient(phi(s)))^2): only the randomised side carries gradient
    upstream = 2 * diff * (pre_rand > 0) / diff.size
    grads, step = [], agent.optimizer.step

    def spy():
        grads.append({k: p.grad.detach().clone() for k, p in agent.model.named_parameters()})
        step()
    monkeypatch.setattr(agent.optimizer, "step", spy)
    metrics = agent.update()  # one minibatch, one epoch: the loss at the weights above
    assert metrics["feature_matching"] == pytest.approx(expected, rel=1e-4)
    fm_coef = agent.cfg.fm_coef
    np.testing.assert_allclose(grads[0]["backbone.fc.weight"].numpy(), fm_coef * upstream.T @ m_rand,
                               rtol=1e-3, atol=1e-9)
    np.testing.assert_allclose(grads[0]["backbone.fc.bias"].numpy(), fm_coef * upstream.sum(0), rtol=1e-3, atol=1e-9)


def test_with_mixreg_both_random_conv_views_are_mixed_after_the_convolution_with_the_same_weights(monkeypatch):
    agent, _ = make_agent(augment="random_conv", clean_rollout_prob=0.0, mixreg=True)
    draws, mix = [], ppo_module.mix_ppo_minibatch

    def spy(mb, alpha):
        mixed, idx = mix(mb, alpha)
        draws.append((mb["obs"].clone(), idx))
        return mixed, idx
    monkeypatch.setattr(ppo_module, "mix_ppo_minibatch", spy)
    agent.collect_rollout()
    seen = record_network_inputs(agent)
    agent.update()
    stored = agent.buffer["obs"].flatten(0, 1)
    clean, convolved = stored.double().numpy(), numpy_random_conv(stored, agent.augmentation.weight)
    assert len(draws) == 2 and len(seen) == 4
    for k, (mixreg_input, idx) in enumerate(draws):
        which = np.array(nearest_rows(mixreg_input, convolved))  # mixreg receives convolved frames
        lam = idx.lam.double().numpy().reshape(-1, 1, 1, 1)
        dom, other = which[idx.dominant.numpy()], which[idx.other.numpy()]
        for view, network_input in ((convolved, seen[2 * k]), (clean, seen[2 * k + 1])):  # PPO, then FM target
            expected = lam * view[dom] + (1 - lam) * view[other]
            np.testing.assert_allclose(network_input.double().numpy(), expected, rtol=1e-5, atol=1e-3)


def batch_norm_modes(agent):
    modes = []
    for m in agent.model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.register_forward_pre_hook(lambda module, args: modes.append(module.training))
    return modes


def running_buffers(agent):
    return {k: v.clone() for k, v in agent.model.state_dict().items() if "running" in k or "num_batches" in k}


def test_batch_norm_stays_in_training_mode_for_rollout_update_and_evaluation():
    agent, _ = make_agent(backbone_kwargs={"batch_norm": True})
    modes = batch_norm_modes(agent)
    start = running_buffers(agent)

    agent.collect_rollout()
    assert modes and all(modes), "rollout: training mode, as in the update"
    for k, v in running_buffers(agent).items():
        assert torch.equal(v, start[k]), f"acting wrote {k}"

    modes.clear()
    agent.update()
    assert modes and all(modes), "update: training mode"
    trained = running_buffers(agent)
    assert all(not torch.equal(v, start[k]) for k, v in trained.items()), "training writes the running statistics"

    modes.clear()
    evaluate(agent, FakeEnv(3, seed=1), num_episodes=3)
    assert modes and all(modes), "evaluation: training mode"
    for k, v in running_buffers(agent).items():
        assert torch.equal(v, trained[k]), f"evaluation wrote test statistics into {k}"


def test_without_batch_norm_the_agent_acts_in_eval_mode_and_updates_in_train_mode():
    agent, _ = make_agent()
    agent.collect_rollout()
    assert not agent.model.training
    agent.update()
    assert agent.model.training
    agent.act(torch.zeros(2, 64, 64, 3, dtype=torch.uint8))
    assert not agent.model.training
