"""Pixel-level SHOT: pseudo-labels against a brute-force reference, IM over pixels by hand, the frozen
classifier, the segmentation commands (task read from the checkpoint, one-line errors), outputs."""

from __future__ import annotations

import json
import math
import os

import numpy as np
import pytest
import torch

from adaptation.segmentation.shot import (IGNORE_INDEX, balanced_fraction, balanced_labels, class_thresholds, label_pixels,
                                   pixel_information_maximization, pseudo_label_loss, sample_pixels, upsample_labels)
from workbench.adapt.cluster import faiss_available, shot_centroids

TINY = "24,8"   # scenes per split for the fast command-line tests


# ------------------------------------------------------------------ pure functions
def _brute_force_pixel_labels(z: np.ndarray, probs: np.ndarray) -> np.ndarray:
    """SHOT's two rounds written out pixel by pixel: [f, 1]/||[f, 1]||, soft centroids, cosine nearest
    centroid among the classes the argmax uses, hard centroids, nearest centroid among the classes used."""
    n, d, h, w = z.shape
    pixels = [(a, i, j) for a in range(n) for i in range(h) for j in range(w)]
    feats = []
    for a, i, j in pixels:
        f = np.append(z[a, :, i, j], 1.0)
        feats.append(f / math.sqrt(sum(v * v for v in f)))
    p = [probs[a, :, i, j] for a, i, j in pixels]

    def nearest(f, centroids):
        best, best_sim = None, -np.inf
        for c, vec in centroids.items():
            sim = float(np.dot(f, vec) / np.sqrt(np.dot(vec, vec)))
            if sim > best_sim:
                best, best_sim = c, sim
        return best

    used = sorted({int(np.argmax(q)) for q in p})
    soft = {c: sum(q[c] * f for q, f in zip(p, feats)) / (sum(q[c] for q in p) + 1e-8) for c in used}
    labels = [nearest(f, soft) for f in feats]
    hard = {c: sum(f for f, lab in zip(feats, labels) if lab == c) / (labels.count(c) + 1e-8)
            for c in sorted(set(labels))}
    out = np.zeros((n, h, w), np.int64)
    for (a, i, j), f in zip(pixels, feats):
        out[a, i, j] = nearest(f, hard)
    return out


@pytest.mark.parametrize("backend", ["torch", "faiss"])
def test_pixel_pseudo_labels_match_brute_force(backend):
    if backend == "faiss" and not faiss_available():
        pytest.skip("faiss not importable")
    gen = torch.Generator().manual_seed(3)
    z = torch.randn(3, 6, 4, 5, generator=gen)
    logits = torch.randn(3, 4, 4, 5, generator=gen) * 2
    probs = logits.softmax(1)
    # a sample of every pixel (more than h * w asked): the fit sees all pixels, in a random order
    feats, p = sample_pixels(z, probs, 1000, torch.Generator().manual_seed(0))
    assert feats.shape == (3 * 20, 6) and p.shape == (3 * 20, 4)
    centroids, classes = shot_centroids(feats, p, backend=backend)
    labels = label_pixels(z, centroids, classes, backend)
    assert labels.shape == (3, 4, 5)
    np.testing.assert_array_equal(labels.numpy(), _brute_force_pixel_labels(z.numpy(), probs.numpy()))


def test_class_balanced_pseudo_labels_against_brute_force():
    """URMA's rule written out: per class, sort the confidences of the rows predicted as that class, the
    threshold is the one at position floor(n f); a pixel takes the class of its largest p_k / t_k, or no
    label when that ratio is below 1. Fractions grow 0.2, 0.25, ... up to 0.5."""
    assert [balanced_fraction(r) for r in (0, 1, 2, 6, 7, 20)] == pytest.approx([0.2, 0.25, 0.3, 0.5, 0.5, 0.5])
    gen = torch.Generator().manual_seed(5)
    sample = (torch.randn(200, 4, generator=gen) * torch.tensor([3.0, 1.0, 1.0, 0.5])).softmax(1)
    sample[:, 3] *= 0.01  # class 3 is never the argmax: its threshold is 1
    sample = sample / sample.sum(1, keepdim=True)
    for fraction in (0.2, 0.5):
        thresholds = class_thresholds(sample, fraction)
        for k in range(4):
            conf = sorted((float(q.max()) for q in sample if int(q.argmax()) == k), reverse=True)
            expected = conf[min(int(len(conf) * fraction), len(conf) - 1)] if conf else 1.0
            assert thresholds[k].item() == pytest.approx(expected), (fraction, k)
        probs = (torch.randn(2, 4, 3, 5, generator=gen) * 2).softmax(1)
        labels = balanced_labels(probs, thresholds)
        for n in range(2):
            for i in range(3):
                for j in range(5):
                    ratios = [probs[n, k, i, j].item() / thresholds[k].item() for k in range(4)]
                    best = max(range(4), key=lambda k: ratios[k])
                    assert labels[n, i, j].item() == (best if ratios[best] >= 1 else IGNORE_INDEX)
    # about the top fraction of each predicted class's own rows is labelled with that class
    kept = balanced_labels(sample.T[None, :, :, None], class_thresholds(sample, 0.2))[0, :, 0]
    for k in range(3):
        own = sample.argmax(1) == k
        assert 0.2 * own.sum() <= (kept[own] == k).sum() <= 0.2 * own.sum() + 2
    # the CE ignores unlabelled pixels, and a batch without labels adds nothing
    logits = torch.randn(1, 4, 2, 2, requires_grad=True)
    target = torch.tensor([[[1, IGNORE_INDEX], [IGNORE_INDEX, 2]]])
    expected = (torch.nn.functional.cross_entropy(logits[0, :, 0, 0][None], torch.tensor([1]))
                + torch.nn.functional.cross_entropy(logits[0, :, 1, 1][None], torch.tensor([2]))) / 2
    assert pseudo_label_loss(logits, target).item() == pytest.approx(expected.item(), rel=1e-5)
    none = pseudo_label_loss(logits, torch.full((1, 2, 2), IGNORE_INDEX))
    assert none.item() == 0 and none.requires_grad


def test_pixel_sample_is_bounded_and_consistent():
    z = torch.randn(2, 3, 5, 5)
    probs = torch.randn(2, 4, 5, 5).softmax(1)
    feats, p = sample_pixels(z, probs, 7, torch.Generator().manual_seed(1))
    assert feats.shape == (14, 3) and p.shape == (14, 4)
    flat_z, flat_p = z.permute(0, 2, 3, 1).reshape(-1, 3), probs.permute(0, 2, 3, 1).reshape(-1, 4)
    for f, q in zip(feats, p):  # each sampled row is one pixel's feature with that same pixel's softmax
        hit = (flat_z == f).all(1).nonzero().squeeze(1)
        assert len(hit) == 1 and torch.equal(flat_p[hit[0]], q)
    # nearest-neighbour upsampling keeps the labels, 2x2 blocks per feature pixel
    up = upsample_labels(torch.tensor([[[1, 2], [3, 4]]], dtype=torch.uint8), (4, 4))
    assert up.tolist() == [[[1, 1, 2, 2], [1, 1, 2, 2], [3, 3, 4, 4], [3, 3, 4, 4]]]


def test_pixel_im_loss_against_hand_computation():
    logits = torch.randn(2, 3, 2, 3)
    loss, cond, marg = pixel_information_maximization(logits)
    eps = 1e-5
    pix = [torch.softmax(logits[n, :, i, j], 0).tolist() for n in range(2) for i in range(2) for j in range(3)]
    ent = [-sum(q * math.log(q + eps) for q in p) for p in pix]
    mean_p = [sum(p[k] for p in pix) / len(pix) for k in range(3)]
    hand_cond = sum(ent) / len(ent)
    hand_marg = -sum(q * math.log(q + eps) for q in mean_p)
    assert cond.item() == pytest.approx(hand_cond, rel=1e-5)
    assert marg.item() == pytest.approx(hand_marg, rel=1e-5)
    assert loss.item() == pytest.approx(hand_cond - hand_marg, rel=1e-4, abs=1e-6)


def test_pixel_im_with_a_class_prior_is_kl_to_that_prior():
    """With a prior pi the diversity term is KL(p_bar || pi): hand-computed, zero when p_bar = pi, and
    with the uniform prior the same gradients as SHOT's -H(p_bar) (the losses differ by log K)."""
    logits = torch.randn(2, 4, 3, 3, requires_grad=True)
    prior = torch.tensor([0.7, 0.1, 0.1, 0.1])
    loss, cond, _ = pixel_information_maximization(logits, prior, diversity_weight=0.5)
    p_bar = [sum(torch.softmax(logits[n, :, i, j], 0)[k].item() for n in range(2) for i in range(3) for j in range(3))
             / 18 for k in range(4)]
    kl = sum(p * math.log(p / q) for p, q in zip(p_bar, prior.tolist()))
    assert loss.item() == pytest.approx(cond.item() + 0.5 * kl, rel=1e-5)

    at_prior, cond_at, _ = pixel_information_maximization(torch.zeros(1, 4, 2, 2), torch.full((4,), 0.25))
    assert at_prior.item() == pytest.approx(cond_at.item(), abs=1e-6)

    shot, _, _ = pixel_information_maximization(logits)
    uniform, _, _ = pixel_information_maximization(logits, torch.full((4,), 0.25))
    assert (uniform - shot).item() == pytest.approx(math.log(4), rel=1e-4)
    g_shot, = torch.autograd.grad(shot, logits)
    g_uniform, = torch.autograd.grad(uniform, logits)
    assert torch.allclose(g_shot, g_uniform, atol=1e-6)


# ------------------------------------------------------------------ commands on a tiny scene set
@pytest.fixture(scope="module")
def tiny_scenes(tmp_path_factory):
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("WORKBENCH_DATA", str(tmp_path_factory.getbasetemp() / "wbdata-dense-adapt"))
        mp.setenv("WORKBENCH_SCENES_N", TINY)
        yield


@pytest.fixture(scope="module")
def tiny_source(tiny_scenes, tmp_path_factory):
    from adaptation.cli import train_source_main

    out = tmp_path_factory.mktemp("dense-src")
    assert train_source_main(["--task", "segmentation", "--data", "builtin:scenes/printed", "--backbone", "resnet18",
                              "--head", "fcn", "--head-channels", "16", "--epochs", "1", "--batch-size", "8",
                              "--device", "cpu", "--out", str(out), "--no-progress"]) == 0
    return out


def _tags(run_dir) -> set[str]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run_dir))
    acc.Reload()
    return set(acc.Tags()["scalars"]) | set(acc.Tags()["images"])


def test_source_outputs(tiny_source):
    from workbench.checkpoint import load_checkpoint

    metrics = json.loads((tiny_source / "metrics.json").read_text())
    assert {"miou", "per_class_iou", "pixel_accuracy", "selection_data"} <= set(metrics)
    # the checkpoint is chosen on the val split; the test split is only scored, once, at the end
    assert metrics["selection_data"] == "builtin:scenes/printed:val" and len(metrics["per_class_iou"]) == 11
    from adaptation.segmentation.evaluate import evaluate_dense_model

    assert metrics["test"]["data"] == "builtin:scenes/printed:test"
    assert metrics["test"]["miou"] == pytest.approx(evaluate_dense_model(tiny_source / "source.pt",
                                                                         "builtin:scenes/printed:test", device="cpu")["miou"])
    assert metrics["miou"] == pytest.approx(evaluate_dense_model(tiny_source / "source.pt",
                                                                 "builtin:scenes/printed:val", device="cpu")["miou"])
    state = load_checkpoint(tiny_source / "source.pt", kind="source-model")
    assert state["task"] == "segmentation" and state["model_config"]["head"] == "fcn"
    assert {"source/loss", "source/ce", "source/lr", "selection/miou"} <= _tags(tiny_source)


def test_adapt_reads_task_from_checkpoint_freezes_classifier_and_writes_outputs(tiny_source, tmp_path):
    from adaptation.cli import adapt_config, adapt_main
    from adaptation.segmentation.shot import DenseAdaptConfig
    from workbench.checkpoint import load_checkpoint

    argv = ["--source", str(tiny_source), "--target", "builtin:scenes/textured", "--epochs", "1", "--batch-size", "8",
            "--device", "cpu", "--out", str(tmp_path), "--no-progress"]
    cfg = adapt_config(argv)
    assert isinstance(cfg, DenseAdaptConfig) and cfg.method == "shot" and cfg.beta == 0.3
    assert adapt_main(argv) == 0
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    for key in ("source_only_miou", "miou", "per_class_iou", "pixel_accuracy", "test_miou", "source_only_test_miou",
                "test_per_class_iou", "test_pixel_accuracy", "pseudo_label_miou_per_epoch", "miou_per_epoch",
                "val_miou", "source_only_val_miou"):
        assert key in metrics, key
    assert metrics["test_data"] == "builtin:scenes/textured:test" and metrics["val_data"] == "builtin:scenes/textured:val"
    # --method shot with the default source prior is not SHOT: the run says what ran
    assert (metrics["method"], metrics["method_name"]) == ("shot", "im (source prior) + centroid labels")
    pngs = sorted((tmp_path / "predictions").glob("*.png"))
    assert len(pngs) == int(TINY.split(",")[0])
    from PIL import Image

    with Image.open(pngs[0]) as img:
        assert img.mode == "P" and img.size == (64, 64) and np.asarray(img).max() < 11
    assert {"loss/im", "loss/pseudo_ce", "loss/conditional_entropy", "loss/marginal_entropy", "pseudo_labels/miou",
            "target/miou", "target/input_truth_prediction", "test/miou"} <= _tags(tmp_path)

    src = load_checkpoint(tiny_source / "source.pt")["model"]
    ada = load_checkpoint(tmp_path / "adapted.pt", kind="adapted-model")
    assert ada["task"] == "segmentation"
    classifier = [k for k in src if k.startswith("head.classifier.")]
    assert classifier
    for k in classifier:  # byte-identical
        assert src[k].numpy().tobytes() == ada["model"][k].numpy().tobytes(), k
    def changed(prefix):
        return any(not torch.equal(src[k], ada["model"][k]) for k in src
                   if k.startswith(prefix) and not k.startswith("head.classifier.") and src[k].is_floating_point())

    assert changed("backbone.") and changed("head.")

    # evaluate reads the task too, and saves label maps
    from adaptation.cli import evaluate_main

    out = tmp_path / "eval.json"
    assert evaluate_main(["--model", str(tmp_path), "--data", "builtin:scenes/textured:test", "--device", "cpu",
                          "--out", str(out), "--save-predictions", str(tmp_path / "eval_png")]) == 0
    result = json.loads(out.read_text())
    assert result["task"] == "segmentation" and 0 <= result["miou"] <= 100
    assert result["miou"] == pytest.approx(metrics["test_miou"])
    assert len(list((tmp_path / "eval_png").glob("*.png"))) == int(TINY.split(",")[1])
    assert evaluate_main(["--model", str(tmp_path), "--data", "builtin:scenes/textured:val", "--device", "cpu",
                          "--out", str(tmp_path / "val.json")]) == 0
    assert json.loads((tmp_path / "val.json").read_text())["miou"] == pytest.approx(metrics["val_miou"])


def test_initial_prior_is_the_source_models_mean_pixel_prediction(tiny_source, tmp_path):
    """The prior of diversity_prior="initial" (the default) is the mean softmax of the unadapted model over
    every pixel of every target image (brute force here); the options reach the adapter from the command line."""
    from adaptation.cli import adapt_config
    from adaptation.segmentation.shot import DenseShotAdapter

    cfg = adapt_config(["--source", str(tiny_source), "--target", "builtin:scenes/textured", "--diversity-prior",
                        "uniform", "--diversity-weight", "0.5", "--device", "cpu", "--out", str(tmp_path)])
    assert (cfg.diversity_prior, cfg.diversity_weight) == ("uniform", 0.5)
    adapter = DenseShotAdapter(cfg)
    prior = adapter.evaluate()["mean_prediction"]
    adapter.model.eval()
    with torch.no_grad():
        probs = torch.cat([adapter.model(adapter.target[i][0][None]).softmax(1) for i in range(len(adapter.target))])
    assert torch.allclose(prior, probs.mean((0, 2, 3)), atol=1e-5)
    assert prior.sum().item() == pytest.approx(1.0, abs=1e-5)


def test_method_names_say_what_runs():
    """SHOT-IM and SHOT only with SHOT's uniform diversity prior (and, for SHOT, its centroid labels); IM with the
    source model's prior is named as such, whatever --method selected it."""
    from adaptation.segmentation.shot import DenseAdaptConfig, config_method_name, method_name

    assert method_name("shot-im", "uniform", "centroid") == "shot-im"
    assert method_name("shot", "uniform", "centroid") == "shot"
    assert method_name("shot-im", "initial", "centroid") == "im (source prior)"
    assert method_name("shot-im", "initial", "balanced") == "im (source prior)"   # no pseudo-labels without beta
    assert method_name("shot", "initial", "centroid") == "im (source prior) + centroid labels"
    assert method_name("shot", "initial", "balanced") == "im (source prior) + balanced labels"
    assert method_name("shot", "uniform", "balanced") == "shot-im + balanced labels"
    assert method_name("shot-im", "uniform", "centroid", diversity_weight=0) == "entropy"
    assert config_method_name(DenseAdaptConfig(method="shot-im")) == (
        "shot-im" if DenseAdaptConfig.diversity_prior == "uniform" else "im (source prior)")


def test_source_selection_set_may_not_be_the_training_data(tiny_scenes, tmp_path, capsys):
    from adaptation.cli import train_source_main

    for data, select_on in (("builtin:scenes/printed", "builtin:scenes/printed:train"),
                            ("builtin:scenes/printed:all", "builtin:scenes/printed:val")):
        assert train_source_main(["--task", "segmentation", "--data", data, "--select-on", select_on, "--backbone",
                                  "dtn", "--epochs", "1", "--device", "cpu", "--out", str(tmp_path / "s"),
                                  "--no-progress"]) == 2
        assert "overlaps --data" in _one_line_error(capsys)


def test_balanced_pseudo_labels_are_the_models_confident_predictions(tiny_source, tmp_path):
    """--pseudo-labels balanced: some but not all pixels are labelled, the coverage reported is that share,
    and the labels are mostly the model's own argmax: a pixel's label is argmax_k p_k / t_k with a ratio of at
    least 1, which favours a less probable class only where that class's threshold is lower."""
    from adaptation.cli import adapt_config
    from adaptation.segmentation.shot import DenseShotAdapter

    cfg = adapt_config(["--source", str(tiny_source), "--target", "builtin:scenes/textured", "--pseudo-labels",
                        "balanced", "--device", "cpu", "--out", str(tmp_path)])
    assert cfg.pseudo_labels == "balanced"
    adapter = DenseShotAdapter(cfg)
    sample = adapter.evaluate(sample=True)["sample"]
    maps, scores = adapter.pseudo_labels(sample, round_=0)
    thresholds = class_thresholds(sample[1].float(), balanced_fraction(0))
    adapter.model.eval()
    labelled = agree = 0
    with torch.no_grad():
        for i in range(len(adapter.target)):
            probs = adapter.model.classifier(adapter.model.pixel_features(adapter.target[i][0][None]))[0].softmax(0)
            pred, label = probs.argmax(0), maps[i].long()
            keep = label != IGNORE_INDEX
            labelled += int(keep.sum())
            agree += int((label[keep] == pred[keep]).sum())
            ratio = probs / thresholds[:, None, None]
            chosen = ratio.gather(0, label.clamp(max=probs.shape[0] - 1)[None])[0]
            tol = 1e-4   # the adapter's batched pass and this one-image pass differ in the last bits
            assert torch.all(chosen[keep] >= 1 - tol) and torch.all(ratio.max(0).values[~keep] < 1 + tol)
            assert torch.allclose(chosen[keep], ratio.max(0).values[keep], rtol=tol)
            other = keep & (probs.gather(0, label.clamp(max=probs.shape[0] - 1)[None])[0] < probs.max(0).values - tol)
            assert torch.all(thresholds[label[other]] < thresholds[pred[other]])  # less probable: lower threshold
    total = sum(m.numel() for m in maps)
    assert 0 < labelled < total
    assert scores["coverage"] == pytest.approx(100 * labelled / total)
    assert agree > 0.5 * labelled


def _one_line_error(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err, err
    return err


def test_clear_errors(tiny_scenes, tmp_path, capsys):
    from adaptation.cli import adapt_main, evaluate_main, train_source_main
    from adaptation.dense.model import SegmentationModel, dense_model_config
    from workbench.checkpoint import save_checkpoint

    # a classification checkpoint given --task segmentation
    cls_ckpt = save_checkpoint(tmp_path / "cls" / "source.pt", "source-model",
                               {"model_config": {"backbone": "dtn", "num_classes": 10, "transform": "digits"},
                                "model": {}})
    assert adapt_main(["--task", "segmentation", "--source", str(cls_ckpt), "--target",
                       "builtin:scenes/textured"]) == 2
    assert "classification" in _one_line_error(capsys)
    assert evaluate_main(["--task", "segmentation", "--model", str(cls_ckpt), "--data",
                          "builtin:scenes/textured"]) == 2
    _one_line_error(capsys)

    # a segmentation checkpoint whose classes differ from the data's
    model = SegmentationModel("resnet18", "fcn", 5, head_kwargs={"channels": 8})
    seg_ckpt = save_checkpoint(tmp_path / "seg5" / "source.pt", "source-model", {
        "task": "segmentation", "model_config": dense_model_config("resnet18", "fcn", 5, head_kwargs={"channels": 8}),
        "model": model.state_dict()})
    assert evaluate_main(["--model", str(seg_ckpt), "--data", "builtin:scenes/textured:test"]) == 2
    assert "11 classes" in _one_line_error(capsys)
    assert adapt_main(["--source", str(seg_ckpt), "--target", "builtin:scenes/textured", "--device", "cpu"]) == 2
    _one_line_error(capsys)
    # segmentation offers no SHOT++
    assert adapt_main(["--method", "shot++", "--source", str(seg_ckpt), "--target", "builtin:scenes/textured"]) == 2
    assert "shot++" in _one_line_error(capsys)
    # --task classification on a segmentation checkpoint
    assert evaluate_main(["--task", "classification", "--model", str(seg_ckpt), "--data", "builtin:digits/uci"]) == 2
    _one_line_error(capsys)
    # a backbone without multi-scale features
    assert train_source_main(["--task", "segmentation", "--backbone", "lenet", "--epochs", "1", "--device", "cpu",
                              "--out", str(tmp_path / "lenet"), "--no-progress"]) == 2
    assert "no multi-scale features" in _one_line_error(capsys)


def _recording_forward(monkeypatch, cls, name: str, seen: list) -> None:
    """Wrap cls.<name> so that every call records the dtype of the logits it returns."""
    original = getattr(cls, name)

    def wrapped(self, *args, **kwargs):
        out = original(self, *args, **kwargs)
        seen.append((out[0] if isinstance(out, tuple) else out).dtype)
        return out

    monkeypatch.setattr(cls, name, wrapped)


@pytest.mark.parametrize("precision, dtype", [("bf16", torch.bfloat16), ("fp32", torch.float32)])
def test_precision_reaches_segmentation_training_and_adaptation(tiny_scenes, tmp_path, monkeypatch, capsys, precision,
                                                                 dtype):
    from adaptation.cli import adapt_main, train_source_main
    from adaptation.dense.model import SegmentationModel

    trained, adapted = [], []
    _recording_forward(monkeypatch, SegmentationModel, "forward_train", trained)
    assert train_source_main(["--task", "segmentation", "--data", "builtin:scenes/printed", "--backbone", "dtn",
                              "--head", "fcn", "--head-channels", "8", "--epochs", "1", "--batch-size", "8",
                              "--precision", precision, "--device", "cpu", "--out", str(tmp_path / "src"),
                              "--no-progress"]) == 0
    _recording_forward(monkeypatch, SegmentationModel, "forward", adapted)
    assert adapt_main(["--source", str(tmp_path / "src"), "--target", "builtin:scenes/textured", "--epochs", "1",
                       "--batch-size", "8", "--precision", precision, "--device", "cpu", "--out", str(tmp_path / "ad"),
                       "--no-progress"]) == 0
    assert trained and set(trained) == {dtype} and adapted and set(adapted) == {dtype}
    assert json.loads((tmp_path / "src" / "config.json").read_text())["precision"] == precision
    metrics = json.loads((tmp_path / "ad" / "metrics.json").read_text())
    assert metrics["config"]["precision"] == precision and 0 <= metrics["test_miou"] <= 100
    # reported scores are fp32 whatever the training precision: `evaluate` reproduces them exactly
    from adaptation.segmentation.evaluate import evaluate_dense_model

    assert evaluate_dense_model(tmp_path / "ad", "builtin:scenes/textured:test", device="cpu")["miou"] == \
        pytest.approx(metrics["test_miou"], abs=1e-9)
    # classification has no bf16 path: refused in one line
    capsys.readouterr()
    assert train_source_main(["--data", "builtin:digits/uci", "--precision", "bf16", "--out", str(tmp_path / "c")]) == 2
    assert "--precision applies to segmentation and pose" in _one_line_error(capsys)


# ------------------------------------------------------------------ end to end (slow)
@pytest.mark.slow
def test_end_to_end_adaptation_improves_target_miou(tmp_path, monkeypatch):
    """train-source on printed scenes, then SHOT-IM to textured scenes: the held-out target mIoU rises.
    (SHOT's nearest-centroid pixel pseudo-labels score below the model's own predictions here, 33 against
    46 mIoU, so SHOT gains less than SHOT-IM: docs/RESULTS.md.)"""
    from adaptation.cli import adapt_main, train_source_main

    monkeypatch.setenv("WORKBENCH_DATA", str(tmp_path / "wbdata"))
    monkeypatch.setenv("WORKBENCH_SCENES_N", os.environ.get("DENSE_E2E_SCENES", "3000,500"))
    # 6,000 Adam iterations (32 epochs of 3,000 scenes): after 1,500 the from-scratch DTN is still too uncertain
    # to adapt (29 mIoU in-domain against 80, docs/RESULTS.md); bf16 autocast where the CPU computes it (3x
    # faster there), fp32 elsewhere. About 25 min on one core.
    assert train_source_main(["--task", "segmentation", "--data", "builtin:scenes/printed", "--backbone", "dtn",
                              "--head", "fcn", "--head-channels", "64", "--optimizer", "adam", "--epochs", "32",
                              "--precision", "auto", "--device", "cpu", "--out", str(tmp_path / "src"), "--no-progress"]) == 0
    assert adapt_main(["--source", str(tmp_path / "src"), "--target", "builtin:scenes/textured", "--method", "shot-im",
                       "--epochs", "3",
                       "--precision", "auto", "--device", "cpu", "--no-save-predictions", "--out", str(tmp_path / "shot"),
                       "--no-progress"]) == 0
    metrics = json.loads((tmp_path / "shot" / "metrics.json").read_text())
    assert metrics["test_miou"] > metrics["source_only_test_miou"] + 1.0


def test_scenes_benchmark_reports_what_the_runs_score_and_resumes(tiny_scenes, tmp_path, load_script):
    """The table's figures are the checkpoints' own scores on the test splits, the sources selected on printed:val,
    the columns named by what runs; the val table holds the same runs on the val splits (for choosing settings);
    a second call reuses the finished runs instead of training again."""
    from adaptation.segmentation.evaluate import evaluate_dense_model

    bench = load_script("run_scenes_benchmark")
    argv = ["--seeds", "0", "--heads", "fcn", "--methods", "shot-im", "shot", "--head-channels", "8",
            "--source-epochs", "1", "--epochs", "1", "--diversity-priors", "uniform", "initial", "--pseudo-labels",
            "centroid", "balanced", "--out", str(tmp_path)]
    bench.main(argv)

    def read(name):
        return {r["column"]: r for r in map(json.loads, (tmp_path / name).read_text().splitlines())}

    rows = {c: r["miou"] for c, r in read("results.jsonl").items()}
    # only the uniform prior is SHOT-IM / SHOT; pseudo-label rules make SHOT columns only
    assert set(rows) == {"in-domain", "source-only", "shot-im", "im (source prior)", "shot", "shot-im + balanced labels",
                         "im (source prior) + centroid labels", "im (source prior) + balanced labels"}
    assert {r["data"] for c, r in read("results.jsonl").items() if c != "in-domain"} == {"builtin:scenes/textured:test"}
    for column, prior, pseudo in (("im (source prior) + centroid labels", "initial", "centroid"),
                                  ("shot-im + balanced labels", "uniform", "balanced")):
        run = tmp_path / f"fcn-shot-{prior}-{pseudo}-s0"
        config = json.loads((run / "config.json").read_text())
        assert (config["method"], config["diversity_prior"], config["pseudo_labels"]) == ("shot", prior, pseudo)
        assert json.loads((run / "metrics.json").read_text())["method_name"] == column
    source = tmp_path / "source-fcn-s0" / "source.pt"
    assert json.loads((tmp_path / "source-fcn-s0" / "metrics.json").read_text())["selection_data"] == \
        "builtin:scenes/printed:val"
    target = "builtin:scenes/textured:test"
    assert rows["source-only"] == pytest.approx(evaluate_dense_model(source, target, device="cpu")["miou"])
    shot_im = tmp_path / "fcn-shot-im-uniform-s0"
    assert json.loads((shot_im / "config.json").read_text())["diversity_prior"] == "uniform"
    assert rows["shot-im"] == pytest.approx(evaluate_dense_model(shot_im / "adapted.pt", target, device="cpu")["miou"])
    initial = tmp_path / "fcn-shot-im-initial-s0"
    assert json.loads((initial / "config.json").read_text())["diversity_prior"] == "initial"
    assert rows["im (source prior)"] == pytest.approx(evaluate_dense_model(initial / "adapted.pt", target,
                                                                           device="cpu")["miou"])
    assert rows["in-domain"] == pytest.approx(evaluate_dense_model(source, "builtin:scenes/printed:test",
                                                                   device="cpu")["miou"])
    # the val table: the same runs on the val splits, headed as no result
    val = {c: r["miou"] for c, r in read("val-results.jsonl").items()}
    assert set(val) == set(rows)
    assert val["in-domain"] == pytest.approx(evaluate_dense_model(source, "builtin:scenes/printed:val",
                                                                  device="cpu")["miou"])
    assert val["source-only"] == pytest.approx(evaluate_dense_model(source, "builtin:scenes/textured:val",
                                                                    device="cpu")["miou"])
    assert val["im (source prior)"] == pytest.approx(evaluate_dense_model(initial / "adapted.pt",
                                                                          "builtin:scenes/textured:val", device="cpu")["miou"])
    assert "NOT A RESULT" in (tmp_path / "val-table.md").read_text()
    table = (tmp_path / "table.md").read_text()
    assert "| fcn |" in table and "textured:test" in table and "textured:val" not in table
    stamp = (initial / "metrics.json").stat().st_mtime_ns
    bench.main(argv)
    assert (initial / "metrics.json").stat().st_mtime_ns == stamp
    # --report-only: the table of what is finished, training nothing (an unfinished run is left out)
    balanced = tmp_path / "fcn-shot-initial-balanced-s0"
    (balanced / "metrics.json").unlink()
    bench.main([*argv, "--seeds", "0", "1", "--report-only"])
    assert not (balanced / "metrics.json").exists()
    assert not (tmp_path / "source-fcn-s1").exists()
    reported = {c: r["miou"] for c, r in read("results.jsonl").items()}
    assert reported == {column: miou for column, miou in rows.items() if column != "im (source prior) + balanced labels"}
    # resuming the folder with other settings would mix two experiments in one table: a clear error instead
    stamp = (tmp_path / "source-fcn-s0" / "metrics.json").stat().st_mtime_ns
    with pytest.raises(ValueError, match=r"source-fcn-s0 was made with epochs=1 .* asks for epochs=2"):
        bench.main([*argv, "--source-epochs", "2"])
    assert (tmp_path / "source-fcn-s0" / "metrics.json").stat().st_mtime_ns == stamp
    # a source selected on the test split (the code before val) is refused, even for --report-only
    config = json.loads((tmp_path / "source-fcn-s0" / "config.json").read_text())
    (tmp_path / "source-fcn-s0" / "config.json").write_text(json.dumps({**config, "select_on": None}))
    with pytest.raises(ValueError, match=r"select_on=None .* select_on='builtin:scenes/printed:val'"):
        bench.main([*argv, "--report-only"])
