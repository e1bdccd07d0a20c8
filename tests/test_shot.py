"""SHOT pieces against independent computations, and an end-to-end source -> adapt run."""

import copy
import dataclasses
import json
import math

import numpy as np
import pytest
import torch

from adaptation.classification.mixmatch import sharpen, split_by_entropy
from workbench.adapt.cluster import faiss_available, shot_pseudo_labels
from workbench.adapt.information import information_maximization


@pytest.fixture(autouse=True)
def _data_cache(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("WORKBENCH_DATA", str(tmp_path_factory.getbasetemp() / "wbdata"))


def test_information_maximization_hand_computed():
    # two samples, two classes: p1 = (0.5, 0.5), p2 = (1, 0) up to the 1e-5 guard
    logits = torch.tensor([[0.0, 0.0], [30.0, -30.0]])
    loss, cond, marg = information_maximization(logits)
    h_half = -math.log(0.5 + 1e-5)  # entropy of (0.5, 0.5)
    expected_cond = (h_half + 0.0) / 2
    mean_p = (0.75, 0.25)
    expected_marg = -sum(p * math.log(p + 1e-5) for p in mean_p)
    assert cond.item() == pytest.approx(expected_cond, abs=1e-4)
    assert marg.item() == pytest.approx(expected_marg, abs=1e-4)
    assert loss.item() == pytest.approx(expected_cond - expected_marg, abs=1e-4)


def test_information_maximization_with_a_prior_is_kl_of_the_mean_to_it():
    # same batch; prior (0.75, 0.25) equals the mean prediction, so the diversity term vanishes
    logits = torch.tensor([[0.0, 0.0], [30.0, -30.0]])
    loss, cond, _ = information_maximization(logits, torch.tensor([0.75, 0.25]))
    assert loss.item() == pytest.approx(cond.item(), abs=1e-5)
    # prior (0.5, 0.5): KL = sum p log(p / 0.5), weighted by one half
    loss, cond, _ = information_maximization(logits, torch.tensor([0.5, 0.5]), diversity_weight=0.5)
    kl = 0.75 * math.log(0.75 / 0.5) + 0.25 * math.log(0.25 / 0.5)
    assert loss.item() == pytest.approx(cond.item() + 0.5 * kl, abs=1e-5)


def brute_force_pseudo_labels(features, probs, rounds=2):
    """Loop-by-loop restatement of SHOT's labelling with scipy-style cosine distances."""
    f = np.concatenate([features, np.ones((len(features), 1))], 1)
    f = f / np.linalg.norm(f, axis=1, keepdims=True)
    k = probs.shape[1]
    labels = probs.argmax(1)
    weights = probs.copy()
    for _ in range(rounds):
        candidates = [c for c in range(k) if (labels == c).any()]  # classes the round starts with
        centroids = np.stack([(weights[:, c:c + 1] * f).sum(0) / (weights[:, c].sum() + 1e-8) for c in range(k)])
        labels = np.empty(len(f), dtype=np.int64)
        for i in range(len(f)):
            best, best_d = None, np.inf
            for c in candidates:
                d = 1 - f[i] @ centroids[c] / (np.linalg.norm(f[i]) * np.linalg.norm(centroids[c]))
                if d < best_d:
                    best, best_d = c, d
            labels[i] = best
        weights = np.eye(k)[labels]
    return labels


def clustered_data(n=240, k=6, d=16, seed=0):
    g = np.random.default_rng(seed)
    centres = g.normal(size=(k, d)) * 3
    y = g.integers(0, k, n)
    feats = centres[y] + g.normal(size=(n, d))
    logits = g.normal(size=(n, k)) + 2.0 * np.eye(k)[y]
    logits[:, k - 1] -= 10  # the last class is never predicted: it must drop out of the candidates
    probs = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    return feats, probs


def test_pseudo_labels_equal_brute_force():
    feats, probs = clustered_data()
    expected = brute_force_pseudo_labels(feats, probs)
    got = shot_pseudo_labels(torch.tensor(feats), torch.tensor(probs), backend="torch").numpy()
    assert np.array_equal(got, expected)
    assert (got != probs.shape[1] - 1).all(), "a class the model never predicts is not a candidate"


def test_a_class_emptied_by_the_first_round_drops_out_of_the_second():
    g = np.random.default_rng(89)  # 12 points in 2-d, 3 classes: class 0 is predicted 4 times, then empties
    feats, logits = g.normal(size=(12, 2)) * 5, g.normal(size=(12, 3)) * 2
    probs = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    assert (probs.argmax(1) == 0).sum() == 4
    assert not (brute_force_pseudo_labels(feats, probs, rounds=1) == 0).any()
    expected = brute_force_pseudo_labels(feats, probs)
    got = shot_pseudo_labels(torch.tensor(feats), torch.tensor(probs), backend="torch").numpy()
    assert np.array_equal(got, expected) and not (got == 0).any()


@pytest.mark.skipif(not faiss_available(), reason="faiss not installed")
def test_faiss_and_torch_paths_agree():
    g = torch.Generator().manual_seed(1)
    feats = torch.randn(3000, 64, generator=g)
    probs = torch.softmax(torch.randn(3000, 12, generator=g) * 2, 1)
    assert torch.equal(shot_pseudo_labels(feats, probs, backend="faiss"),
                       shot_pseudo_labels(feats, probs, backend="torch"))


def test_shotpp_split_rule():
    # class 0: entropies low/high; class 1: all confident. Fraction below the mean entropy decides.
    probs = torch.tensor([[0.99, 0.01], [0.6, 0.4], [0.55, 0.45], [0.02, 0.98], [0.03, 0.97], [0.01, 0.99]])
    ent = -(probs * (probs + 1e-5).log()).sum(1)
    fraction = (ent < ent.mean()).float().mean().item()   # 4 of 6 below the mean
    labelled, unlabelled = split_by_entropy(probs)
    # every class keeps its 2/3 lowest-entropy members: class 0 (samples 0-2) keeps 0 (0.99) and 1
    # (0.6 beats 0.55); class 1 (samples 3-5) keeps 5 (0.99) and 3 (0.98)
    assert fraction == pytest.approx(4 / 6)
    assert labelled.tolist() == [0, 1, 3, 5] and unlabelled.tolist() == [2, 4]


def test_digit_bottleneck_drops_out_after_batch_norm_and_image_bottleneck_does_not():
    from adaptation.classification.model import build_model, model_config

    digits = build_model(model_config("dtn", 10, transform="digits"))
    assert isinstance(digits.bottleneck.dropout, torch.nn.Dropout) and digits.bottleneck.dropout.p == 0.5
    assert not isinstance(build_model(model_config("dtn", 10, transform="imagenet")).bottleneck.dropout,
                          torch.nn.Dropout)
    old = {k: v for k, v in model_config("dtn", 10).items() if k != "bottleneck_dropout"}
    assert not isinstance(build_model(old).bottleneck.dropout, torch.nn.Dropout), "old checkpoints had none"
    digits.train()
    feats = digits.embed(torch.randn(64, 3, 32, 32))
    assert 0.4 < (feats == 0).float().mean() < 0.6  # dropout acts after the batch norm in training mode


def test_classifier_starts_from_the_default_linear_init_as_the_official_code_does():
    """The official code's Xavier call on a weight-normed layer is undone by the next forward, so each class
    prototype keeps PyTorch's default init: uniform(+-1/sqrt(256)), squared row norm 256 * (1/256) / 3 = 1/3."""
    from adaptation.classification.model import Classifier

    torch.manual_seed(0)
    rows = torch.stack([Classifier(256, 10).fc.weight.detach().norm(dim=1) for _ in range(20)])
    assert rows.pow(2).mean().item() == pytest.approx(1 / 3, rel=0.05)  # Xavier-normal would give 512/266 = 1.92
    assert torch.equal(Classifier(256, 10).fc.bias, torch.zeros(10))


def test_sharpen():
    p = torch.tensor([[0.6, 0.4]])
    torch.testing.assert_close(sharpen(p, 0.5), torch.tensor([[0.36 / 0.52, 0.16 / 0.52]]))


# ---------------------------------------------------------------- SHOT++ settings and stages
# The official values, per benchmark, as the official code runs them:
#   tim-learn/SHOT-plus code/digit/uda_digit.py: SHOT++ adaptation epochs (args.max_epoch = 15 after source training),
#     also the rotation pre-training's (train_target_rot reads the same max_epoch); one lr for F, B and the head;
#   code/digit/run_digit.sh: --cls_par 0.1 --ssl 0.2;  code/digit/digit_mixmatch.py: --max_epoch 30, --batch_size 36,
#     --alpha 0.1, --lambda_u 100, --T 0.5, backbone optimiser at args.lr * 0.1;
#   code/uda/image_target.py: --max_epoch 15, --batch_size 64, --lr_decay1 0.1, VISDA-C args.lr = 1e-3;
#   code/uda/run_uda.sh: --ssl 0.6 --cls_par 0.3; image_mixmatch --max_epoch 100 (office), 50 (office-home),
#     10 (VISDA-C, with --net resnet101);
#   code/uda/image_mixmatch.py: --batch_size 36 (24 for resnet101), --alpha 0.75, --lambda_u 100, --T 0.5,
#     backbone at args.lr * 0.1, VISDA-C args.lr = 1e-3.
_SHOTPP_COMMON = dict(batch_size=64, transfer_batch_size=36, transfer_backbone_lr_mult=0.1, mix_temperature=0.5,
                      unlabelled_weight=100.0)
OFFICIAL_SHOTPP = {
    "digits": dict(_SHOTPP_COMMON, epochs=15, rotation_epochs=15, lr=1e-2, beta=0.1, backbone_lr_mult=1.0,
                   rotation_weight=0.2, transfer_epochs=30, mix_alpha=0.1),
    "office31": dict(_SHOTPP_COMMON, epochs=15, rotation_epochs=15, lr=1e-2, beta=0.3, backbone_lr_mult=0.1,
                     rotation_weight=0.6, transfer_epochs=100, mix_alpha=0.75),
    "office-home": dict(_SHOTPP_COMMON, epochs=15, rotation_epochs=15, lr=1e-2, beta=0.3, backbone_lr_mult=0.1,
                        rotation_weight=0.6, transfer_epochs=50, mix_alpha=0.75),
    "visda-c": dict(_SHOTPP_COMMON, epochs=15, rotation_epochs=15, lr=1e-3, beta=0.3, backbone_lr_mult=0.1,
                    rotation_weight=0.6, transfer_epochs=10, mix_alpha=0.75, transfer_batch_size=24),
}
# (data style, backbone) each benchmark runs with; VisDA-C uses ResNet-101 in run_uda.sh
BENCHMARK_DATA = {"digits": ("digits", "dtn"), "office31": ("imagenet", "resnet50"),
                  "office-home": ("imagenet", "resnet50"), "visda-c": ("imagenet", "resnet101")}


def _adapt_config(*args):
    from adaptation.cli import adapt_config

    return adapt_config(["--source", "src", "--target", "tgt", *args])


@pytest.mark.parametrize("name", sorted(OFFICIAL_SHOTPP))  # not `benchmark`: pytest-benchmark owns that name
def test_shotpp_settings_per_benchmark_are_the_official_ones(name):
    style, backbone = BENCHMARK_DATA[name]
    cfg = _adapt_config("--method", "shot++", "--benchmark", name).resolved(style, backbone)
    resolved = dataclasses.asdict(cfg)
    assert resolved["benchmark"] == name
    assert {k: resolved[k] for k in OFFICIAL_SHOTPP[name]} == OFFICIAL_SHOTPP[name]


def test_benchmark_defaults_by_data_style_and_method():
    from adaptation.classification.shot import AdaptConfig

    # without --benchmark: digits data -> digits, image data -> office-home (the official scripts' default --dset)
    assert AdaptConfig(method="shot++").resolved("digits", "lenet").benchmark == "digits"
    images = AdaptConfig(method="shot++").resolved("imagenet", "resnet50")
    assert images.benchmark == "office-home" and images.transfer_epochs == 50
    # SHOT and SHOT-IM keep the SHOT code's epochs (30 on digits); SHOT++'s own code adapts digits for 15
    assert AdaptConfig(method="shot").resolved("digits").epochs == 30
    assert AdaptConfig(method="shot-im").resolved("digits").beta == 0.0
    assert AdaptConfig(method="shot++").resolved("digits").epochs == 15
    assert AdaptConfig(method="shot++", benchmark="visda-c").resolved("imagenet", "resnet50").transfer_batch_size == 36
    with pytest.raises(ValueError, match="unknown benchmark"):
        AdaptConfig(benchmark="office")


def test_adapt_command_line_overrides_the_benchmark_settings():
    cfg = _adapt_config("--method", "shot++", "--benchmark", "visda-c", "--epochs", "3", "--lr", "0.05",
                        "--transfer-epochs", "2", "--transfer-batch-size", "8", "--mix-alpha", "0.5",
                        "--rotation-weight", "0.1", "--beta", "0.2").resolved("imagenet", "resnet101")
    assert (cfg.epochs, cfg.lr, cfg.transfer_epochs, cfg.transfer_batch_size, cfg.mix_alpha, cfg.rotation_weight,
            cfg.beta) == (3, 0.05, 2, 8, 0.5, 0.1, 0.2)
    assert cfg.rotation_epochs == 3, "rotation pre-training runs as many epochs as the adaptation"
    assert _adapt_config("--method", "shot++", "--epochs", "3", "--rotation-epochs", "1").resolved(
        "digits").rotation_epochs == 1


def test_shotpp_split_rounds_per_class_counts_down():
    # 10 samples, 8 below the mean entropy (fraction 0.8): class 0 has 2 members -> int(1.6) = 1 labelled (not 2),
    # class 1 has 8 -> int(6.4) = 6 (official: c_num_s = int(c_num * PS))
    confident, unsure = [0.999, 0.001], [0.4, 0.6]
    rows = [confident] * 2 + [confident[::-1]] * 6 + [unsure] * 2
    # nudged apart so that no entropies tie: sample 1 is a little more confident than sample 0
    probs = torch.tensor(rows) + torch.linspace(0, 1e-4, 10)[:, None] * torch.tensor([1.0, -1.0])
    labelled, unlabelled = split_by_entropy(probs)
    assert labelled.tolist() == [1, 2, 3, 4, 5, 6, 7]
    assert unlabelled.tolist() == [0, 8, 9]


class _TinyModel(torch.nn.Module):
    """embed = a linear map of the flattened image; enough to follow gradients exactly."""

    def __init__(self, size=4, dim=3):
        super().__init__()
        self.lin = torch.nn.Linear(3 * size * size, dim)

    def embed(self, x):
        return self.lin(x.flatten(1))


def test_rotation_loss_detaches_the_unrotated_features():
    from workbench.adapt.information import rotate_batch
    from adaptation.classification.rotation import RotationHead, rotation_loss

    torch.manual_seed(0)
    model, head = _TinyModel(), RotationHead(3)
    images = torch.randn(8, 3, 4, 4)

    def grad_of(loss_fn):
        model.zero_grad()
        torch.manual_seed(1)  # the same random rotations every time
        loss_fn().backward()
        return model.lin.weight.grad.clone()

    def by_hand(detach):
        rotated, turns = rotate_batch(images)
        feat = model.embed(images)
        feat = feat.detach() if detach else feat
        return torch.nn.functional.cross_entropy(head(feat, model.embed(rotated)), turns)

    got = grad_of(lambda: rotation_loss(model, head, images))
    torch.testing.assert_close(got, grad_of(lambda: by_hand(detach=True)))
    assert not torch.allclose(got, grad_of(lambda: by_hand(detach=False)))


@pytest.mark.parametrize("keep", ["best", "last"])
def test_rotation_pretraining_schedule_checks_and_kept_head(monkeypatch, keep):
    import adaptation.classification.rotation as rotation
    from adaptation.classification.model import ShotModel
    from workbench.adapt.training import set_shot_lr
    from workbench.runtime import Runtime

    torch.manual_seed(0)
    model = ShotModel("lenet", 10)
    head = rotation.RotationHead(256)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    data = torch.utils.data.TensorDataset(torch.randn(40, 3, 32, 32), torch.zeros(40, dtype=torch.long),
                                          torch.arange(40))
    loader = torch.utils.data.DataLoader(data, batch_size=8, shuffle=True)   # 5 batches, 4 epochs: 20 iterations
    scripted = iter([10.0, 20.0, 70.0, 30.0, 70.0, 40.0, 50.0, 60.0, 65.0, 20.0])
    heads, progress = [], []
    monkeypatch.setattr(rotation, "rotation_accuracy",
                        lambda *a: heads.append(copy.deepcopy(head.state_dict())) or next(scripted))
    monkeypatch.setattr(rotation, "set_shot_lr", lambda opt, lr, p: progress.append(p) or set_shot_lr(opt, lr, p))
    out = rotation.pretrain_rotation_head(model, head, loader, Runtime.create("cpu", "fp32"), epochs=4, lr=0.01,
                                          weight_decay=1e-3, keep=keep)
    assert progress == pytest.approx([k / 20 for k in range(1, 21)])   # lr0 (1 + 10 p)^-0.75 from the first step
    assert len(out["checks"]) == 10                                     # every tenth of the iterations
    kept = heads[2] if keep == "best" else heads[-1]                    # the first of the two 70% heads
    assert all(torch.equal(v, kept[k]) for k, v in head.state_dict().items())
    assert out["accuracy"] == (70.0 if keep == "best" else 20.0)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items()), "F and B stay frozen"


def test_labeling_transfer_stage_settings(monkeypatch):
    """Digits: batch 36, full batches, as many per epoch as the larger part has; F at 0.1x lr (1x in adaptation);
    B and a newly initialised C at 1x."""
    import types

    import adaptation.classification.mixmatch as mixmatch
    from adaptation.classification.model import ShotModel
    from adaptation.classification.shot import AdaptConfig
    from workbench.adapt.training import make_loader, predict
    from workbench.logging import NullLogger
    from workbench.runtime import Runtime

    torch.manual_seed(0)
    rt = Runtime.create("cpu", "fp32")
    model = rt.prepare_module(ShotModel("lenet", 10, bottleneck_dropout=0.5))
    data = torch.utils.data.TensorDataset(torch.randn(300, 3, 32, 32), torch.zeros(300, dtype=torch.long),
                                          torch.arange(300))
    cfg = dataclasses.replace(AdaptConfig(method="shot++").resolved("digits", "lenet"), transfer_epochs=1)
    assert cfg.backbone_lr_mult == 1.0 and cfg.transfer_batch_size == 36

    def evaluate():
        out = predict(model, make_loader(data, 100, train=False), rt)
        return {"probs": out["probs"], "pred": out["probs"].argmax(1)}

    adapter = types.SimpleNamespace(cfg=cfg, model=model, rt=rt, evaluate=evaluate, labels_known=False,
                                    train_set=data, eval_set=data)
    adapted_classifier = copy.deepcopy(model.classifier.state_dict())
    optimizers, batches, classifiers = [], [], []
    real_optimizer, real_loss = mixmatch.shot_optimizer, mixmatch.mixmatch_loss
    monkeypatch.setattr(mixmatch, "shot_optimizer", lambda *a, **k: optimizers.append(real_optimizer(*a, **k))
                        or optimizers[-1])

    def spy_loss(model, *args, **kwargs):
        batches.append([len(a) for a in args if torch.is_tensor(a) and a.dim() == 4])
        classifiers.append(copy.deepcopy(model.classifier.state_dict()))
        return real_loss(model, *args, **kwargs)

    monkeypatch.setattr(mixmatch, "mixmatch_loss", spy_loss)
    logger = NullLogger()
    stats = mixmatch.labeling_transfer(adapter, logger)
    n_l, n_u = stats["labelled"], stats["unlabelled"]
    assert n_l >= 36 and n_u >= 36
    assert len(batches) == max(n_l // 36, n_u // 36)
    assert all(all(size == 36 for size in sizes) for sizes in batches)
    mult = {id(p): g["lr_mult"] for g in optimizers[0].param_groups for p in g["params"]}
    assert {mult[id(p)] for p in model.backbone.parameters()} == {0.1}
    assert {mult[id(p)] for p in [*model.bottleneck.parameters(), *model.classifier.parameters()]} == {1.0}
    assert any(not torch.equal(v, adapted_classifier[k]) for k, v in classifiers[0].items()), "C starts anew"


@pytest.fixture(scope="module")
def source_run(tmp_path_factory):
    from adaptation.classification.source import SourceConfig, train_source

    import os
    os.environ["WORKBENCH_DATA"] = str(tmp_path_factory.getbasetemp() / "wbdata")
    out = tmp_path_factory.mktemp("source")
    metrics = train_source(SourceConfig(data="builtin:digits/uci", backbone="lenet", epochs=4, run_dir=str(out),
                                        progress=False))
    return out, metrics


def test_end_to_end_shot_improves_target_accuracy_and_keeps_classifier(source_run, tmp_path):
    from adaptation.cli import adapt_main
    from workbench.checkpoint import load_checkpoint

    src_dir, src_metrics = source_run
    assert src_metrics["selection_accuracy"] > 90
    assert src_metrics["selection_data"] == "builtin:digits/uci:val"
    out = tmp_path / "adapt"
    assert adapt_main(["--method", "shot", "--source", str(src_dir), "--target", "builtin:digits/photo",
                       "--epochs", "4", "--out", str(out), "--no-progress"]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["accuracy"] > metrics["source_only_accuracy"] + 3, metrics
    # adapted on photo's train split, also scored on its test split (the official digits protocol)
    assert metrics["test_data"] == "builtin:digits/photo:test"
    assert json.loads((out / "config.json").read_text())["test_on"] == "builtin:digits/photo:test"
    assert metrics["test_accuracy"] > metrics["source_only_test_accuracy"], metrics
    source = load_checkpoint(src_dir / "source.pt")["model"]
    adapted = load_checkpoint(out / "adapted.pt", kind="adapted-model")["model"]
    classifier_keys = [k for k in source if k.startswith("classifier.")]
    assert classifier_keys and all(torch.equal(source[k], adapted[k]) for k in classifier_keys)
    assert any(not torch.equal(source[k], adapted[k]) for k in source if k.startswith("backbone."))
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    events = EventAccumulator(str(out))
    events.Reload()
    assert {"loss/im", "loss/pseudo_ce", "loss/conditional_entropy", "loss/marginal_entropy",
            "pseudo_labels/accuracy", "target/accuracy", "target/predicted_classes"} <= set(events.Tags()["scalars"])
    assert "target/confusion_matrix" in events.Tags()["images"]
    rows = (out / "predictions.csv").read_text().splitlines()
    assert rows[0] == "path,label,prediction,confidence" and len(rows) == metrics["samples"] + 1


def test_class_count_mismatch_is_a_clear_error(source_run, tmp_path, capsys):
    from PIL import Image

    from adaptation.cli import adapt_main, evaluate_main

    lines = []
    for i in range(12):
        path = tmp_path / f"{i}.png"
        Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(path)
        lines.append(f"{path} {i}")
    (tmp_path / "list.txt").write_text("\n".join(lines))
    src_dir, _ = source_run
    assert adapt_main(["--source", str(src_dir), "--target", str(tmp_path / "list.txt"), "--out",
                       str(tmp_path / "x"), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "line 11: label 10 is outside 0..9 for a 10-class model" in err and len(err.strip().splitlines()) == 1
    assert evaluate_main(["--model", str(tmp_path / "nothing"), "--data", "builtin:digits/uci"]) == 2


def test_shot_im_and_shotpp_run(source_run, tmp_path, monkeypatch, capsys):
    import workbench.adapt.loop as loop
    from adaptation.classification.shot import AdaptConfig, ShotAdapter
    from workbench.adapt.training import set_shot_lr

    src_dir, _ = source_run
    im = ShotAdapter(AdaptConfig(source=str(src_dir), target="builtin:digits/photo", method="shot-im", epochs=1,
                                 run_dir=str(tmp_path / "im"), progress=False))
    assert im.cfg.beta == 0.0 and im.rotation_head is None
    progress = []
    monkeypatch.setattr(loop, "set_shot_lr", lambda opt, lr, p: progress.append(p) or set_shot_lr(opt, lr, p))
    im.run()
    # the official loop counts the step before scheduling it: lr0 (1 + 10 p)^-0.75 at p = 1/T, ..., 1
    assert progress == pytest.approx([k / len(im.loader) for k in range(1, len(im.loader) + 1)])
    pp = ShotAdapter(AdaptConfig(source=str(src_dir), target="builtin:digits/photo", method="shot++", epochs=1,
                                 rotation_epochs=1, transfer_epochs=1, run_dir=str(tmp_path / "pp"), progress=False))
    assert pp.cfg.rotation_weight == 0.2 and pp.cfg.mix_alpha == 0.1  # the digits defaults
    capsys.readouterr()
    metrics = pp.run()
    # each of SHOT++'s three stages shows its own progress to its end (without a bar: status lines)
    shown = capsys.readouterr().out
    iterations = len(pp.loader)
    for stage, steps in (("rotation head", iterations), (pp.description(), iterations),
                         ("labeling transfer", None)):
        ends = [line for line in shown.splitlines() if line.startswith(f"{stage}: step ")]
        assert ends, f"no progress shown for {stage!r}"
        done, total = ends[-1].split("step ")[1].split()[0].split("/")
        assert done == total and (steps is None or int(total) == steps)
    transfer = metrics["transfer"]
    assert transfer["labelled"] + transfer["unlabelled"] == metrics["samples"]
    assert 0 < transfer["labelled"] < metrics["samples"]
    assert len(metrics["rotation_pretrain"]["checks"]) == 12  # 23 iterations: at 2, 4, ..., 22 and at the end
    assert metrics["rotation_pretrain"]["accuracy"] == max(metrics["rotation_pretrain"]["checks"])
    # the resolved settings are recorded with the run: the digits benchmark's, with the overrides given
    config = json.loads((tmp_path / "pp" / "config.json").read_text())
    assert config == metrics["config"]
    expected = dict(OFFICIAL_SHOTPP["digits"], epochs=1, rotation_epochs=1, transfer_epochs=1)
    assert config["benchmark"] == "digits" and {k: config[k] for k in expected} == expected


def test_train_source_with_pretrained_resnet_on_a_class_folder(tmp_path):
    """ImageNet-style path: class folders, a torchvision weights file, 224 crops."""
    import torchvision
    from PIL import Image

    from adaptation.cli import train_source_main
    from workbench.checkpoint import load_checkpoint

    g = np.random.default_rng(0)
    for label, colour in enumerate([(200, 30, 30), (30, 30, 200)]):
        folder = tmp_path / "data" / f"class{label}"
        folder.mkdir(parents=True)
        for i in range(6):
            img = np.clip(np.array(colour) + g.normal(0, 20, (40, 48, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(img).save(folder / f"{i}.jpg")
    weights = tmp_path / "resnet18.pth"
    torch.save(torchvision.models.resnet18().state_dict(), weights)
    out = tmp_path / "src"
    assert train_source_main(["--data", str(tmp_path / "data"), "--backbone", "resnet18", "--pretrained",
                              str(weights), "--epochs", "1", "--batch-size", "4", "--out", str(out),
                              "--no-progress"]) == 0
    state = load_checkpoint(out, kind="source-model")
    assert state["model_config"]["transform"] == "imagenet" and state["model_config"]["num_classes"] == 2
    config = json.loads((out / "config.json").read_text())
    assert config["pretrained"] == str(weights)


def test_auto_cluster_backend_keeps_gpu_features_on_the_gpu(monkeypatch):
    """auto: faiss's CPU index for CPU features; on a GPU, faiss only with its GPU build, else torch there."""
    import workbench.adapt.cluster as cluster

    gpu = torch.device("cuda", 0)
    monkeypatch.setattr(cluster, "faiss_available", lambda: True)
    monkeypatch.setattr(cluster, "faiss_gpu_available", lambda: False)
    assert cluster.check_backend("auto", gpu) == "torch"
    assert cluster.check_backend("auto", torch.device("cpu")) == "faiss"
    monkeypatch.setattr(cluster, "faiss_gpu_available", lambda: True)
    assert cluster.check_backend("auto", gpu) == "faiss"
    monkeypatch.setattr(cluster, "faiss_available", lambda: False)
    assert cluster.check_backend("auto", torch.device("cpu")) == "torch"
    with pytest.raises(ValueError, match="unknown clustering backend"):
        cluster.check_backend("gpu", gpu)
