"""The sweep of visual shifts (issue 36's testbed): every variant evaluated on validation levels, the cost
formula, the choice rule, and the chosen pairs' test figures beside them."""

import json

import pytest

from test_procgen_adapt import tiny_source


@pytest.fixture(scope="module")
def source_run(tmp_path_factory):
    return tiny_source(tmp_path_factory.mktemp("sweep-source"))


def test_sweep_evaluates_every_variant_on_validation_levels_and_resumes(source_run, tmp_path, load_script):
    sweep = load_script("run_procgen_shift_sweep")
    argv = ["--games", "bigfish", "--source-run", f"bigfish={source_run}", "--episodes", "2", "--val-levels", "5",
            "--device", "cpu", "--total-steps", "128", "--out", str(tmp_path)]
    rows = sweep.main(argv)
    val = [r for r in rows if r["split"] == "val"]
    assert [r["shift"] for r in val] == ["no-backgrounds", "restrict-themes", "monochrome",
                                        "no-backgrounds+restrict-themes", "no-backgrounds+monochrome",
                                        "restrict-themes+monochrome", "no-backgrounds+restrict-themes+monochrome"]
    evaluations = tmp_path / "evaluations"
    own = json.loads((evaluations / "bigfish-agent-own-val.json").read_text())
    assert (own["num_levels"], own["start_level"]) == (5, 10_000)           # validation levels, not test's
    floor = json.loads((evaluations / "bigfish-random-val.json").read_text())
    for row in val:
        shifted = json.loads((evaluations / f"bigfish-agent-{row['shift']}-val.json").read_text())
        margin = own["mean_return"] - floor["mean_return"]
        assert row["shifted"] == shifted["mean_return"] and row["margin"] == pytest.approx(margin)
        expected = (own["mean_return"] - shifted["mean_return"]) / margin if margin > 0 else None
        assert row["cost"] == (pytest.approx(expected) if expected is not None else None)
        assert row["chosen"] == sweep.hurts(row)
    tests = [r for r in rows if r["split"] == "test"]
    assert sorted(r["shift"] for r in tests) == sorted(r["shift"] for r in val if r["chosen"])
    assert "| bigfish | default | monochrome |" in (tmp_path / "table.md").read_text()
    stamp = (evaluations / "bigfish-agent-own-val.json").stat().st_mtime_ns
    assert sweep.main(argv) == rows and (evaluations / "bigfish-agent-own-val.json").stat().st_mtime_ns == stamp


def test_a_shift_enters_the_testbed_when_it_costs_a_third_of_a_clear_margin(load_script):
    sweep = load_script("run_procgen_shift_sweep")
    own, floor = {"mean_return": 6.0, "stderr_return": 0.3}, {"mean_return": 2.0, "stderr_return": 0.2}
    row = sweep.shift_row("g", ["monochrome"], own, {"mean_return": 4.6, "stderr_return": 0.3}, floor, "val")
    assert row["cost"] == pytest.approx(1.4 / 4) and sweep.hurts(row)              # 35% of a 4-point margin
    row = sweep.shift_row("g", ["monochrome"], own, {"mean_return": 4.8, "stderr_return": 0.3}, floor, "val")
    assert row["cost"] == pytest.approx(0.3) and not sweep.hurts(row)              # 30%: not enough
    weak = sweep.shift_row("g", ["monochrome"], {"mean_return": 2.5, "stderr_return": 0.3},
                           {"mean_return": 1.0, "stderr_return": 0.3}, floor, "val")
    assert weak["margin_in_se"] == pytest.approx(0.5 / (0.3 ** 2 + 0.2 ** 2) ** 0.5) and not sweep.hurts(weak)


def test_a_source_trained_in_restricted_visuals_meets_every_other_domain(source_run, tmp_path, load_script):
    """A source trained without backgrounds in monochrome is shifted to the seven other domains, the
    renderer's default among them (played in the default visuals); its evaluations are cached apart from the
    default source's, and both sweeps share sweep.jsonl, a pair swept again replacing its rows."""
    sweep = load_script("run_procgen_shift_sweep")
    plain = tiny_source(tmp_path / "plain", visual=["no-backgrounds", "monochrome"])
    common = ["--games", "bigfish", "--episodes", "2", "--val-levels", "5", "--device", "cpu", "--total-steps", "128",
              "--out", str(tmp_path)]
    default_rows = sweep.main([*common, "--source-run", f"bigfish={source_run}"])
    argv = [*common, "--source-run", f"bigfish={plain}", "--source-visual", "monochrome", "no-backgrounds"]
    rows = sweep.main(argv)
    val = [r for r in rows if r["split"] == "val"]
    assert [r["shift"] for r in val] == ["default", "no-backgrounds", "restrict-themes", "monochrome",
                                        "no-backgrounds+restrict-themes", "restrict-themes+monochrome",
                                        "no-backgrounds+restrict-themes+monochrome"]
    assert {r["source_visual"] for r in val} == {"no-backgrounds+monochrome"}
    evaluations = tmp_path / "evaluations"
    own = json.loads((evaluations / "bigfish-from-no-backgrounds+monochrome-agent-own-val.json").read_text())
    default = json.loads((evaluations / "bigfish-from-no-backgrounds+monochrome-agent-default-val.json").read_text())
    assert own["visual"] == ["no-backgrounds", "monochrome"] and default["visual"] == []
    assert own["checkpoint"].startswith(str(plain))
    assert val[0]["own"] == own["mean_return"] and val[0]["shifted"] == default["mean_return"]
    shared = [json.loads(line) for line in (tmp_path / "sweep.jsonl").read_text().splitlines()]
    assert shared == default_rows + rows
    assert sweep.main(argv) == rows
    assert [json.loads(line) for line in (tmp_path / "sweep.jsonl").read_text().splitlines()] == shared
    assert "| bigfish | no-backgrounds+monochrome | default |" in (tmp_path / "table.md").read_text()
    # a run in other visuals than --source-visual says so in one line
    with pytest.raises(SystemExit, match="trained in the restrict-themes visuals"):
        sweep.main([*common, "--source-run", f"bigfish={plain}", "--source-visual", "restrict-themes"])
    with pytest.raises(SystemExit, match="has not finished 256 steps"):   # a run still training is not swept
        sweep.main([*common, "--source-run", f"bigfish={plain}", "--source-visual", "monochrome", "no-backgrounds",
                    "--total-steps", "256"])
