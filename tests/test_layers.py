"""Attention layers against plain global attention, shapes at awkward sizes, gradient flow."""

import pytest
import torch
import torch.nn as nn

from workbench.backbones import create_backbone
from workbench.layers import CoordAttention, HRFormerBlock, InterlacedSparseAttention, LocalWindowAttention


def global_attention_reference(module, x):
    """softmax(q k^T / sqrt(d)) v over all H*W positions, from the module's own projections."""
    n, _, h, w = x.shape
    q = module.query(x).flatten(2)       # (N, Ck, HW)
    k = module.key(x).flatten(2)
    v = module.value(x).flatten(2)       # (N, Cv, HW)
    weights = torch.softmax(torch.einsum("nci,ncj->nij", q, k) / q.shape[1] ** 0.5, dim=-1)
    context = torch.einsum("nij,ncj->nci", weights, v).reshape(n, -1, h, w)
    return module.out(context)


@pytest.mark.parametrize("size", [(8, 8), (13, 11), (5, 9)])
def test_interlaced_attention_shapes_with_padding(size):
    issa = InterlacedSparseAttention(16, 8, 16, group_size=(4, 4))
    assert issa(torch.randn(2, 16, *size)).shape == (2, 16, *size)


def test_short_range_stage_is_global_attention_when_one_group_covers_the_map():
    issa = InterlacedSparseAttention(16, 8, 12, group_size=(6, 5)).eval()
    issa.long_range = nn.Identity()
    x = torch.randn(2, 16, 6, 5)
    torch.testing.assert_close(issa(x), global_attention_reference(issa.short_range, x), rtol=1e-4, atol=1e-5)


def test_long_range_stage_is_global_attention_with_unit_groups():
    issa = InterlacedSparseAttention(16, 8, 12, group_size=(1, 1)).eval()
    issa.short_range = nn.Identity()
    x = torch.randn(2, 16, 6, 5)
    torch.testing.assert_close(issa(x), global_attention_reference(issa.long_range, x), rtol=1e-4, atol=1e-5)


def test_local_window_attention_is_global_attention_when_one_window_covers_the_map():
    dim, heads = 32, 4
    local = LocalWindowAttention(dim, heads, window_size=7)
    nn.init.zeros_(local.relative_bias)
    reference = nn.MultiheadAttention(dim, heads, batch_first=True)
    reference.in_proj_weight.data.copy_(local.qkv.weight.data)
    reference.in_proj_bias.data.copy_(local.qkv.bias.data)
    reference.out_proj.weight.data.copy_(local.proj.weight.data)
    reference.out_proj.bias.data.copy_(local.proj.bias.data)
    x = torch.randn(3, dim, 7, 7)
    tokens = x.flatten(2).transpose(1, 2)
    expected = reference(tokens, tokens, tokens, need_weights=False)[0].transpose(1, 2).reshape(3, dim, 7, 7)
    torch.testing.assert_close(local(x), expected, rtol=1e-4, atol=1e-5)


def test_relative_position_bias_depends_only_on_the_offset():
    local = LocalWindowAttention(8, 2, window_size=3)
    idx = local.bias_index
    # positions (0,0)->(1,1) and (1,1)->(2,2) have the same offset, hence the same table entry
    assert idx[0, 4] == idx[4, 8] and idx[0, 4] != idx[4, 0]
    assert idx.max() == (2 * 3 - 1) ** 2 - 1


@pytest.mark.parametrize("size", [(7, 7), (15, 9), (4, 20)])
def test_local_window_attention_and_block_shapes(size):
    x = torch.randn(2, 16, *size)
    assert LocalWindowAttention(16, 2, 7)(x).shape == x.shape
    assert HRFormerBlock(16, 2, 7)(x).shape == x.shape


def test_coordinate_attention_gates_by_row_and_column():
    ca = CoordAttention(32).eval()
    x = torch.randn(2, 32, 9, 6)
    out = ca(x)
    assert out.shape == x.shape
    ratio = out / x  # a_h[c, i] * a_w[c, j]: a rank-one map per channel
    ranks = torch.linalg.matrix_rank(ratio.double(), atol=1e-6)
    assert (ranks == 1).all()


@pytest.mark.parametrize("module", [
    CoordAttention(16), InterlacedSparseAttention(16, 8, 16, (3, 3)), LocalWindowAttention(16, 2, 4),
    HRFormerBlock(16, 2, 4)])
def test_gradients_reach_every_parameter(module):
    out = module(torch.randn(2, 16, 7, 10))
    out.square().mean().backward()
    missing = [n for n, p in module.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert not missing, missing


def test_mobilenetv2_ca_parameter_count_and_gradients():
    net = create_backbone("mobilenetv2_ca")
    with_head = sum(p.numel() for p in net.parameters()) + 1280 * 1000 + 1000  # the ImageNet-1k classifier
    assert abs(with_head - 3.95e6) / 3.95e6 < 0.02
    assert sum(isinstance(m, CoordAttention) for m in net.modules()) == 17
    net(torch.randn(2, 3, 64, 64)).sum().backward()
    assert all(p.grad is not None for p in net.parameters())


def test_impala_ca_variant():
    net = create_backbone("impala_1x_ca")
    assert sum(isinstance(m, CoordAttention) for m in net.modules()) == 6
    assert net(torch.rand(2, 3, 64, 64)).shape == (2, 256)


def test_performer_attention_equals_explicit_kernel_attention():
    from workbench.backbones.t2t_vit import PerformerTokenTransformer

    layer = PerformerTokenTransformer(dim=20, emb=16)
    x = torch.randn(2, 9, 20)
    k, q, v = layer.kqv(x).split(16, dim=-1)
    kernel = layer.random_features(q) @ layer.random_features(k).transpose(1, 2)   # (B, T, T), positive
    assert (kernel > 0).all()
    explicit = v + layer.proj((kernel / kernel.sum(-1, keepdim=True)) @ v)
    torch.testing.assert_close(layer.attention(x), explicit, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("name,published", [("t2t_vit_7", 4.3e6), ("t2t_vit_14", 21.5e6)])
def test_t2t_vit_parameter_counts_and_sizes(name, published):
    net = create_backbone(name)
    with_head = sum(p.numel() for p in net.parameters()) + net.out_dim * 1000 + 1000
    assert abs(with_head - published) / published < 0.02
    for size in [(224, 224), (32, 32), (50, 37)]:
        assert net(torch.rand(1, 3, *size)).shape == (1, net.out_dim)


def test_t2t_vit_gradients_reach_every_parameter():
    net = create_backbone("t2t_vit_7")
    # a random read-out: a plain sum of the final LayerNorm's output has zero gradient upstream
    # (the normalised features sum to zero while its scale is still 1), so it tests nothing
    readout = torch.randn(net.out_dim)
    (net(torch.rand(2, 3, 32, 32)) @ readout).sum().backward()
    missing = [n for n, p in net.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert not missing, missing


def test_train_source_with_t2t_vit(tmp_path, monkeypatch):
    from adaptation.cli import train_source_main
    from workbench.checkpoint import load_checkpoint

    monkeypatch.setenv("WORKBENCH_DATA", str(tmp_path / "data"))
    assert train_source_main(["--data", "builtin:digits/uci", "--backbone", "t2t_vit_7", "--epochs", "1",
                              "--out", str(tmp_path / "src"), "--no-progress"]) == 0
    assert load_checkpoint(tmp_path / "src")["model_config"]["backbone"] == "t2t_vit_7"


@pytest.mark.parametrize("name,published", [("hrformer_t", 8.0e6), ("hrformer_s", 13.5e6), ("hrformer_b", 50.3e6)])
def test_hrformer_parameter_counts(name, published):
    net = create_backbone(name)
    with_head = sum(p.numel() for p in net.parameters()) + 2048 * 1000 + 1000  # + the ImageNet-1k classifier
    assert abs(with_head - published) / published < 0.02


def test_hrformer_multi_resolution_features_and_gradients():
    net = create_backbone("hrformer_t")
    for size in [(64, 64), (70, 50)]:  # 70 x 50 is not a multiple of the 7x7 windows at any branch
        maps = net.forward_features(torch.rand(1, 3, *size))
        assert [m.shape[1] for m in maps] == [f["channels"] for f in net.feature_info]
        for m, info in zip(maps, net.feature_info):
            assert m.shape[2] == -(-size[0] // info["reduction"]) and m.shape[3] == -(-size[1] // info["reduction"])
    net(torch.rand(2, 3, 64, 64)).sum().backward()
    missing = [n for n, p in net.named_parameters() if p.grad is None]
    assert not missing, missing[:5]


def test_middle_range_attention_is_global_attention_inside_one_patch():
    from workbench.layers import MiddleRangeAttention

    layer = MiddleRangeAttention(16, 8, 16, patch_size=6).eval()
    x = torch.randn(2, 16, 6, 6)
    torch.testing.assert_close(layer(x), global_attention_reference(layer.attention, x), rtol=1e-4, atol=1e-5)
    assert layer(torch.randn(1, 16, 13, 7)).shape == (1, 16, 13, 7)


def test_reweighted_long_range_attention_by_hand():
    from workbench.layers import ReweightedLongRangeAttention

    layer = ReweightedLongRangeAttention(8, 4, 8).eval()
    x = torch.randn(1, 8, 3, 4)
    q = layer.query(x).flatten(2)[0].T   # (HW, Ck)
    k = layer.key(x).flatten(2)[0].T
    v = layer.value(x).flatten(2)[0].T
    a = torch.softmax(q @ k.T / 2.0, dim=-1)
    r = a.mean(0)                        # attention each position receives
    weights = torch.stack([a[i] * r / (a[i] * r).sum() for i in range(12)])
    expected = layer.out((weights @ v).T.reshape(1, 8, 3, 4))
    torch.testing.assert_close(layer(x), expected, rtol=1e-4, atol=1e-5)


def test_cifs_multipliers_follow_the_probe_gradient_are_non_negative_and_sum_to_one():
    """m = softmax(relevance), as the official code's head (no `* 2`: that was its softmax2 experiment)."""
    from workbench.layers import CIFS

    torch.manual_seed(0)
    block = CIFS(channels=6, num_classes=4, probe="linear")
    x = torch.rand(3, 6, 5, 5, requires_grad=True)
    labels = torch.tensor([2, 0, 3])
    for training in (True, False):
        block.train(training)
        out, logits = block(x, labels)
        ranked = logits.topk(2, dim=1).indices
        first = labels if training else ranked[:, 0]
        # linear probe on the pooled map: d(z_a + z_b)/d(pooled) = w_a + w_b, the positions' sum of the map gradient
        w = block.probe.weight
        expected = torch.softmax(w[first] + w[ranked[:, 1]], dim=1)
        torch.testing.assert_close(out, x * expected[:, :, None, None])
        m, _ = block.multipliers(x, labels)
        assert (m >= 0).all()
        torch.testing.assert_close(m.sum(1), torch.ones(3))
    block.train()
    out, logits = block(x, labels)
    (out.sum() + logits.sum()).backward()
    assert x.grad is not None and block.probe.weight.grad is not None
    with torch.no_grad():  # inference builds no graph
        out, _ = block(x)
    assert not out.requires_grad
    nonlinear = CIFS(channels=6, num_classes=4, probe="nonlinear")
    m, _ = nonlinear.multipliers(x)
    # brute force: the relevance is the gradient of the chosen logits w.r.t. the map, summed over positions
    fmap = x.detach().clone().requires_grad_(True)
    z = nonlinear.probe(fmap.mean(dim=(2, 3)))
    top = z.topk(2, dim=1).indices
    (z.gather(1, top).sum()).backward()
    torch.testing.assert_close(m, torch.softmax(fmap.grad.sum(dim=(2, 3)), dim=1))


@pytest.mark.parametrize("name", ["resnet18", "hrformer_t"])
def test_features_only_returns_the_multi_resolution_maps(name):
    net = create_backbone(name, features_only=True)
    maps = net(torch.rand(1, 3, 64, 48))
    assert isinstance(maps, list) and len(maps) == len(net.feature_info) == 4
    for m, info in zip(maps, net.feature_info):
        assert m.shape[1] == info["channels"] and m.shape[2] == 64 // info["reduction"]


def test_resnet_with_cifs_selects_channels_after_every_last_stage_block():
    torch.manual_seed(0)
    net = create_backbone("resnet18", cifs_classes=5)
    plain = create_backbone("resnet18")
    assert len(net.cifs) == len(net.stages[-1]) == 2
    assert isinstance(net.cifs[0].probe, torch.nn.Sequential) and isinstance(net.cifs[1].probe, torch.nn.Linear)
    x = torch.rand(2, 3, 32, 32)
    net.cifs_labels = torch.tensor([1, 4])
    features = net(x)
    assert features.shape == plain(x).shape and [z.shape for z in net.probe_logits] == [(2, 5), (2, 5)]
    # the selection is applied: the same trunk without it gives other features
    plain.load_state_dict({k: v for k, v in net.state_dict().items() if not k.startswith("cifs.")})
    assert not torch.allclose(features, plain(x))
    (features.sum() + sum(z.sum() for z in net.probe_logits)).backward()
    assert all(p.grad is not None for p in net.cifs.parameters())
