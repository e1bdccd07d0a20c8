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


def test_precision_comparison_reads_resumed_curves_and_tests_the_difference(tmp_path, load_script):
    """A resumed run logs some steps twice: the curve keeps the later value once. Welch's t against the
    formula by hand."""
    from torch.utils.tensorboard import SummaryWriter

    compare = load_script("compare_precision")
    writer = SummaryWriter(tmp_path)
    for step, value in [(100, 1.0), (200, 2.0), (300, 3.0)]:
        writer.add_scalar("train/episode_return", value, step)
    writer.close()
    writer = SummaryWriter(tmp_path, purge_step=200)   # the resume repeats step 200 onwards
    for step, value in [(200, 5.0), (300, 6.0), (400, 7.0)]:
        writer.add_scalar("train/episode_return", value, step)
    writer.close()
    steps, values = compare.curves(tmp_path)["train"]
    assert steps.tolist() == [100, 200, 300, 400] and values.tolist() == [1.0, 5.0, 6.0, 7.0]
    assert len(compare.curves(tmp_path)["test"][0]) == 0

    a, b = [10.0, 12.0, 14.0], [7.0, 8.0, 12.0]
    ma, mb, va, vb = sum(a) / 3, sum(b) / 3, 4.0, 7.0   # sample variances
    t, p = compare.welch(a, b)
    assert abs(t - (ma - mb) / ((va / 3 + vb / 3) ** 0.5)) < 1e-9 and 0 < p < 1


def test_event_files_are_read_in_the_order_they_were_written(tmp_path, load_script):
    """By name, a writer's 10th file of one second sorts before its 9th; the reader orders by numbers."""
    compare = load_script("compare_precision")
    names = ["events.out.tfevents.1700000000.host.a.1.10", "events.out.tfevents.1700000000.host.a.1.9",
             "events.out.tfevents.1699999999.host.a.2.11"]
    for name in names:
        (tmp_path / name).write_bytes(b"")
    assert [f.name for f in compare.event_files(tmp_path)] == [names[2], names[1], names[0]]
