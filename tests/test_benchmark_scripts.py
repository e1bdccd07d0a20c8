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


def test_digits_benchmark_partial_and_open_settings_report_each_runs_scores(tmp_path, load_script):
    bench = load_script("run_digits_benchmark")
    bench.main(["--seeds", "0", "--methods", "shot", "--settings", "partial", "open", "--backbone", "lenet",
                "--source-epochs", "1", "--epochs", "1", "--pairs", "uci:photo", "--out", str(tmp_path)])
    lines = (tmp_path / "results.jsonl").read_text().splitlines()
    rows = {(r["setting"], r["method"]): r for r in map(json.loads, lines)}
    assert sorted(rows) == [("open", "shot"), ("open", "source-only"), ("partial", "shot"), ("partial", "source-only")]
    partial = json.loads((tmp_path / "uci-to-photo-partial-s0" / "metrics.json").read_text())
    assert rows["partial", "shot"]["test_accuracy"] == partial["test_accuracy"]
    assert rows["partial", "source-only"]["test_accuracy"] == partial["source_only_test_accuracy"]
    assert partial["config"]["target_classes"] == [0, 1, 2, 3, 4]
    known = json.loads((tmp_path / "known-source-uci-s0" / "metrics.json").read_text())
    assert known["num_classes"] == 5   # the open-set source saw the known classes only
    open_set = json.loads((tmp_path / "uci-to-photo-open-s0" / "metrics.json").read_text())["open_set"]
    assert rows["open", "shot"]["open_set_test"] == open_set["adapted_test"]
    assert rows["open", "source-only"]["open_set_test"] == open_set["source_only_test"]
    table = (tmp_path / "table.md").read_text()
    assert "## Partial set" in table and "## Open set" in table and "## Closed set" not in table
    open_row = next(line for line in table.split("Open-set scores")[1].splitlines() if line.startswith("| uci → photo"))
    assert f"{open_set['adapted_test']['h_score']:.1f}" in open_row.split("|")[-2]   # the last column, SHOT's H
