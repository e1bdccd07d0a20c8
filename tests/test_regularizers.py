import torch

from agents.regularizers import cutout_color, l2_penalty, random_conv, random_crop
from workbench.backbones import create_backbone


def images(b=6):
    return torch.randint(0, 256, (b, 64, 64, 3), dtype=torch.uint8)


def test_cutout_changes_one_rectangle_to_one_colour():
    x = images()
    out = cutout_color(x, min_size=8, max_size=24)
    for i in range(x.shape[0]):
        changed = (out[i] != x[i].float()).any(-1)
        rows, cols = changed.any(1).nonzero().squeeze(1), changed.any(0).nonzero().squeeze(1)
        top, bottom, left, right = rows.min(), rows.max() + 1, cols.min(), cols.max() + 1
        assert 1 <= bottom - top <= 24 and 1 <= right - left <= 24
        box = out[i, top:bottom, left:right].reshape(-1, 3)
        assert (box == box[0]).all(), "the box is filled with one colour"


def test_random_crop_is_a_window_of_the_replicate_padded_image():
    x = images(4)
    torch.manual_seed(7)
    out = random_crop(x, pad=12)
    padded = torch.nn.functional.pad(x.float().permute(0, 3, 1, 2), (12,) * 4, mode="replicate").permute(0, 2, 3, 1)
    for i in range(4):
        matches = [(dy, dx) for dy in range(25) for dx in range(25)
                   if torch.equal(padded[i, dy:dy + 64, dx:dx + 64], out[i])]
        assert matches, "each crop is some 64x64 window of the padded frame"


def test_random_conv_differs_per_image_and_keeps_shape():
    x = torch.full((2, 64, 64, 3), 128, dtype=torch.uint8)
    out = random_conv(x)
    assert out.shape == (2, 64, 64, 3) and out.min() >= 0 and out.max() <= 255
    assert not torch.allclose(out[0], out[1]), "each image gets its own random kernel"


def test_l2_penalty_counts_weights_not_biases():
    net = create_backbone("impala_1x")
    manual = sum((m.weight.detach() ** 2).sum() for m in net.modules() if isinstance(m, (torch.nn.Conv2d,
                                                                                         torch.nn.Linear)))
    torch.testing.assert_close(l2_penalty(net).detach(), manual)
