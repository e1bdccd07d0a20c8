"""bf16 autocast (the default where the CPU computes bf16 natively) must leave the PPO update's
direction intact: the gradient of the same minibatch loss agrees with fp32's."""

import torch

from agents.ppo import ActorCritic, PPOConfig, ppo_loss
from workbench.backbones import create_backbone
from workbench.runtime import Runtime


def test_bf16_gradient_agrees_with_fp32():
    model = ActorCritic(create_backbone("impala_1x"), 15).to(memory_format=torch.channels_last)
    g = torch.Generator().manual_seed(0)
    b = 64
    batch = {"obs": torch.randint(0, 256, (b, 64, 64, 3), generator=g, dtype=torch.uint8),
             "actions": torch.randint(0, 15, (b,), generator=g), "advantages": torch.randn(b, generator=g),
             "returns": torch.randn(b, generator=g), "old_values": torch.randn(b, generator=g) * 0.1,
             "old_logprobs": torch.full((b,), -2.708)}
    grads, losses = {}, {}
    for precision in ("fp32", "bf16"):
        rt = Runtime.create("cpu", precision)
        model.zero_grad()
        with rt.autocast():
            logits, values = model(batch["obs"])
        loss, _ = ppo_loss(logits, values, batch, PPOConfig())
        loss.backward()
        grads[precision] = torch.cat([p.grad.flatten() for p in model.parameters()])
        losses[precision] = loss.item()
    cosine = torch.nn.functional.cosine_similarity(grads["fp32"], grads["bf16"], dim=0).item()
    assert cosine > 0.99, cosine
    assert abs(losses["fp32"] - losses["bf16"]) < 0.01 * abs(losses["fp32"]) + 1e-3
