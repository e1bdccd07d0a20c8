"""The mixreg paper's comparators against independent computations (numpy loops, hand values)."""

import math

import numpy as np
import torch

from agents.regularizers import (CutoutColor, RandomConv, RandomCrop, feature_matching_loss, l2_penalty,
                                 running_stats_frozen)


def frames(n, h=64, w=64, seed=0):
    return torch.randint(0, 256, (n, h, w, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))


def test_cutout_color_box_follows_its_size_and_stays_fixed_until_resampled():
    aug = CutoutColor()
    aug.resample(6)
    for x in (frames(6, seed=1), frames(6, seed=2)):  # two steps of one rollout: same boxes, same colours
        out = aug(x)
        assert out.dtype == torch.uint8
        for i in range(6):
            h, w = int(aug.h[i]), int(aug.w[i])
            expected = x[i].numpy().copy()
            expected[12 + h:12 + 2 * h, 24 + w:24 + 2 * w] = aug.colour[i].numpy()  # numpy clips at the border
            np.testing.assert_array_equal(out[i].numpy(), expected)

    aug.resample(5000)
    for size in (aug.h, aug.w):
        assert int(size.min()) == 7 and int(size.max()) == 21
    assert int(aug.colour.min()) == 0 and int(aug.colour.max()) == 254


def bilinear_resize(image: np.ndarray, size: int) -> np.ndarray:
    """Half-pixel-centre bilinear resize of an (H, W, C) image, one axis at a time, in float64."""
    def along(axis_len):
        src = np.maximum((np.arange(size) + 0.5) * axis_len / size - 0.5, 0.0)
        lo = np.floor(src).astype(int)
        hi = np.minimum(lo + 1, axis_len - 1)
        return lo, hi, src - lo

    out = image.astype(np.float64)
    lo, hi, f = along(out.shape[0])
    out = out[lo] * (1 - f)[:, None, None] + out[hi] * f[:, None, None]
    lo, hi, f = along(out.shape[1])
    return out[:, lo] * (1 - f)[None, :, None] + out[:, hi] * f[None, :, None]


def test_random_crop_resizes_to_75_and_takes_a_window_at_the_envs_offset():
    aug = RandomCrop()
    aug.resample(4)
    x = frames(4)
    out = aug(x)
    assert out.shape == x.shape and out.dtype == torch.uint8
    for i in range(4):
        dy, dx = int(aug.dy[i]), int(aug.dx[i])
        big = bilinear_resize(x[i].numpy(), 75).astype(np.uint8)  # truncated, as the paper's code
        diff = np.abs(out[i].numpy().astype(int) - big[dy:dy + 64, dx:dx + 64].astype(int))
        assert diff.max() <= 1 and (diff > 0).mean() < 0.01  # float32 vs float64 at integer boundaries

    aug.resample(5000)
    for offset in (aug.dy, aug.dx):
        assert int(offset.min()) == 0 and int(offset.max()) == 10


def test_random_conv_kernel_has_the_glorot_std_of_one_c_to_c_layer():
    # A 3->3 3x3 layer has fan-in = fan-out = 3 * 3 * 3 = 27. The old (batch*3, 3, 3, 3) draw had
    # fan-out 27 * batch, about 30x too small a std for a 2048-frame minibatch.
    torch.manual_seed(0)
    for channels in (3, 4):
        fan = channels * 9
        glorot = math.sqrt(2 / (fan + fan))
        aug = RandomConv(channels=channels)
        draws = []
        for _ in range(3000):  # one kernel per rollout: many rollouts for the statistics
            aug.resample(num_envs=8)
            assert aug.weight.shape == (channels, channels, 3, 3), "one kernel for all envs"
            draws.append(aug.weight)
        w = torch.stack(draws)
        assert abs(float(w.std()) / glorot - 1) < 0.02 and abs(float(w.mean())) < 0.01 * glorot
        assert float(w.abs().max()) <= 2 * glorot / 0.87962566103423978 + 1e-6  # TF's truncation at 2 std


def test_random_conv_is_one_kernel_for_every_env_on_pixels_over_255_without_clamp():
    aug = RandomConv(clean_rollout_prob=0.0)
    aug.resample(3)
    x = frames(3, h=6, w=7)
    out = aug(x)
    torch.testing.assert_close(aug.randomise(x), out, rtol=0, atol=0)
    w = aug.weight.double().numpy()
    padded = np.pad(x.double().numpy() / 255.0, ((0, 0), (1, 1), (1, 1), (0, 0)))
    expected = np.zeros((3, 6, 7, 3))
    for n in range(3):
        for y in range(6):
            for xx in range(7):
                for o in range(3):
                    patch = padded[n, y:y + 3, xx:xx + 3, :]  # (ky, kx, c_in)
                    expected[n, y, xx, o] = 255 * np.sum(w[o].transpose(1, 2, 0) * patch)  # the same w for every n
    np.testing.assert_allclose(out.numpy(), expected, rtol=1e-4, atol=1e-3)
    assert out.min() < 0 or out.max() > 255, "no clamp to [0, 255]"


def test_random_conv_rollouts_are_clean_with_probability_one_tenth():
    assert RandomConv().clean_rollout_prob == 0.1
    torch.manual_seed(0)
    aug, draws = RandomConv(), 4000
    clean = 0
    for _ in range(draws):
        aug.resample(2)
        clean += aug.clean
    sigma = math.sqrt(0.1 * 0.9 / draws)  # 0.0047
    assert abs(clean / draws - 0.1) < 4 * sigma, clean / draws

    x = frames(2, h=5, w=5)
    for prob, is_clean in ((1.0, True), (0.0, False)):
        aug = RandomConv(clean_rollout_prob=prob)
        aug.resample(2)
        assert aug.clean is is_clean
        # a clean rollout acts on the frames as they are; its kernel still exists for the feature-matching term
        torch.testing.assert_close(aug(x).float(), x.float() if is_clean else aug.randomise(x), rtol=0, atol=0)


def test_feature_matching_loss_is_the_mean_square_with_a_fixed_clean_target():
    g = torch.Generator().manual_seed(0)
    prediction = torch.randn(5, 4, generator=g, requires_grad=True)
    target = torch.randn(5, 4, generator=g, requires_grad=True)
    p, t = prediction.detach().numpy().astype(np.float64), target.detach().numpy().astype(np.float64)
    loss = feature_matching_loss(prediction, target)
    np.testing.assert_allclose(loss.item(), ((p - t) ** 2).sum() / 20, rtol=1e-6)  # over samples and features
    loss.backward()
    np.testing.assert_allclose(prediction.grad.numpy(), 2 * (p - t) / 20, rtol=1e-5)
    assert target.grad is None, "stop-gradient on the clean features"


def test_l2_penalty_is_half_the_sum_of_squared_weights():
    net = torch.nn.Sequential(torch.nn.Conv2d(1, 1, 2), torch.nn.Flatten(), torch.nn.Linear(2, 2))
    with torch.no_grad():
        net[0].weight.copy_(torch.tensor([[[[1.0, -1.0], [2.0, 0.0]]]]))
        net[2].weight.copy_(torch.tensor([[1.0, 2.0], [3.0, 4.0]]))
        net[0].bias.fill_(5.0)
        net[2].bias.fill_(6.0)
    # 0.5 * ((1 + 1 + 4 + 0) + (1 + 4 + 9 + 16)) = 18; biases are not penalised
    torch.testing.assert_close(l2_penalty(net).detach(), torch.tensor(18.0))


def test_running_stats_frozen_normalises_with_batch_statistics_and_writes_nothing():
    bn = torch.nn.BatchNorm2d(3).train()
    x = torch.randn(5, 3, 4, 4) * 3 + 2
    with running_stats_frozen(bn):
        y = bn(x)
    mean, var = x.mean((0, 2, 3), keepdim=True), x.var((0, 2, 3), unbiased=False, keepdim=True)
    torch.testing.assert_close(y, (x - mean) / torch.sqrt(var + bn.eps))
    assert torch.equal(bn.running_mean, torch.zeros(3)) and torch.equal(bn.running_var, torch.ones(3))
    assert int(bn.num_batches_tracked) == 0 and bn.track_running_stats
    bn(x)  # outside the context, training writes the buffers again
    assert int(bn.num_batches_tracked) == 1 and not torch.equal(bn.running_mean, torch.zeros(3))


class FrameStub:
    """A vector env whose frames are step-numbered noise; every env's episode ends each 4th step with return 1."""

    env_name, distribution_mode, num_levels, start_level, num_actions = "stub", "easy", 0, 0, 3

    def __init__(self, num_envs=2):
        self.num_envs, self.t = num_envs, 0

    def _frames(self):
        self.last_frames = frames(self.num_envs, 16, 16, seed=self.t).numpy()
        return self.last_frames

    def reset(self):
        self.t = 0
        return torch.from_numpy(self._frames())

    def as_tensor(self, array):
        return torch.from_numpy(array)

    def step_numpy(self, actions):
        self.t += 1
        done = np.full(self.num_envs, self.t % 4 == 0)
        return self._frames(), done.astype(np.float32), done

    def normalized_score(self, mean):
        return mean


class RecordingAgent:
    def __init__(self, clean_rollout_prob=0.0, period=3):
        self.seen, self.view = [], (RandomConv(clean_rollout_prob=clean_rollout_prob), period)

    def test_augmentation(self):
        return self.view

    def act(self, obs, deterministic=False):
        self.seen.append(obs.clone())
        return torch.zeros(len(obs), dtype=torch.long)


def test_evaluation_plays_random_conv_agents_through_a_new_kernel_every_rollout_length():
    """The paper's test worker runs the training runner (NetRandRunner): one kernel for all envs, redrawn
    every rollout; clean frames only as an option."""
    from agents.evaluate import evaluate

    agent = RecordingAgent(period=3)
    result = evaluate(agent, FrameStub(), num_episodes=4, seed=7)
    assert result["clean_frames"] is False and len(agent.seen) == 8
    kernels = []
    for t, seen in enumerate(agent.seen):
        raw = frames(2, 16, 16, seed=t)
        x = raw.permute(0, 3, 1, 2).float() / 255
        # the kernel that maps this step's frames to what the agent saw, found by solving on one env's pixels
        patches = torch.nn.functional.unfold(x[:1], 3, padding=1)[0].T.double()  # (H*W, 27)
        target = seen[:1].permute(0, 3, 1, 2).reshape(3, -1).T.double() / 255  # (H*W, 3)
        kernel = torch.linalg.lstsq(patches, target).solution.T.reshape(3, 3, 3, 3).float()
        expected = torch.nn.functional.conv2d(x, kernel, padding=1).permute(0, 2, 3, 1) * 255
        torch.testing.assert_close(seen, expected, rtol=1e-4, atol=1e-2)  # both envs, one kernel
        kernels.append(kernel)
    same = [torch.allclose(kernels[t], kernels[t - 1], atol=1e-4) for t in range(1, 8)]
    assert same == [t % 3 != 0 for t in range(1, 8)], "a new kernel at steps 3 and 6"

    again = RecordingAgent(period=3)
    evaluate(again, FrameStub(), num_episodes=4, seed=7)
    assert all(torch.equal(a, b) for a, b in zip(agent.seen, again.seen)), "kernels drawn from the seed alone"

    clean = RecordingAgent(period=3)
    assert evaluate(clean, FrameStub(), num_episodes=4, clean_frames=True)["clean_frames"] is True
    for t, seen in enumerate(clean.seen):
        assert torch.equal(seen, frames(2, 16, 16, seed=t))


def test_evaluation_keeps_the_training_share_of_clean_stretches():
    from agents.evaluate import evaluate

    agent = RecordingAgent(clean_rollout_prob=0.3, period=1)
    evaluate(agent, FrameStub(1), num_episodes=500, seed=0)  # 2000 steps, one draw each
    clean = sum(torch.equal(seen, frames(1, 16, 16, seed=t)) for t, seen in enumerate(agent.seen))
    assert abs(clean / len(agent.seen) - 0.3) < 4 * math.sqrt(0.3 * 0.7 / len(agent.seen))


class SamplingAgent:
    """Samples its actions from torch's global generator, as PPO's categorical policy does."""

    def __init__(self):
        self.actions = []

    def act(self, obs, deterministic=False):
        actions = torch.randint(3, (len(obs),))
        self.actions.append(actions)
        return actions


def test_evaluation_seeds_the_policys_sampling_and_leaves_the_callers_random_stream_alone():
    from agents.evaluate import evaluate

    torch.manual_seed(123)
    caller_state = torch.get_rng_state()
    first, second, other = SamplingAgent(), SamplingAgent(), SamplingAgent()
    evaluate(first, FrameStub(), num_episodes=4, seed=5)
    assert torch.equal(torch.get_rng_state(), caller_state), "training's stream goes on as if nothing had run"
    torch.rand(10)  # the caller's stream moves between the two evaluations
    evaluate(second, FrameStub(), num_episodes=4, seed=5)
    evaluate(other, FrameStub(), num_episodes=4, seed=6)
    assert len(first.actions) == 8 and all(torch.equal(a, b) for a, b in zip(first.actions, second.actions))
    expected = torch.Generator().manual_seed(5)
    assert all(torch.equal(a, torch.randint(3, (2,), generator=expected)) for a in first.actions)
    assert not all(torch.equal(a, b) for a, b in zip(first.actions, other.actions))


def test_ppo_tests_random_conv_agents_through_kernels_of_their_own():
    from types import SimpleNamespace

    from agents.ppo import PPO, PPOConfig
    from workbench.runtime import Runtime

    env = SimpleNamespace(num_envs=2, num_actions=3, observation_shape=(64, 64, 3))
    runtime = Runtime.create("cpu", "fp32")
    for augment in (None, "cutout_color", "random_crop"):
        agent = PPO(env, PPOConfig(num_envs=2, num_steps=8, num_minibatches=1, augment=augment), runtime)
        assert agent.test_augmentation() is None
    agent = PPO(env, PPOConfig(num_envs=2, num_steps=8, num_minibatches=1, augment="random_conv",
                               clean_rollout_prob=0.25), runtime)
    view, period = agent.test_augmentation()
    assert isinstance(view, RandomConv) and view is not agent.augmentation
    assert period == 8 and view.clean_rollout_prob == 0.25
