"""Partial-set and open-set adaptation: SHOT's PDA and ODA rules on hand-worked examples, the class subsets,
the open-set scores, and the command lines' one-line errors."""

import argparse
import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from adaptation.classification.open_set import open_set_scores, unknown_by_entropy
from workbench.adapt.cluster import shot_pseudo_labels
from workbench.arguments import class_list


@pytest.fixture(autouse=True)
def _data_cache(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("WORKBENCH_DATA", str(tmp_path_factory.getbasetemp() / "wbdata"))


def test_pda_threshold_drops_a_class_held_by_too_few_samples():
    """Three tight clusters in feature space; the model predicts class 2 for only 5 samples (its own
    cluster). With the partial-set threshold 10 class 2 is no candidate, so those 5 go to the nearest
    remaining centroid; with 0 (closed set) they keep class 2."""
    gen = torch.Generator().manual_seed(0)
    centres = torch.tensor([[1.0, 0, 0], [0, 1.0, 0], [0.6, 0.8, 0.0]])
    sizes = [20, 20, 5]
    features = torch.cat([c + 0.01 * torch.randn(n, 3, generator=gen) for c, n in zip(centres, sizes)])
    probs = torch.eye(3)[torch.repeat_interleave(torch.arange(3), torch.tensor(sizes))] * 0.9 + 0.1 / 3
    closed = shot_pseudo_labels(features, probs, backend="torch")
    partial = shot_pseudo_labels(features, probs, backend="torch", min_count=10)
    assert closed[40:].tolist() == [2] * 5
    # (0.6, 0.8) is nearer (0, 1) than (1, 0) in cosine: class 1
    assert partial[40:].tolist() == [1] * 5 and partial[:40].tolist() == [0] * 20 + [1] * 20


def test_oda_split_calls_the_high_entropy_samples_unknown():
    confident = F.one_hot(torch.tensor([0, 1, 2, 0, 1, 2]), 3).float() * 0.97 + 0.01
    uncertain = torch.tensor([[0.34, 0.33, 0.33], [0.4, 0.3, 0.3], [0.3, 0.35, 0.35], [0.33, 0.34, 0.33]])
    probs = torch.cat([confident, uncertain])
    assert unknown_by_entropy(probs).tolist() == [False] * 6 + [True] * 4


def test_open_set_scores_by_hand():
    """Two known classes and unknown (label 2). Samples 0-3 confident: predictions 0, 0, 1, 0; samples 4-5
    uncertain (called unknown). Labels 0, 0, 1, 1, 2, 0.
    Class 0: samples 0, 1, 5 -> right, right, wrong (called unknown) = 2/3. Class 1: samples 2, 3 -> 1/2.
    Unknown: sample 4 -> right = 1. OS* = (66.7 + 50) / 2, OS = (66.7 + 50 + 100) / 3, H = 2 OS* UNK / (OS* + UNK)."""
    probs = torch.tensor([[0.98, 0.02], [0.97, 0.03], [0.03, 0.97], [0.96, 0.04], [0.5, 0.5], [0.52, 0.48]])
    scores = open_set_scores(probs, torch.tensor([0, 0, 1, 1, 2, 0]), num_known=2)
    os_star = (200 / 3 + 50) / 2
    assert scores["os_star"] == pytest.approx(os_star)
    assert scores["unknown"] == pytest.approx(100.0)
    assert scores["os"] == pytest.approx((200 / 3 + 50 + 100) / 3)
    assert scores["h_score"] == pytest.approx(2 * os_star * 100 / (os_star + 100))


def test_class_lists_parse_ranges_and_refuse_repeats():
    assert class_list("0-4") == (0, 1, 2, 3, 4) and class_list("1,3-4, 7") == (1, 3, 4, 7)
    for bad in ("a-b", "1,1", "", "-2"):
        with pytest.raises(argparse.ArgumentTypeError):
            class_list(bad)


def test_class_subset_relabels_by_the_models_classes_and_marks_unknown():
    from adaptation.classification.data import ArrayImageDataset, class_subset

    images = np.zeros((6, 4, 4, 3), np.uint8)
    data = ArrayImageDataset(images, np.array([0, 3, 5, 3, 9, 7]), lambda image: torch.zeros(1), "toy")
    known = class_subset(data, classes=(3, 5, 7))                      # an open-set source's classes
    assert known.labels.tolist() == [0, 1, 0, 2] and known.num_classes == 3
    partial = class_subset(data, classes=(3, 5, 7), keep_classes=(3, 7))
    assert partial.labels.tolist() == [0, 0, 2]
    open_target = class_subset(data, classes=(3, 5, 7), unknown=True)
    assert open_target.labels.tolist() == [3, 0, 1, 0, 3, 2] and open_target.num_classes == 4


# ------------------------------------------------------------------ the adapter and the command lines
@pytest.fixture(scope="module")
def known_source(tmp_path_factory):
    import os

    from adaptation.classification.source import SourceConfig, train_source

    os.environ["WORKBENCH_DATA"] = str(tmp_path_factory.getbasetemp() / "wbdata")
    out = tmp_path_factory.mktemp("known")
    metrics = train_source(SourceConfig(data="builtin:digits/uci", backbone="lenet", epochs=2, classes=(0, 1, 2, 3, 4),
                                        run_dir=str(out), progress=False))
    return out, metrics


def test_a_known_class_source_records_its_classes(known_source):
    from workbench.checkpoint import load_checkpoint

    out, metrics = known_source
    saved = load_checkpoint(out / "source.pt", kind="source-model")
    assert saved["model_config"]["classes"] == [0, 1, 2, 3, 4] and saved["model_config"]["num_classes"] == 5
    assert metrics["num_classes"] == 5


def test_open_set_adaptation_scores_and_skips_batches_without_known_samples(known_source, tmp_path):
    from adaptation.classification.shot import AdaptConfig, ShotAdapter

    adapter = ShotAdapter(AdaptConfig(source=str(known_source[0]), target="builtin:digits/photo", setting="open",
                                      epochs=1, run_dir=str(tmp_path / "oda"), progress=False))
    assert set(adapter.eval_set.labels.tolist()) == {0, 1, 2, 3, 4, 5}          # 5-9 became "unknown" (5)
    batch = next(iter(adapter.loader))
    all_unknown = torch.full((len(adapter.eval_set),), 5)
    assert adapter.batch_loss(batch, all_unknown) is None
    metrics = adapter.run()
    for key in ("source_only", "adapted", "source_only_test", "adapted_test"):
        scores = metrics["open_set"][key]
        assert set(scores) == {"os_star", "os", "unknown", "h_score"}
        assert 0 <= scores["os_star"] <= 100 and 0 <= scores["unknown"] <= 100
    assert metrics["accuracy"] == metrics["open_set"]["adapted"]["os"]
    assert json.loads((tmp_path / "oda" / "config.json").read_text())["setting"] == "open"


def test_partial_set_drops_the_diversity_term_and_scores_the_target_classes(known_source, tmp_path):
    from adaptation.classification.shot import AdaptConfig, ShotAdapter

    cfg = AdaptConfig(source=str(known_source[0]), target="builtin:digits/photo", setting="partial",
                      target_classes=(1, 3), epochs=1, run_dir=str(tmp_path / "pda"), progress=False)
    adapter = ShotAdapter(cfg)
    assert adapter.cfg.diversity is False and adapter.cfg.pseudo_label_min_count == 10
    assert set(adapter.eval_set.labels.tolist()) == {1, 3}
    loss, terms = adapter.batch_loss(next(iter(adapter.loader)), None)
    assert terms["im"] == terms["conditional_entropy"]


@pytest.mark.parametrize("argv, line", [
    (["--target", "builtin:digits/photo", "--setting", "partial", "--target-classes", "2-6"],
     "--target-classes 5,6: not among the source model's classes 0,1,2,3,4: a partial-set target holds a subset "
     "of them"),
    (["--target", "builtin:digits/photo", "--target-classes", "1,2"],
     "--target-classes names a partial-set target's classes: pass --setting partial"),
    (["--target", "builtin:digits/photo", "--setting", "open", "--method", "nrc"],
     "--setting open runs SHOT's rules (--method shot or shot-im), not nrc"),
])
def test_bad_settings_are_one_line(known_source, tmp_path, capsys, argv, line):
    from adaptation.cli import adapt_main

    assert adapt_main(["--source", str(known_source[0]), "--out", str(tmp_path / "x"), *argv]) == 2
    assert capsys.readouterr().err.strip().splitlines() == [f"error: {line}"]
    assert not (tmp_path / "x").exists()


def test_open_set_shot_im_still_splits_off_the_unknown(known_source, tmp_path):
    """As the official ODA code, which splits known from unknown whatever --cls_par: SHOT-IM's entropy terms
    run on the known samples, with no cross-entropy."""
    from adaptation.classification.shot import AdaptConfig, ShotAdapter
    from workbench.logging import RunLogger

    adapter = ShotAdapter(AdaptConfig(source=str(known_source[0]), target="builtin:digits/photo", setting="open",
                                      method="shot-im", epochs=1, run_dir=str(tmp_path / "im"), progress=False))
    logger = RunLogger(tmp_path / "im", progress=False)
    labels = adapter.epoch_labels(adapter.evaluate_initial(), 0, logger, {})
    logger.close()
    assert labels is not None and (labels == 5).any() and (labels < 5).any()
    _, terms = adapter.batch_loss(next(iter(adapter.loader)), labels)
    assert "pseudo_ce" not in terms
