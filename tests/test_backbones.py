import pytest
import torch

from workbench.backbones import create_backbone, list_backbones


def impala_param_count(widths, in_ch=3, image=64, out_dim=256):
    """Independent count: per stage one conv (cin->c) and four convs (c->c), all 3x3 with bias."""
    total, cin, size = 0, in_ch, image
    for c in widths:
        total += cin * c * 9 + c + 4 * (c * c * 9 + c)
        cin, size = c, (size + 1) // 2
    return total + cin * size * size * out_dim + out_dim


@pytest.mark.parametrize("name,widths", [("impala_half", (8, 16, 16)), ("impala_1x", (16, 32, 32)),
                                         ("impala_2x", (32, 64, 64)), ("impala_4x", (64, 128, 128))])
def test_impala_shapes_and_parameter_counts(name, widths):
    net = create_backbone(name)
    assert sum(p.numel() for p in net.parameters()) == impala_param_count(widths)
    out = net(torch.rand(5, 3, 64, 64))
    assert out.shape == (5, 256) and net.out_dim == 256
    assert (out >= 0).all(), "the IMPALA feature ends with a ReLU"


def test_impala_1x_count_is_the_known_figure():
    assert sum(p.numel() for p in create_backbone("impala_1x").parameters()) == 622_144


@pytest.mark.parametrize("name", ["impala_1x", "impala_4x"])
def test_impala_init_is_tf_default_glorot_uniform_with_zero_biases(name):
    """baselines' build_impala_cnn leaves tf.layers.conv2d / dense at TF's default kernel initializer,
    Glorot uniform on [-b, b], b = sqrt(6 / (fan_in + fan_out)) (a 3x3 conv's fans: 9 c_in, 9 c_out), and
    zero biases; not orthogonal."""
    import math

    torch.manual_seed(0)
    net = create_backbone(name)
    layers = [m for m in net.modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))]
    assert len(layers) == 3 * 5 + 1
    for layer in layers:
        w = layer.weight.detach().double()
        receptive = w[0, 0].numel() if w.dim() == 4 else 1
        fan_in, fan_out = w.shape[1] * receptive, w.shape[0] * receptive
        bound = math.sqrt(6 / (fan_in + fan_out))
        assert not layer.bias.any()
        assert w.abs().max() <= bound
        if w.numel() >= 4000:  # a uniform's max is near its bound and its std is bound / sqrt(3)
            assert w.abs().max() > 0.99 * bound
            assert abs(w.std().item() / (bound / math.sqrt(3)) - 1) < 0.05, (tuple(w.shape), w.std().item())
    # orthogonal with gain sqrt(2) would make the rows of a wide fc layer orthogonal, of norm sqrt(2)
    rows = net.fc.weight.detach().double()
    gram = rows @ rows.T
    assert not torch.allclose(gram, 2 * torch.eye(len(rows), dtype=torch.float64), atol=0.1)


def test_impala_batch_norm_variant_and_channels_last():
    net = create_backbone("impala_1x", batch_norm=True)
    assert sum(isinstance(m, torch.nn.BatchNorm2d) for m in net.modules()) == 15
    x = torch.rand(4, 3, 64, 64)
    ref = net.eval()(x)
    cl = net.to(memory_format=torch.channels_last)(x.to(memory_format=torch.channels_last))
    torch.testing.assert_close(cl, ref, rtol=1e-4, atol=1e-4)


def test_unknown_backbone_lists_the_valid_ones():
    with pytest.raises(ValueError, match="impala_1x"):
        create_backbone("impala_8x")
    assert {"impala_1x", "impala_2x", "impala_4x"} <= set(list_backbones())
