"""The comparison regularisers of the mixreg paper, as its code runs them.

Augmentations live in the rollout, as in the paper's runner: the agent acts on
the augmented frame and PPO trains on that very frame (so old log-probs and
values come from the frames the update sees, and mixreg, when combined, mixes
frames that are already augmented). Each augmentation is an object:
`resample(num_envs, device)` draws the rollout's parameters (one set per env;
RandomConv: one kernel for all envs), kept for the whole rollout and redrawn
before the next one; `aug(obs)` augments an (N, H, W, C) batch of pixel frames,
row i with env i's parameters.

At test time (agents.evaluate) the paper's code differs by method. Its PPO runner leaves cutout-color
and random crop out on the test worker (RunnerWithAugs(is_train=mpi_rank_weight > 0), train_procgen/
ppo2.py), so those agents are evaluated on clean frames. Network randomisation (train_netrand.py) runs the
same NetRandRunner on the test worker as on the training ones, so its test returns are played through
random kernels: a new kernel at every rollout (256 steps, shared by the worker's envs, episodes carrying
over), and a clean rollout with probability 0.1 (no test-time Monte Carlo averaging over kernels, as its
README says). That is our default for random-conv agents (PPO.test_augmentation); clean frames are an
option.

- CutoutColor (Laskin et al. 2020): one box per env filled with one random colour;
  its size h, w ~ U{7..21} also fixes its position (rows 12+h..12+2h, columns 24+w..24+2w).
- RandomCrop: resize 64x64 -> 75x75 (bilinear), crop 64x64 at a per-env offset in [0, 10].
- RandomConv (Lee et al. 2020, network randomisation), as the paper's netrand code: one
  untrained 3->3 conv, 3x3, 'same' padding, Glorot-normal weights, applied to pixels / 255
  and scaled back by 255, never clamped. One kernel for all envs (the paper's code has one
  per worker process, shared by its envs), drawn at the start of every rollout and kept for
  the update on that rollout. With probability `clean_rollout_prob` = 0.1 a rollout is
  clean: the agent acts on un-randomised frames and the update's PPO loss uses clean
  frames. Both updates add fm_coef * MSE(latent(randomised), stop_gradient(latent(clean)))
  (`feature_matching_loss`, fm_coef = 0.002), latent being the trunk's final feature vector.
  The buffer keeps the clean uint8 frames and the update re-applies the rollout's kernel,
  as the paper's code does: the feature-matching target needs the clean frame, and uint8
  takes a quarter of the memory of the float32 convolved frame.

L2 is the TF `l2_loss` penalty, 0.5 * sum of squared weights, at coefficient 1e-4.
Batch norm is an IMPALA option (`batch_norm=True`); the paper's code keeps it in
training mode everywhere (rollout, update, evaluation), and `running_stats_frozen`
keeps acting from writing its statistics into the running buffers.
"""

from __future__ import annotations

import math
from contextlib import contextmanager

import torch
import torch.nn as nn
import torch.nn.functional as F

# TF's glorot_normal is a normal truncated at 2 std, widened by this factor so that its std is the Glorot one.
TRUNCATED_NORMAL_STD = 0.87962566103423978  # std of a unit normal truncated to [-2, 2]


class CutoutColor:
    """One random-colour box per env; the box's size (uniform in [box_min, box_max]) also sets its position."""

    def __init__(self, box_min: int = 7, box_max: int = 21, pivot_h: int = 12, pivot_w: int = 24,
                 max_colour: int = 254):
        self.box_min, self.box_max = box_min, box_max
        self.pivot_h, self.pivot_w = pivot_h, pivot_w
        self.max_colour = max_colour

    def resample(self, num_envs: int, device: torch.device | str = "cpu") -> None:
        size = lambda: torch.randint(self.box_min, self.box_max + 1, (num_envs,), device=device)  # noqa: E731
        self.h, self.w = size(), size()
        self.colour = torch.randint(0, self.max_colour + 1, (num_envs, 3), device=device, dtype=torch.uint8)

    def box(self, height: int, width: int) -> torch.Tensor:
        """(N, H, W) mask of each env's box: rows pivot_h + h .. pivot_h + 2h, columns pivot_w + w .. pivot_w + 2w."""
        rows = torch.arange(height, device=self.h.device).view(1, -1, 1)
        cols = torch.arange(width, device=self.h.device).view(1, 1, -1)
        top, left = (self.pivot_h + self.h).view(-1, 1, 1), (self.pivot_w + self.w).view(-1, 1, 1)
        return ((rows >= top) & (rows < top + self.h.view(-1, 1, 1)) &
                (cols >= left) & (cols < left + self.w.view(-1, 1, 1)))

    def __call__(self, obs: torch.Tensor) -> torch.Tensor:
        inside = self.box(obs.shape[1], obs.shape[2]).unsqueeze(-1)
        return torch.where(inside, self.colour.view(-1, 1, 1, 3), obs)


class RandomCrop:
    """Resize to `resized` x `resized`, then take the frame-sized window at a per-env offset."""

    def __init__(self, resized: int = 75, frame_size: int = 64):
        self.resized = resized
        # The paper's code draws offsets in [0, resized - frame_size), so the last window (offset 11) is never used.
        self.max_offset = resized - frame_size - 1

    def resample(self, num_envs: int, device: torch.device | str = "cpu") -> None:
        self.dy = torch.randint(0, self.max_offset + 1, (num_envs,), device=device)
        self.dx = torch.randint(0, self.max_offset + 1, (num_envs,), device=device)

    def __call__(self, obs: torch.Tensor) -> torch.Tensor:
        n, h, w, _ = obs.shape
        big = F.interpolate(obs.permute(0, 3, 1, 2).float(), size=(self.resized, self.resized), mode="bilinear",
                            align_corners=False).permute(0, 2, 3, 1)
        big = big.to(torch.uint8)  # truncated, as the paper's code casts the resized frame
        rows = (self.dy.view(-1, 1) + torch.arange(h, device=obs.device)).view(n, h, 1)
        cols = (self.dx.view(-1, 1) + torch.arange(w, device=obs.device)).view(n, 1, w)
        return big[torch.arange(n, device=obs.device).view(n, 1, 1), rows, cols]


def glorot_std(fan_in: int, fan_out: int) -> float:
    return math.sqrt(2.0 / (fan_in + fan_out))


# Network randomisation's settings in the paper's code (netrand_runner.py, netrand_model.py).
CLEAN_ROLLOUT_PROB = 0.1  # chance that a rollout (and its update) runs on un-randomised frames
FM_COEF = 0.002           # weight of the feature-matching loss


class RandomConv:
    """One c->c random convolution per rollout, shared by all envs, with Glorot-normal weights, on pixels / 255,
    no clamp; a rollout is clean (no convolution while acting, PPO loss on clean frames) with `clean_rollout_prob`."""

    def __init__(self, kernel_size: int = 3, channels: int = 3, clean_rollout_prob: float = CLEAN_ROLLOUT_PROB):
        self.kernel_size, self.channels = kernel_size, channels
        self.clean_rollout_prob = clean_rollout_prob

    def resample(self, num_envs: int, device: torch.device | str = "cpu",
                 generator: torch.Generator | None = None) -> None:
        """Draw this rollout's clean flag and kernel (a kernel in clean rollouts too: the feature-matching loss
        uses it). `num_envs` is unused: every env sees the same kernel, as the paper's worker. With a
        `generator` (evaluation's own, so that testing leaves training's random streams alone) both are
        drawn on its device and the kernel moved to `device`."""
        draw_on = device if generator is None else generator.device
        flag = torch.rand(()) if generator is None else torch.rand((), generator=generator, device=draw_on)
        self.clean = bool(flag < self.clean_rollout_prob)
        c, k = self.channels, self.kernel_size
        # A (c, c, k, k) layer has fan-in = fan-out = c*k*k.
        std = glorot_std(fan_in=c * k * k, fan_out=c * k * k) / TRUNCATED_NORMAL_STD
        self.weight = nn.init.trunc_normal_(torch.empty(c, c, k, k, device=draw_on), std=std, a=-2 * std, b=2 * std,
                                            generator=generator).to(device)

    def randomise(self, obs: torch.Tensor) -> torch.Tensor:
        """The convolved (N, H, W, C) frames, float32, whatever the rollout's clean flag."""
        x = obs.permute(0, 3, 1, 2).float() / 255.0
        out = F.conv2d(x, self.weight, padding=self.kernel_size // 2) * 255.0
        return out.permute(0, 2, 3, 1).contiguous()

    def __call__(self, obs: torch.Tensor) -> torch.Tensor:
        """The frame the agent acts on (and PPO trains on): clean in a clean rollout, else convolved."""
        return obs if self.clean else self.randomise(obs)


def feature_matching_loss(randomised: torch.Tensor, clean: torch.Tensor) -> torch.Tensor:
    """MSE(latent(randomised), stop_gradient(latent(clean))), averaged over samples and features as
    tf.losses.mean_squared_error: the clean features are a fixed target."""
    return F.mse_loss(randomised.float(), clean.detach().float())


AUGMENTATIONS = {"cutout_color": CutoutColor, "random_crop": RandomCrop, "random_conv": RandomConv}


def l2_penalty(module: nn.Module) -> torch.Tensor:
    """TF's l2_loss over the weights: 0.5 * sum of squared weights (biases and norm parameters excluded)."""
    return 0.5 * torch.stack([p.pow(2).sum() for p in module.parameters() if p.dim() > 1]).sum()


@contextmanager
def running_stats_frozen(*modules: nn.Module):
    """Batch norm in training mode normalises with the batch's statistics; inside this context it does so
    without also writing them into the running buffers (acting and evaluation must not leave a trace)."""
    norms = {id(m): m for module in modules for m in module.modules()
             if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats}
    for m in norms.values():
        m.track_running_stats = False
    try:
        yield
    finally:
        for m in norms.values():
            m.track_running_stats = True
