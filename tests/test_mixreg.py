import pytest
import torch

from agents.mixreg import PPO_MIXED_KEYS, draw_mix, mix_ppo_minibatch
from workbench.mixing import sample_beta


def make_batch(b=256):
    g = torch.Generator().manual_seed(1)
    return {
        "obs": torch.randint(0, 256, (b, 8, 8, 3), generator=g, dtype=torch.uint8),
        "actions": torch.randint(0, 15, (b,), generator=g),
        "returns": torch.randn(b, generator=g),
        "advantages": torch.randn(b, generator=g),
        "old_values": torch.randn(b, generator=g),
        "old_logprobs": -torch.rand(b, generator=g) * 3,
    }


def test_weights_at_least_half_and_dominant_action():
    batch = make_batch()
    mixed, idx = mix_ppo_minibatch(batch, alpha=0.2)
    assert (idx.lam >= 0.5).all() and (idx.lam <= 1.0).all()
    assert torch.equal(mixed["actions"], batch["actions"][idx.dominant])
    # each row i mixes itself with one partner: i is either the dominant or the other sample
    rows = torch.arange(256)
    assert ((idx.dominant == rows) | (idx.other == rows)).all()
    assert set(mixed) == {"obs", "actions", "returns", "advantages", "old_values", "old_logprobs"}


def test_exact_interpolation_of_every_supervised_quantity():
    batch = make_batch(64)
    mixed, idx = mix_ppo_minibatch(batch, alpha=0.2)
    for i in range(64):
        lam, d, o = idx.lam[i].item(), idx.dominant[i].item(), idx.other[i].item()
        for key in PPO_MIXED_KEYS:
            expected = lam * batch[key][d].double() + (1 - lam) * batch[key][o].double()
            torch.testing.assert_close(mixed[key][i].double(), expected, rtol=1e-5, atol=1e-4)


def test_dominant_is_the_heavier_sample():
    # swap rule: the sample with weight >= 0.5 is the dominant one, whichever position it came from
    torch.manual_seed(5)
    idx = draw_mix(4096, alpha=0.2)
    assert (idx.dominant != torch.arange(4096)).any(), "the permuted partner must dominate sometimes"
    assert (idx.dominant == torch.arange(4096)).any()


def test_tiny_alpha_gives_the_unmixed_batch():
    batch = make_batch(128)
    mixed, idx = mix_ppo_minibatch(batch, alpha=1e-4)
    assert torch.allclose(idx.lam, torch.ones_like(idx.lam), atol=1e-3)
    for key in PPO_MIXED_KEYS:
        torch.testing.assert_close(mixed[key], batch[key][idx.dominant].float(), rtol=1e-3, atol=0.5)
    torch.testing.assert_close(mixed["obs"].round().to(torch.uint8), batch["obs"][idx.dominant])


@pytest.mark.parametrize("alpha", [0.2, 1.0, 4.0])
def test_beta_sampler_moments(alpha):
    x = sample_beta(alpha, 100_000).double()
    assert abs(x.mean().item() - 0.5) < 0.01
    assert abs(x.var().item() - 1 / (4 * (2 * alpha + 1))) < 0.01


def test_non_positive_alpha_is_rejected():
    with pytest.raises(ValueError, match="alpha"):
        sample_beta(0.0, 4)
