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


@pytest.mark.parametrize("name,widths", [("impala_1x", (16, 32, 32)), ("impala_2x", (32, 64, 64)),
                                         ("impala_4x", (64, 128, 128))])
def test_impala_shapes_and_parameter_counts(name, widths):
    net = create_backbone(name)
    assert sum(p.numel() for p in net.parameters()) == impala_param_count(widths)
    out = net(torch.rand(5, 3, 64, 64))
    assert out.shape == (5, 256) and net.out_dim == 256
    assert (out >= 0).all(), "the IMPALA feature ends with a ReLU"


def test_impala_1x_count_is_the_known_figure():
    assert sum(p.numel() for p in create_backbone("impala_1x").parameters()) == 622_144


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
