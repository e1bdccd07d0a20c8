"""The comparators inside PPO, as the mixreg paper's runner applies them: the agent acts on the
augmented frames, stores them and trains on them unchanged; mixreg mixes them; batch norm stays in
training mode for rollout, update and evaluation."""

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
    cfg = PPOConfig(num_envs=num_envs, num_steps=num_steps, num_epochs=1, num_minibatches=2, **cfg)
    return PPO(env, cfg, Runtime.create("cpu", "fp32", channels_last=False)), env


def record_network_inputs(agent):
    """Wrap the agent's network call so that every batch it sees is kept."""
    seen, forward = [], agent.forward

    def spy(obs):
        seen.append(obs.detach().clone())
        return forward(obs)
    agent.forward = spy
    return seen


def rows(batch):
    return sorted(row.numpy().tobytes() for row in batch)


@pytest.mark.parametrize("augment", ["cutout_color", "random_crop", "random_conv"])
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
