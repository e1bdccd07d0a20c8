"""Dense segmentation heads and SegmentationModel: shapes on every multi-scale backbone, the ISA
grouping and the OCR gather against brute force, the frozen classifier, backbone strides."""

import json
import math

import pytest
import torch
import torch.nn.functional as F

from adaptation.dense.model import SegmentationModel, build_dense_model, dense_model_config
from workbench.backbones import create_backbone
from workbench.heads import FeatureInput, create_head, list_heads
from workbench.layers import InterlacedSparseAttention, ObjectContextAttention, gather_object_regions

BACKBONES = ["resnet18", "hrformer_t", "mobilenetv2_ca"]   # resnet18 at output stride 8 (the model's default)
HEADS = ["fcn", "issa", "ordnet", "hrnet", "ocr"]
TINY = {"channels": 16}


def test_registry_lists_every_head_and_rejects_unknown_names_and_options():
    assert set(HEADS) == set(list_heads("segmentation"))
    info = [{"channels": 8, "reduction": 8}]
    with pytest.raises(ValueError, match="choose one of.*issa"):
        create_head("nope", info, 3)
    with pytest.raises(ValueError, match="cannot be built"):
        create_head("fcn", info, 3, no_such_option=1)


@pytest.mark.parametrize("backbone", BACKBONES)
@pytest.mark.parametrize("head", HEADS)
def test_every_head_gives_input_resolution_logits_on_every_backbone(backbone, head):
    model = SegmentationModel(backbone, head, num_classes=5, head_kwargs=TINY)
    x = torch.rand(2, 3, 64, 48)
    logits, aux = model.forward_train(x)
    assert logits.shape == (2, 5, 64, 48)
    if model.head.aux_weight > 0:
        assert aux is not None and aux.shape == (2, 5, 64, 48)
    else:
        assert aux is None
    logits.logsumexp(1).mean().backward()   # the graph reaches the backbone's first layer
    first = next(model.backbone.parameters())
    assert first.grad is not None and first.grad.abs().sum() > 0
    model.eval()
    with torch.no_grad():
        z = model.pixel_features(x)
        stride = model.head.inputs.reduction
        assert z.shape == (2, model.classifier.in_channels, math.ceil(64 / stride), math.ceil(48 / stride))
        # forward is the classifier on the pixel features, upsampled: the classifier is the last layer
        expected = F.interpolate(model.classifier(z), size=(64, 48), mode="bilinear", align_corners=False)
        torch.testing.assert_close(model(x), expected)


def test_issa_head_with_full_attention_for_the_benchmark():
    info = [{"channels": 8, "reduction": 8}, {"channels": 12, "reduction": 8}]
    feats = [torch.rand(2, 8, 9, 11), torch.rand(2, 12, 9, 11)]
    head = create_head("issa", info, 3, channels=16, attention="full")
    logits, aux = head(feats)
    assert logits.shape == aux.shape == (2, 3, 9, 11) and head.aux_weight == 0.4
    with pytest.raises(ValueError, match="attention"):
        create_head("issa", info, 3, attention="sparse")


def test_auto_inputs_read_the_stride_8_map_or_concatenate_down_to_stride_8():
    resnet = create_backbone("resnet18", output_stride=8)
    hrformer = create_backbone("hrformer_t")
    assert FeatureInput(resnet.feature_info, "auto").mode == "last"
    auto = FeatureInput(hrformer.feature_info, "auto")
    assert (auto.mode, auto.reduction, auto.channels) == ("concat", 8, 18 + 36 + 72 + 144)
    assert FeatureInput(hrformer.feature_info, "concat").reduction == 4
    assert FeatureInput(hrformer.feature_info, "last").reduction == 32


def brute_force_isa(module, x):
    """Pad symmetrically, then attend explicitly inside each gathered group: first the positions
    sharing an offset (a, b) inside their Ph x Pw block (a strided slice), then each block."""
    ph, pw = module.group_size
    n, c, h, w = x.shape
    hp, wp = math.ceil(h / ph) * ph, math.ceil(w / pw) * pw
    top, left = (hp - h) // 2, (wp - w) // 2
    padded = x.new_zeros(n, c, hp, wp)
    padded[:, :, top:top + h, left:left + w] = x
    out_c = module.short_range.out[0].out_channels
    middle = x.new_zeros(n, out_c, hp, wp)
    for a in range(ph):
        for b in range(pw):
            middle[:, :, a::ph, b::pw] = module.long_range(padded[:, :, a::ph, b::pw])
    out = torch.zeros_like(middle)
    for i in range(0, hp, ph):
        for j in range(0, wp, pw):
            out[:, :, i:i + ph, j:j + pw] = module.short_range(middle[:, :, i:i + ph, j:j + pw])
    return out[:, :, top:top + h, left:left + w]


@pytest.mark.parametrize("size", [(5, 9), (6, 8), (7, 13)])
def test_interlaced_attention_equals_explicit_groups_and_crops_symmetric_padding(size):
    isa = InterlacedSparseAttention(8, 4, 6, group_size=(3, 4), out_channels=10, qk_layers=2, out_norm=True)
    for m in isa.modules():
        # at initialisation most ReLU outputs are 0 and the attention is nearly uniform, which would
        # hide a misplaced group: positive BN shifts and gains keep the features alive and the
        # attention sharp, and a zero-padded position still gets a non-zero feature vector
        if isinstance(m, torch.nn.BatchNorm2d):
            m.weight.data.uniform_(1.0, 3.0)
            m.bias.data.uniform_(0.2, 1.0)
    isa.eval()
    x = 3 * torch.randn(2, 8, *size)
    out = isa(x)
    assert out.shape == (2, 10, *size)
    torch.testing.assert_close(out, brute_force_isa(isa, x), rtol=1e-4, atol=1e-5)
    assert isa.padding(5, 9) == (1, 2, 0, 1)   # (left, right, top, bottom): the odd pixel goes after


def test_ocr_gather_is_the_softmax_over_pixels_weighted_sum():
    feats, logits = torch.randn(2, 5, 4, 3), torch.randn(2, 3, 4, 3)
    regions = gather_object_regions(feats, logits)
    assert regions.shape == (2, 5, 3)
    for n in range(2):
        for k in range(3):
            weights = logits[n, k].exp() / logits[n, k].exp().sum()          # softmax over the 12 pixels
            expected = (feats[n] * weights).sum(dim=(1, 2))
            torch.testing.assert_close(regions[n, :, k], expected, rtol=1e-5, atol=1e-6)


def test_ocr_distribute_is_pixel_region_attention():
    block = ObjectContextAttention(6, 4, 7, dropout=0.0).eval()
    x, regions = torch.randn(2, 6, 3, 5), torch.randn(2, 6, 3)
    q = block.pixel_query(x).flatten(2).transpose(1, 2)                        # (N, HW, d)
    k = block.region_key(regions).transpose(1, 2)                              # (N, K, d)
    v = block.region_value(regions).transpose(1, 2)
    y = torch.softmax(q @ k.transpose(1, 2) / 2.0, dim=-1) @ v                 # sqrt(d) = 2
    context = block.up(y.transpose(1, 2).reshape(2, 4, 3, 5))
    torch.testing.assert_close(block(x, regions), block.fuse(torch.cat([context, x], 1)), rtol=1e-4, atol=1e-5)


def test_ocr_main_loss_trains_the_soft_region_head():
    model = SegmentationModel("resnet18", "ocr", num_classes=4, head_kwargs=TINY)
    logits, _ = model.forward_train(torch.rand(2, 3, 32, 32))
    logits.square().mean().backward()
    assert model.head.aux[0][0].weight.grad.abs().sum() > 0


def test_frozen_classifier_stays_byte_identical_while_the_feature_part_learns():
    model = SegmentationModel("resnet18", "issa", num_classes=4, head_kwargs=TINY)
    model.classifier.requires_grad_(False)
    frozen = {k: v.clone() for k, v in model.classifier.state_dict().items()}
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(trainable, lr=0.05, momentum=0.9, weight_decay=5e-4)
    x = torch.rand(2, 3, 32, 32)
    for _ in range(2):
        logits, aux = model.forward_train(x)
        probs = logits.softmax(1)
        entropy = -(probs * probs.clamp_min(1e-8).log()).sum(1).mean()   # an adaptation-style loss
        optimizer.zero_grad()
        (entropy + model.head.aux_weight * aux.logsumexp(1).mean()).backward()
        optimizer.step()
    for k, v in model.classifier.state_dict().items():
        assert v.numpy().tobytes() == frozen[k].numpy().tobytes(), k
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert not any(n.startswith("head.classifier.") for n in changed)
    for name in ("backbone.stem.0.weight", "head.reduce.0.weight", "head.fuse.0.0.weight", "head.aux.0.0.weight"):
        assert name in changed, name


@pytest.mark.parametrize("arch", ["resnet18", "resnet50"])
def test_resnet_output_stride_dilates_and_reports_the_real_strides(arch):
    expected = {32: [4, 8, 16, 32], 16: [4, 8, 16, 16], 8: [4, 8, 8, 8]}
    shapes = None
    for output_stride, strides in expected.items():
        net = create_backbone(arch, output_stride=output_stride)
        assert [f["reduction"] for f in net.feature_info] == strides
        maps = net.forward_features(torch.rand(1, 3, 50, 70))
        assert [m.shape[-2:] for m in maps] == [(math.ceil(50 / s), math.ceil(70 / s)) for s in strides]
        # the same tensors at every output stride: ImageNet weights load unchanged
        current = {k: v.shape for k, v in net.state_dict().items()}
        assert shapes is None or current == shapes
        shapes = current
    with pytest.raises(ValueError, match="output_stride"):
        create_backbone(arch, output_stride=4)


def test_segmentation_model_builds_resnets_at_output_stride_8():
    model = SegmentationModel("resnet18", "fcn", 3, head_kwargs=TINY)
    assert [f["reduction"] for f in model.backbone.feature_info] == [4, 8, 8, 8]


def test_mobilenet_forward_features_strides_match_feature_info():
    net = create_backbone("mobilenetv2_ca")
    assert [f["reduction"] for f in net.feature_info] == [4, 8, 16, 32]
    for size in [(64, 64), (50, 70)]:
        maps = net.forward_features(torch.rand(1, 3, *size))
        assert [m.shape[1] for m in maps] == [f["channels"] for f in net.feature_info]
        for m, info in zip(maps, net.feature_info):
            assert tuple(m.shape[-2:]) == tuple(math.ceil(s / info["reduction"]) for s in size)
    assert net(torch.rand(2, 3, 64, 64)).shape == (2, net.out_dim)   # the pooled feature is unchanged


def test_backbone_without_features_gives_a_one_line_error_naming_the_ones_that_work():
    with pytest.raises(ValueError) as info:
        SegmentationModel("lenet", "fcn", 3)
    message = str(info.value)
    assert "\n" not in message and "'lenet'" in message
    choices = {name.strip() for name in message.split("choose one of")[1].split(",")}
    assert {"resnet18", "hrformer_t", "mobilenetv2_ca", "dtn"} <= choices
    assert "lenet" not in choices and "impala_1x" not in choices


def test_config_round_trips_through_json_and_rebuilds_the_same_model():
    config = dense_model_config("resnet18", "issa", 3, head_kwargs={"channels": 16, "group_size": (4, 4)},
                                image_size=64)
    config = json.loads(json.dumps(config))
    assert config["backbone_kwargs"]["output_stride"] == 8 and config["task"] == "segmentation"
    model, rebuilt = build_dense_model(config).eval(), build_dense_model(config).eval()
    rebuilt.load_state_dict(model.state_dict())
    x = torch.rand(1, 3, 40, 40)
    with torch.no_grad():
        torch.testing.assert_close(rebuilt(x), model(x))
    assert rebuilt.head.context.group_size == (4, 4)


# ------------------------------------------------------------------ fcn: mmsegmentation's FCNHead

def _mmseg_fcn_parameters(cin: int, mid: int, num_classes: int, num_convs: int = 2, concat_input: bool = True,
                          k: int = 3) -> int:
    """Parameters of mmseg's FCNHead (fcn_head.py + decode_head.py), counted from its structure: every
    ConvModule is a bias-free k x k conv (a norm follows) + BN (weight, bias) + ReLU; cls_seg is a 1x1 conv
    with bias after dropout."""
    def conv_module(i, o):
        return k * k * i * o + 2 * o
    convs = conv_module(cin, mid) + (num_convs - 1) * conv_module(mid, mid) if num_convs else 0
    return convs + (conv_module(cin + mid, mid) if concat_input else 0) + mid * num_classes + num_classes


def test_fcn_head_is_mmsegs_two_convs_then_input_concat_then_dropout_and_1x1_classifier():
    info = [{"channels": 12, "reduction": 4}, {"channels": 24, "reduction": 8}]   # "auto" reads the last map
    head = create_head("fcn", info, 5, channels=16)
    assert head.num_convs == 2 and head.concat_input
    assert len(head.convs) == 2
    for block, cin in zip(head.convs, (24, 16)):
        conv, bn, relu = block
        assert isinstance(conv, torch.nn.Conv2d) and conv.kernel_size == (3, 3) and conv.padding == (1, 1)
        assert (conv.in_channels, conv.out_channels) == (cin, 16) and conv.bias is None
        assert isinstance(bn, torch.nn.BatchNorm2d) and isinstance(relu, torch.nn.ReLU)
    cat = head.conv_cat[0]
    assert (cat.in_channels, cat.out_channels, cat.kernel_size, cat.bias) == (24 + 16, 16, (3, 3), None)
    assert isinstance(head.dropout, torch.nn.Dropout2d) and head.dropout.p == 0.1
    assert head.classifier.kernel_size == (1, 1) and head.classifier.bias is not None
    assert (head.classifier.in_channels, head.classifier.out_channels) == (16, 5) and head.feature_dim == 16

    feats = [torch.rand(2, 12, 18, 14), torch.rand(2, 24, 9, 7)]
    head.eval()
    with torch.no_grad():
        logits, aux = head(feats)
        x = feats[-1]
        expected = head.classifier(head.conv_cat(torch.cat([x, head.convs(x)], dim=1)))
    assert aux is None and logits.shape == (2, 5, 9, 7)
    torch.testing.assert_close(logits, expected)


@pytest.mark.parametrize("cin, mid, k, num_convs, concat", [(24, 16, 5, 2, True), (2048, 512, 19, 2, True),
                                                            (48, 8, 3, 3, True), (48, 8, 3, 1, False),
                                                            (1024, 256, 19, 1, False), (16, 16, 4, 0, True)])
def test_fcn_head_parameter_count_is_mmsegs(cin, mid, k, num_convs, concat):
    with torch.device("meta"):
        options = {} if (num_convs, concat) == (2, True) else {"num_convs": num_convs, "concat_input": concat}
        head = create_head("fcn", [{"channels": cin, "reduction": 8}], k, channels=mid, **options)
    assert sum(p.numel() for p in head.parameters()) == _mmseg_fcn_parameters(cin, mid, k, num_convs, concat)


def test_fcn_head_defaults_are_the_fcn_r50_d8_config_and_bad_options_are_one_line_errors():
    import inspect
    from workbench.heads.fcn import FCNHead
    defaults = {n: p.default for n, p in inspect.signature(FCNHead).parameters.items()}
    assert {k: defaults[k] for k in ("channels", "num_convs", "concat_input", "dropout", "kernel_size")} == \
        {"channels": 512, "num_convs": 2, "concat_input": True, "dropout": 0.1, "kernel_size": 3}
    with pytest.raises(ValueError, match="channels must equal its 24"):
        create_head("fcn", [{"channels": 24, "reduction": 8}], 3, channels=16, num_convs=0)
    with pytest.raises(ValueError, match="num_convs"):
        create_head("fcn", [{"channels": 24, "reduction": 8}], 3, channels=16, num_convs=-1)


def test_fcn_checkpoint_with_the_old_one_conv_head_is_a_one_line_error(tmp_path, capsys):
    """Checkpoints written before issue 34 hold head.conv.* (one conv-BN-ReLU, then the classifier): loading
    them into today's fcn is a one-line error naming the cause, from the library and from the command."""
    from adaptation.cli import evaluate_main
    from adaptation.dense.model import load_dense_model
    from workbench.checkpoint import CheckpointError, save_checkpoint
    from workbench.runtime import Runtime

    config = dense_model_config("dtn", "fcn", 11, head_kwargs={"channels": 8})
    # the old head is today's num_convs=1, concat_input=False under its old name `conv`
    old = SegmentationModel("dtn", "fcn", 11, head_kwargs={"channels": 8, "num_convs": 1, "concat_input": False})
    state = {k.replace("head.convs.0.", "head.conv."): v for k, v in old.state_dict().items()}
    path = save_checkpoint(tmp_path / "old" / "source.pt", "source-model",
                           {"task": "segmentation", "model_config": config, "model": state})
    with pytest.raises(CheckpointError, match="old one-conv head") as err:
        load_dense_model(path, Runtime.create("cpu", "fp32"))
    assert "\n" not in str(err.value)
    assert evaluate_main(["--model", str(path), "--data", "builtin:scenes/textured:test", "--device", "cpu"]) == 2
    message = capsys.readouterr().err.strip()
    assert message.startswith("error: ") and "old one-conv head" in message and "\n" not in message

    # any other mismatch is a one-line error too; a checkpoint of today's head loads
    new = SegmentationModel("dtn", "fcn", 11, head_kwargs={"channels": 8})
    broken = {k: v for k, v in new.state_dict().items() if not k.startswith("head.conv_cat.")}
    path = save_checkpoint(tmp_path / "broken" / "source.pt", "source-model",
                           {"task": "segmentation", "model_config": config, "model": broken})
    with pytest.raises(CheckpointError, match="6 missing state entries") as err:
        load_dense_model(path, Runtime.create("cpu", "fp32"))
    assert "\n" not in str(err.value)
    path = save_checkpoint(tmp_path / "new" / "source.pt", "source-model",
                           {"task": "segmentation", "model_config": config, "model": new.state_dict()})
    model, _ = load_dense_model(path, Runtime.create("cpu", "fp32"))
    torch.testing.assert_close(model.state_dict()["head.conv_cat.0.weight"], new.state_dict()["head.conv_cat.0.weight"])


def test_fcn_split_adapts_both_convs_and_conv_cat_under_the_frozen_1x1_classifier():
    model = SegmentationModel("dtn", "fcn", num_classes=4, head_kwargs={"channels": 8})
    model.classifier.requires_grad_(False)
    assert [n for n, _ in model.head.named_children()][-1] == "classifier"
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    probs = model(torch.rand(2, 3, 32, 32)).softmax(1)
    (-(probs * probs.clamp_min(1e-8).log()).sum(1).mean()).backward()
    optimizer.step()
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert {"head.convs.0.0.weight", "head.convs.1.0.weight", "head.conv_cat.0.weight"} <= changed
    assert not any(n.startswith("head.classifier.") for n in changed)


def test_workbench_heads_lists_every_registered_head_with_its_task(capsys):
    from workbench.cli import main as workbench_main

    assert workbench_main(["heads"]) == 0
    rows = [line.split(None, 2) for line in capsys.readouterr().out.splitlines()]
    assert [name for name, _, _ in rows] == list_heads()
    for task in ("segmentation", "pose"):
        assert [name for name, t, _ in rows if t == task] == list_heads(task)
    assert all(len(summary) > 20 for _, _, summary in rows)  # every head says what it is
