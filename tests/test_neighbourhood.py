"""The neighbourhood methods (NRC, AaD) against brute-force computations: the k-NN search, the expanded and
reciprocal neighbourhoods, both losses, and the adapter's training set-up."""

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from adaptation.classification.aad import aad_loss, dispersion_weight
from adaptation.classification.nrc import nrc_loss
from workbench.adapt.cluster import faiss_available
from workbench.adapt.neighbours import MemoryBank, nearest_neighbours

BACKENDS = ["torch"] + (["faiss"] if faiss_available() else [])


def brute_neighbours(queries: np.ndarray, bank: np.ndarray, k: int) -> np.ndarray:
    """The k largest inner products per query, by sorting every similarity in float64."""
    return np.array([np.argsort(-(bank.astype(np.float64) @ q))[:k] for q in queries.astype(np.float64)])


@pytest.mark.parametrize("backend", BACKENDS)
def test_nearest_neighbours_match_a_brute_force_search(backend, monkeypatch):
    gen = torch.Generator().manual_seed(0)
    bank = F.normalize(torch.randn(500, 16, generator=gen), dim=1)
    queries = F.normalize(torch.randn(37, 16, generator=gen), dim=1)
    monkeypatch.setattr("workbench.adapt.neighbours.QUERY_CHUNK_ELEMENTS", 500 * 5)  # torch: chunks of 5 queries
    found = nearest_neighbours(queries, bank, 7, backend)
    assert found.shape == (37, 7) and found.dtype == torch.int64
    np.testing.assert_array_equal(found.numpy(), brute_neighbours(queries.numpy(), bank.numpy(), 7))


def test_more_neighbours_than_samples_is_a_clear_error():
    with pytest.raises(ValueError, match="6 neighbours asked of a bank of 5 samples: use fewer neighbours"):
        nearest_neighbours(torch.eye(5), torch.eye(5), 6, "torch")


def small_bank(n=12, d=4, classes=3, seed=1):
    gen = torch.Generator().manual_seed(seed)
    features = torch.randn(n, d, generator=gen)
    scores = torch.randn(n, classes, generator=gen).softmax(1)
    return features, scores


@pytest.mark.parametrize("backend", BACKENDS)
def test_nrc_loss_matches_the_papers_sums_computed_by_hand(backend):
    features, scores = small_bank()
    bank = MemoryBank(features, scores, backend=backend)
    idx = torch.tensor([0, 5, 7])
    logits = torch.randn(3, 3, generator=torch.Generator().manual_seed(2), requires_grad=True)
    probs = logits.softmax(1)
    batch_features = torch.randn(3, 4, generator=torch.Generator().manual_seed(3))
    queries = bank.update(idx, batch_features, probs)
    loss, terms = nrc_loss(probs, queries, idx, bank, neighbours=3, expanded_neighbours=2, reciprocal_weights=True)

    # by hand: neighbours by sorted cosine similarity over the updated bank, the row itself first and dropped
    f = F.normalize(features, dim=1).numpy().astype(np.float64)
    f[idx.numpy()] = F.normalize(batch_features, dim=1).numpy()
    s = scores.numpy().astype(np.float64)
    s[idx.numpy()] = probs.detach().numpy()
    p = probs.detach().numpy().astype(np.float64)

    def knn(row, k):
        return [j for j in np.argsort(-(f @ f[row]))[: k + 1] if j != row][:k]

    neighbourhood = expanded = 0.0
    for b, i in enumerate(idx.tolist()):
        for j in knn(i, 3):
            reciprocal = knn(j, 2).count(i)
            # the official F.kl_div on probabilities: sum_c s (log s - p) = <s, log s> - <p, s>
            neighbourhood += (reciprocal if reciprocal else 0.1) * (s[j] @ np.log(s[j]) - p[b] @ s[j])
            expanded += sum(0.1 * (s[m] @ np.log(s[m]) - p[b] @ s[m]) for m in knn(j, 2))
    mean = p.mean(0)
    diversity = float((mean * np.log(mean + 1e-5)).sum())
    assert terms["neighbourhood"].item() == pytest.approx(neighbourhood / 3, rel=1e-5)
    assert terms["expanded_neighbourhood"].item() == pytest.approx(expanded / 3, rel=1e-5)
    assert terms["negative_marginal_entropy"].item() == pytest.approx(diversity, rel=1e-5)
    assert loss.item() == pytest.approx((neighbourhood + expanded) / 3 + diversity, rel=1e-5)
    loss.backward()
    assert logits.grad.abs().sum() > 0


def test_a_reciprocal_neighbour_weighs_its_count_and_others_a_tenth():
    """Four points on a line: 0 and 1 are each other's nearest; with K = KK = 1 the pair is reciprocal
    (affinity 1), while 3's nearest (2) has 1 as its own nearest, so 3 gets the 0.1 affinity. Without the
    paper's reciprocal weights (the official code's effective weights) both get 0.1."""
    angles = torch.tensor([0.0, 0.1, 0.5, 1.2])
    features = torch.stack([angles.cos(), angles.sin()], 1)
    scores = torch.eye(2)[[0, 0, 1, 1]].float()
    bank = MemoryBank(features, scores, backend="torch")
    probs = torch.tensor([[0.5, 0.5], [0.5, 0.5]])
    idx = torch.tensor([0, 3])
    _, terms = nrc_loss(probs, bank.features[idx], idx, bank, neighbours=1, expanded_neighbours=1,
                        reciprocal_weights=True)
    # sample 0: neighbour 1 (reciprocal, affinity 1): -<p, s_1> = -0.5; sample 3: neighbour 2 (affinity 0.1): -0.05
    assert terms["neighbourhood"].item() == pytest.approx((-0.5 - 0.05) / 2)
    _, terms = nrc_loss(probs, bank.features[idx], idx, bank, neighbours=1, expanded_neighbours=1)
    assert terms["neighbourhood"].item() == pytest.approx((-0.05 - 0.05) / 2)


def test_the_official_nrc_code_overwrites_its_reciprocal_weights():
    """The official train_tar.py's own lines: filling the expanded view writes 0.1 over the reciprocal weights,
    which is why nrc_loss's default weighs every neighbour by 0.1."""
    match = torch.tensor([[2.0, 0.0, 1.0]])
    weight = torch.where(match > 0.0, match, torch.ones_like(match).fill_(0.1))
    weight_kk = weight.unsqueeze(-1).expand(-1, -1, 2)
    weight_kk = weight_kk.fill_(0.1)
    assert weight.tolist() == [[pytest.approx(0.1)] * 3]


@pytest.mark.parametrize("backend", BACKENDS)
def test_aad_loss_matches_attraction_and_dispersion_by_hand(backend):
    features, scores = small_bank(n=10, classes=4)
    bank = MemoryBank(features, scores, backend=backend)
    idx = torch.tensor([1, 2, 8, 9])
    probs = torch.randn(4, 4, generator=torch.Generator().manual_seed(5)).softmax(1)
    queries = bank.update(idx, torch.randn(4, 4, generator=torch.Generator().manual_seed(6)), probs)
    loss, terms = aad_loss(probs, queries, bank, neighbours=3, weight=0.7)
    f, s, p = bank.features.double().numpy(), bank.scores.double().numpy(), probs.double().numpy()
    attraction = -np.mean([sum(p[b] @ s[j] for j in np.argsort(-(f @ f[i]))[1:4]) for b, i in enumerate(idx.tolist())])
    dispersion = np.mean([sum(p[a] @ p[b] for b in range(4) if b != a) for a in range(4)])
    assert terms["attraction"].item() == pytest.approx(attraction, rel=1e-5)
    assert terms["dispersion"].item() == pytest.approx(dispersion, rel=1e-5)
    assert loss.item() == pytest.approx(attraction + 0.7 * dispersion, rel=1e-5)


def test_dispersion_weight_decays_as_the_official_code():
    assert dispersion_weight(0, 100, 1.0, 5.0) == 1.0
    assert dispersion_weight(50, 100, 1.0, 5.0) == pytest.approx(6.0 ** -5)
    assert dispersion_weight(99, 100, 2.0, 0.0) == 2.0          # decay 0: constant (the office scripts)


def test_bank_update_writes_normalised_rows_and_scores():
    bank = MemoryBank(torch.ones(4, 2), torch.full((4, 2), 0.5), backend="torch")
    queries = bank.update(torch.tensor([2]), torch.tensor([[3.0, 4.0]]), torch.tensor([[0.9, 0.1]]))
    np.testing.assert_allclose(queries.numpy(), [[0.6, 0.8]])
    np.testing.assert_allclose(bank.features[2].numpy(), [0.6, 0.8])
    np.testing.assert_allclose(bank.scores[2].numpy(), [0.9, 0.1])
    np.testing.assert_allclose(bank.features[0].numpy(), [2 ** -0.5] * 2, rtol=1e-6)


# ------------------------------------------------------------------ the adapter
@pytest.fixture(scope="module")
def lenet_source(tmp_path_factory):
    import os

    from adaptation.classification.source import SourceConfig, train_source

    os.environ["WORKBENCH_DATA"] = str(tmp_path_factory.getbasetemp() / "wbdata")
    out = tmp_path_factory.mktemp("source")
    train_source(SourceConfig(data="builtin:digits/uci", backbone="lenet", epochs=2, run_dir=str(out), progress=False))
    return out


@pytest.mark.parametrize("method", ["nrc", "aad"])
def test_neighbourhood_adapters_train_the_classifier_at_their_multipliers(lenet_source, tmp_path, method):
    from adaptation.classification.neighbourhood import NeighbourhoodAdapter
    from adaptation.classification.shot import AdaptConfig
    from workbench.checkpoint import load_checkpoint

    cfg = AdaptConfig(source=str(lenet_source), target="builtin:digits/photo", method=method, epochs=1,
                      run_dir=str(tmp_path / method), progress=False)
    adapter = NeighbourhoodAdapter(cfg)
    assert adapter.cfg.beta == 0.0 and adapter.cfg.neighbours == 5 and adapter.cfg.lr == 1e-2
    groups = adapter.param_groups(None, {})
    assert [mult for _, mult in groups] == [0.1, 1.0, 1.0] and groups[2][0] is adapter.model.classifier
    before = {k: v.clone() for k, v in adapter.model.classifier.state_dict().items()}
    metrics = adapter.run()
    after = load_checkpoint(tmp_path / method / "adapted.pt", kind="adapted-model")["model"]
    assert any(not torch.equal(before[k], after[f"classifier.{k}"]) for k in before)   # C moved, unlike SHOT
    assert metrics["method"] == method and 0 <= metrics["test_accuracy"] <= 100
    config = json.loads((tmp_path / method / "config.json").read_text())
    assert config["method"] == method and config["backbone_lr_mult"] == 0.1


def test_neighbourhood_methods_refuse_torchrun_and_other_tasks(capsys):
    from adaptation.classification.neighbourhood import NeighbourhoodAdapter
    from adaptation.classification.shot import AdaptConfig
    from adaptation.cli import adapt_main

    class TwoRanks:
        enabled = True

    with pytest.raises(ValueError, match="--method aad runs in one process"):
        NeighbourhoodAdapter(AdaptConfig(source="s", target="t", method="aad"), TwoRanks())
    assert adapt_main(["--task", "segmentation", "--source", "s", "--target", "t", "--method", "nrc"]) == 2
    assert "--method nrc does not run on segmentation (nrc runs on classification)" in capsys.readouterr().err


def test_every_official_setting_table_names_each_benchmark():
    from adaptation.classification.aad import AAD_DEFAULTS
    from adaptation.classification.nrc import NRC_DEFAULTS
    from adaptation.classification.shot import BENCHMARKS

    for table, keys in ((NRC_DEFAULTS, {"neighbours", "expanded_neighbours", "late_expanded_neighbours"}),
                        (AAD_DEFAULTS, {"neighbours", "dispersion_weight", "dispersion_decay"})):
        assert set(table) == set(BENCHMARKS)
        for values in table.values():
            assert keys | {"late_neighbours", "lr", "epochs", "constant_lr"} == set(values)
    # the official VisDA-C scripts (train_tar.py, tar_adaptation.py)
    assert (NRC_DEFAULTS["visda-c"]["neighbours"], NRC_DEFAULTS["visda-c"]["expanded_neighbours"]) == (5, 5)
    assert (AAD_DEFAULTS["visda-c"]["neighbours"], AAD_DEFAULTS["visda-c"]["dispersion_decay"]) == (5, 5.0)


def test_shot_adapter_refuses_the_neighbourhood_methods_it_would_run_as_shot():
    from adaptation.classification.neighbourhood import NeighbourhoodAdapter, create_adapter
    from adaptation.classification.shot import AdaptConfig, ShotAdapter

    for method in ("nrc", "aad"):   # the digits benchmark once built ShotAdapter for them: NRC and AaD ran SHOT's loss
        with pytest.raises(ValueError, match=f"--method {method} runs on NeighbourhoodAdapter, not ShotAdapter"):
            ShotAdapter(AdaptConfig(source="nowhere", target="builtin:digits/uci", method=method))
        with pytest.raises(Exception) as caught:   # the factory picks the right class (then fails on the source)
            create_adapter(AdaptConfig(source="nowhere", target="builtin:digits/uci", method=method))
        assert "NeighbourhoodAdapter, not ShotAdapter" not in str(caught.value)
    assert issubclass(NeighbourhoodAdapter, ShotAdapter)


def test_office_settings_are_the_official_scripts():
    from adaptation.classification.shot import AdaptConfig

    def resolved(method, benchmark):
        return AdaptConfig(source="s", target="t", method=method, benchmark=benchmark).resolved("images")

    # NRC office-home/train_tar.py: K 3, KK 2 (train_tar_oh.sh), then K 5, KK 4 past half the steps, lr constant
    nrc = resolved("nrc", "office-home")
    assert (nrc.neighbours, nrc.expanded_neighbours, nrc.late_neighbours, nrc.late_expanded_neighbours) == (3, 2, 5, 4)
    assert nrc.constant_lr and nrc.epochs == 40
    # the same script on office-31, as its comments say: K 2, KK 3, no switch, SHOT's lr decay, 50 epochs
    nrc31 = resolved("nrc", "office31")
    assert (nrc31.neighbours, nrc31.expanded_neighbours, nrc31.late_neighbours) == (2, 3, None)
    assert not nrc31.constant_lr and nrc31.epochs == 50
    # AaD office-home: K 3 then 2, constant alpha and lr; office-31 (office31_tar.sh): K 3, beta 1, 50 epochs
    aad = resolved("aad", "office-home")
    assert (aad.neighbours, aad.late_neighbours, aad.dispersion_decay, aad.constant_lr) == (3, 2, 0.0, True)
    aad31 = resolved("aad", "office31")
    assert (aad31.neighbours, aad31.late_neighbours, aad31.dispersion_decay, aad31.epochs) == (3, None, 1.0, 50)
    assert aad31.constant_lr
    # a given value wins over the table
    given = AdaptConfig(source="s", target="t", method="aad", benchmark="office-home", late_neighbours=3)
    assert given.resolved("images").late_neighbours == 3


@pytest.mark.parametrize("method, late, expected_late", [("nrc", (5, 4), (5, 4)), ("aad", (2, None), (2, 5)),
                                                         ("nrc", (None, None), (3, 5))])
def test_neighbourhood_switches_once_more_than_half_the_steps_are_taken(method, late, expected_late):
    from adaptation.classification.neighbourhood import NeighbourhoodAdapter
    from adaptation.classification.shot import AdaptConfig

    adapter = object.__new__(NeighbourhoodAdapter)   # only the schedule is under test: no model or data
    adapter.cfg = AdaptConfig(source="s", target="t", method=method, neighbours=3, expanded_neighbours=5,
                              late_neighbours=late[0], late_expanded_neighbours=late[1])
    adapter.total_steps = 10
    sizes = []
    for step in range(1, 11):   # the step counted before the batch, as the loop does: 1 .. T
        adapter.step = step
        sizes.append(adapter.neighbourhood_sizes())
    # official: `if iter_num > 0.5 * max_iter` with iter_num = steps taken (0 .. 9): the switch at iter_num 6
    assert sizes == [(3, 5)] * 6 + [expected_late] * 4
