"""BUFR for Procgen agents (issue 36): the soft-binned statistics against independent computations, the
stored record, the restoration loss, and what bottom-up restoration moves."""

import json
import shutil

import numpy as np
import pytest
import torch

from adaptation.cli import adapt_main
from agents.adapt import ProcgenAdapter, ProcgenAdaptConfig, TargetFrames, collect_frames
from agents.feature_stats import (N_BINS, bins_from_range, measure_statistics, population_stability_index,
                                  soft_assignments, soft_counts)
from workbench.checkpoint import load_checkpoint, save_checkpoint

from test_procgen_adapt import TARGET, tiny_adapt, tiny_source


@pytest.fixture(scope="module")
def source_run(tmp_path_factory):
    return tiny_source(tmp_path_factory.mktemp("bufr-source"))


def test_soft_bins_become_the_histogram_as_the_temperature_falls():
    """At tau -> 0 each activation's soft assignment is the one-hot of its bin: B equal bins over the unit's
    range and one open bin on each side, counted here by np.searchsorted on the same edges."""
    gen = torch.Generator().manual_seed(0)
    source = torch.randn(400, 3, generator=gen) * torch.tensor([1.0, 5.0, 0.1]) + torch.tensor([0.0, 2.0, -1.0])
    bins = bins_from_range(source.min(0).values, source.max(0).values)
    target = source * 1.3 + 0.2                                  # some activations fall outside the source range
    u = soft_assignments(target.double(), {k: v.double() for k, v in bins.items()}, tau=1e-9)
    assert u.shape == (3, 400, N_BINS + 2) and torch.allclose(u.sum(2), torch.ones(3, 400, dtype=torch.float64))
    for unit in range(3):
        edges = (bins["edges"][unit] * bins["scale"][unit]).numpy()     # back in activation units
        expected = np.bincount(np.searchsorted(edges, target[:, unit].numpy()), minlength=N_BINS + 2)
        np.testing.assert_allclose(u[unit].sum(0).numpy(), expected, atol=1e-6)
    # at tau 0.01 the source's own counts: everything inside its range, but for the soft shares of the samples
    # that sit on the outer edges (the minimum and the maximum)
    counts = soft_counts(source.double(), {k: v.double() for k, v in bins.items()})
    assert counts[:, 0].max() < 1 and counts[:, -1].max() < 1
    assert torch.allclose(counts.sum(1), torch.full((3,), 400.0, dtype=torch.float64))


def test_soft_assignment_by_hand_at_the_papers_temperature():
    """u_k(x) = softmax_k((k x - sum_{j<k} e_j) / tau), written out per bin for one activation."""
    bins = bins_from_range(torch.tensor([0.0]), torch.tensor([2.0]))
    x = 0.9
    scale = bins["scale"].item()
    e = bins["edges"][0].double().numpy()
    z = np.array([(k * (x / scale) - e[:k - 1].sum()) / 0.01 for k in range(1, N_BINS + 3)])
    expected = np.exp(z - z.max()) / np.exp(z - z.max()).sum()
    got = soft_assignments(torch.tensor([[x]], dtype=torch.float64), {k: v.double() for k, v in bins.items()})[0, 0]
    np.testing.assert_allclose(got.numpy(), expected, rtol=1e-9, atol=1e-12)
    assert expected.argmax() == 1 + int((x / scale - e[0]) // (e[1] - e[0]))   # the bin holding x


def test_population_stability_index_by_hand():
    p, q = torch.tensor([[2.0, 6.0, 2.0]]), torch.tensor([[5.0, 3.0, 2.0]])
    pn, qn = np.array([0.2, 0.6, 0.2]), np.array([0.5, 0.3, 0.2])
    kl = lambda a, b: float(np.sum(a * np.log(a / b)))  # noqa: E731
    assert population_stability_index(p, q).item() == pytest.approx((kl(pn, qn) + kl(qn, pn)) / np.log(3), rel=1e-5)
    assert population_stability_index(p, p).item() == pytest.approx(0.0, abs=1e-7)


def test_stored_statistics_equal_an_independent_computation_on_the_same_frames(source_run):
    adapter = ProcgenAdapter(ProcgenAdaptConfig(source=str(source_run), target=TARGET, device="cpu"))
    frames = collect_frames(adapter.agent, "bigfish", [], 96, 8, "source", 3, "easy", stride=2).frames
    stats = measure_statistics(adapter.model, frames, adapter.rt, batch=40)     # in three chunks
    model = adapter.model
    with torch.no_grad():   # the dense layer before its ReLU, and the logits, by hand
        x = frames.permute(0, 3, 1, 2).float() / 255.0
        dense = model.backbone.fc(torch.flatten(torch.relu(model.backbone.stages(x)), 1))
        logits = model.policy_head(torch.relu(dense))
    for name, acts in (("features", dense), ("logits", logits)):
        assert stats[name]["counts"].shape == (acts.shape[1], N_BINS + 2)
        low, high = acts.min(0).values, acts.max(0).values + 1e-5
        np.testing.assert_allclose(stats[name]["scale"].numpy(), (high - low).clamp_min(1e-5).numpy(), rtol=1e-5)
        edges = stats[name]["edges"] * stats[name]["scale"][:, None]
        np.testing.assert_allclose(edges[:, 0].numpy(), low.numpy(), rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(edges[:, -1].numpy(), high.numpy(), rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(stats[name]["counts"].sum(1).numpy(), np.full(acts.shape[1], 96.0), rtol=1e-5)


def without_statistics(source_run, out):
    """A copy of the source as an agent trained before checkpoints kept statistics: (its dir, its state)."""
    shutil.copytree(source_run, out)
    state = load_checkpoint(out, kind="procgen-agent")
    del state["feature_statistics"]
    save_checkpoint(out / "checkpoint.pt", "procgen-agent", state)
    return out, state


def test_training_keeps_the_statistics_and_the_script_adds_them_to_older_agents(source_run, tmp_path, load_script):
    stats = load_checkpoint(source_run, kind="procgen-agent")["feature_statistics"]
    assert stats["levels"] == [0, 200] and set(stats["layers"]) == {"features", "logits"}
    assert stats["layers"]["logits"]["counts"].shape == (15, N_BINS + 2)
    old, state = without_statistics(source_run, tmp_path / "old")
    script = load_script("procgen_feature_stats")
    assert script.main([str(old), "--frames", "64", "--device", "cpu"]) == 0
    added = load_checkpoint(old, kind="procgen-agent")["feature_statistics"]
    assert added["frames"] == 64 and added["layers"]["features"]["counts"].sum(1).allclose(torch.tensor(64.0))
    assert script.main([str(old), "--device", "cpu"]) == 2                 # already there: --overwrite to redo
    assert all(torch.equal(state["agent_state"]["model"][k], v)
               for k, v in load_checkpoint(old, kind="procgen-agent")["agent_state"]["model"].items())


def test_bufr_refuses_an_agent_without_statistics_in_one_line(source_run, tmp_path, capsys):
    old, _ = without_statistics(source_run, tmp_path / "old")
    rc = adapt_main(["--source", str(old), "--target", TARGET, "--method", "bufr", "--frames", "64", "--eval-episodes",
                     "0", "--paired-steps", "0", "--device", "cpu", "--out", str(tmp_path / "x"), "--no-progress"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "no feature statistics" in err[0]
    assert "python scripts/procgen_feature_stats.py" in err[0]


def with_statistics_of(source_run, frames: TargetFrames, out):
    """A copy of the source whose stored statistics are measured on exactly `frames`."""
    shutil.copytree(source_run, out)
    state = load_checkpoint(out, kind="procgen-agent")
    adapter = ProcgenAdapter(ProcgenAdaptConfig(source=str(out), target=TARGET, device="cpu"))
    state["feature_statistics"] = {"layers": measure_statistics(adapter.model, frames.frames, adapter.rt)}
    save_checkpoint(out / "checkpoint.pt", "procgen-agent", state)
    return out


def test_bufr_on_the_source_data_itself_moves_nothing_and_on_the_target_moves_the_encoder(source_run, tmp_path):
    adapter = ProcgenAdapter(ProcgenAdaptConfig(source=str(source_run), target=TARGET, device="cpu"))
    own = collect_frames(adapter.agent, "bigfish", [], 128, 8, "source", 5, "easy", stride=2)
    own.save(tmp_path / "own.npz", game="bigfish")
    source = with_statistics_of(source_run, own, tmp_path / "source")
    before = load_checkpoint(source, kind="procgen-agent")["agent_state"]["model"]
    # one batch of the very frames the statistics were measured on: every PSI is at its minimum, 0
    tiny_adapt(source, tmp_path / "same", method="bufr", frames_file=str(tmp_path / "own.npz"), batch_size=128,
               epochs=2)
    same = load_checkpoint(tmp_path / "same", kind="procgen-agent")["agent_state"]["model"]
    for name in before:
        torch.testing.assert_close(same[name], before[name], atol=1e-6, rtol=0)
    # the target visuals: the encoder moves, bottom up, and the heads do not
    metrics = tiny_adapt(source, tmp_path / "target", method="bufr", frames=128, batch_size=64, epochs=1)
    assert metrics["epochs"][-1]["restoration_loss"] < metrics["epochs"][0]["restoration_loss"]
    after = load_checkpoint(tmp_path / "target", kind="procgen-agent")["agent_state"]["model"]
    assert any(not torch.allclose(after[k], before[k], atol=1e-5) for k in before if k.startswith("backbone."))
    assert all(torch.equal(after[k], before[k]) for k in before if k.startswith(("policy_head.", "value_head.")))
    assert [e["block"] for e in metrics["epochs"]] == [0, 1, 2, 3]
    assert json.loads((tmp_path / "target" / "config.json").read_text())["lr"] == 1e-4   # BUFR's own default


def test_blocks_are_unfrozen_from_the_input_up_with_decaying_rates(source_run, tmp_path, monkeypatch):
    """SGD is built once per block, over that block and all below it, at lr / 1.5^m."""
    built = []
    real_sgd = torch.optim.SGD

    def recording_sgd(params, lr, **kw):
        params = list(params)
        built.append((len(params), lr, kw["momentum"]))
        return real_sgd(params, lr, **kw)
    monkeypatch.setattr(torch.optim, "SGD", recording_sgd)
    tiny_adapt(source_run, tmp_path / "bu", method="bufr", frames=64, batch_size=32, epochs=1, lr=0.3)
    model = ProcgenAdapter(ProcgenAdaptConfig(source=str(source_run), target=TARGET, device="cpu")).model
    sizes = [len(list(stage.parameters())) for stage in model.backbone.stages] + [2]
    assert [n for n, _, _ in built] == list(np.cumsum(sizes))
    assert [lr for _, lr, _ in built] == pytest.approx([0.3 / 1.5 ** m for m in range(4)])
    assert {m for _, _, m in built} == {0.9}
