"""The digits benchmark driver: pair selection, and results of separate calls kept together."""

from __future__ import annotations

import json

import pytest


def test_digits_benchmark_runs_chosen_pairs_and_keeps_earlier_rows(tmp_path, load_script):
    bench = load_script("run_digits_benchmark")
    common = ["--seeds", "0", "--methods", "shot-im", "--backbone", "lenet", "--source-epochs", "1", "--epochs", "1",
              "--out", str(tmp_path)]
    bench.main(common + ["--pairs", "photo:uci"])
    bench.main(common + ["--pairs", "uci:photo"])
    rows = [json.loads(line) for line in (tmp_path / "results.jsonl").read_text().splitlines()]
    assert sorted((r["source"], r["target"], r["method"]) for r in rows) == [
        ("photo", "uci", "shot-im"), ("photo", "uci", "source-only"),
        ("uci", "photo", "shot-im"), ("uci", "photo", "source-only")]
    adapted = json.loads((tmp_path / "uci-to-photo-shot-im-s0" / "metrics.json").read_text())
    row = next(r for r in rows if (r["source"], r["method"]) == ("uci", "shot-im"))
    assert row["test_accuracy"] == adapted["test_accuracy"]
    table = (tmp_path / "table.md").read_text()
    assert "photo → uci" in table and "uci → photo" in table and "fonts" not in table
    with pytest.raises(SystemExit):
        bench.main(common + ["--pairs", "uci:uci"])


def test_neighbourhood_benchmark_prints_epoch_ratios(tmp_path, load_script, monkeypatch, capsys):
    from adaptation.classification.source import SourceConfig, train_source

    monkeypatch.setenv("WORKBENCH_DATA", str(tmp_path / "wbdata"))
    train_source(SourceConfig(data="builtin:digits/uci", backbone="lenet", epochs=1, run_dir=str(tmp_path / "src"),
                              progress=False))
    load_script("bench_neighbourhood").main(["--source", str(tmp_path / "src"), "--target", "builtin:digits/photo",
                                             "--epochs", "1", "--repeats", "1"])
    lines = capsys.readouterr().out.splitlines()
    ratios = dict(line.split("=") for line in lines if "_ratio_vs_shot=" in line)
    assert set(ratios) == {"nrc_epoch_ratio_vs_shot", "aad_epoch_ratio_vs_shot"}
    assert all(float(v) > 0 for v in ratios.values())
    assert [line.split(":")[0] for line in lines if " s per epoch on " in line] == ["shot", "nrc", "aad"]
