"""`workbench quickstart`, the README's main job: a digits source trained and adapted with SHOT end to end.

Its printed and saved figures are checked against the two checkpoints scored independently
(`evaluate_model`), and a stopped quickstart continues without training its source again."""

import hashlib
import json
import shutil
from pathlib import Path

import matplotlib.image
import pytest

from adaptation.classification.evaluate import evaluate_model
from adaptation.classification.quickstart import CURVE, SUMMARY, quickstart_main
from workbench.cli import main as workbench_main
from workbench.logging import read_scalars

QUICK = ["--source-epochs", "1", "--epochs", "1", "--device", "cpu", "--no-progress"]


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    out = tmp_path_factory.mktemp("quickstart") / "qs"
    assert workbench_main(["quickstart", *QUICK, "--out", str(out)]) == 0
    return out


def test_quickstart_reports_what_its_checkpoints_score(finished, capsys):
    summary = json.loads((finished / SUMMARY).read_text())
    assert (summary["source"], summary["target"], summary["method"]) == ("builtin:digits/fonts",
                                                                         "builtin:digits/uci", "shot")
    assert summary["source_selection"]["data"] == "builtin:digits/fonts:val"  # never the target, never a test split
    assert summary["test_data"] == "builtin:digits/uci:test" and summary["chance_accuracy"] == 10.0
    source_only = evaluate_model(finished / "source" / "source.pt", "builtin:digits/uci:test", device="cpu")
    adapted = evaluate_model(finished / "shot" / "adapted.pt", "builtin:digits/uci:test", device="cpu")
    assert summary["source_only_test_accuracy"] == pytest.approx(source_only["accuracy"], abs=1e-6)
    assert summary["adapted_test_accuracy"] == pytest.approx(adapted["accuracy"], abs=1e-6)
    # the curve: target accuracy before adapting (epoch -1) and after its one epoch, from the run's events
    points = read_scalars(finished / "shot", ("target/accuracy",))["target/accuracy"]
    assert [step for step, _ in points] == [-1, 0]
    image = matplotlib.image.imread(finished / CURVE)
    assert image.shape[:2] == (420, 700) and image.std() > 0.05


def test_quickstart_prints_both_accuracies_beside_chance(tmp_path, capsys, finished):
    out = tmp_path / "again"
    shutil.copytree(finished, out)
    (out / SUMMARY).unlink()  # stopped after the source: the quickstart goes on from there
    source_before = digest(out / "source" / "source.pt")
    assert quickstart_main([*QUICK, "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    summary = json.loads((out / SUMMARY).read_text())
    assert "reusing the finished run" in printed and digest(out / "source" / "source.pt") == source_before
    rows = dict(line.strip().rsplit(None, 1) for line in printed.splitlines() if line.startswith("  "))
    assert rows == {"source model alone": f"{summary['source_only_test_accuracy']:.1f}%",
                    "after shot": f"{summary['adapted_test_accuracy']:.1f}%", "chance": "10.0%"}
    assert "scripts/train_procgen.py" in printed


def test_a_finished_quickstart_is_refused_unless_overwrite(finished, capsys):
    before = {p.name: digest(p) for p in (finished / SUMMARY, finished / CURVE)}
    assert quickstart_main([*QUICK, "--out", str(finished)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--overwrite" in err[0] and SUMMARY in err[0]
    assert {p.name: digest(p) for p in (finished / SUMMARY, finished / CURVE)} == before


def test_the_same_domain_twice_is_a_one_line_error(capsys):
    with pytest.raises(SystemExit) as stop:
        quickstart_main(["--source", "uci", "--target", "uci"])
    assert stop.value.code == 2
    assert "--source and --target are both 'uci'" in capsys.readouterr().err


def test_the_readme_main_command_is_the_quickstart():
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    commands = readme.split("```bash\n", 1)[1].split("```", 1)[0].strip().splitlines()
    assert commands[0] == "pip install -e . && workbench quickstart"
    first = readme.split("```", 2)[2].split("\n\n")[1]  # the paragraph right under the two top commands
    assert "fonts" in first and "uci" in first and "SHOT" in first and "chance" in first
