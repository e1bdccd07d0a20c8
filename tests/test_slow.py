"""Long tests (`python -m pytest -m slow`): the README's main job (`workbench quickstart`) and the Procgen
half's quick job, end to end with no flags."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_quickstart_with_no_flags(tmp_path):
    """The README's first command: about 4 minutes on 2 cores; SHOT must beat the source model on uci:test."""
    out = subprocess.run([sys.executable, "-m", "workbench.cli", "quickstart", "--no-progress"], cwd=tmp_path,
                         capture_output=True, text=True, timeout=1800)
    assert out.returncode == 0, out.stderr[-2000:]
    runs = list((tmp_path / "runs").iterdir())
    assert len(runs) == 1 and runs[0].name.startswith("quickstart-fonts-to-uci-")
    summary = json.loads((runs[0] / "quickstart.json").read_text())
    assert summary["source_selection"]["data"] == "builtin:digits/fonts:val"
    assert summary["adapted_test_accuracy"] > summary["source_only_test_accuracy"] + 5, summary
    assert "after shot" in out.stdout and (runs[0] / "adaptation_curve.png").stat().st_size > 10_000


@pytest.mark.slow
def test_procgen_quick_job_with_no_flags(tmp_path):
    out = subprocess.run([sys.executable, str(ROOT / "scripts" / "train_procgen.py"), "--no-progress"],
                         cwd=tmp_path, capture_output=True, text=True, timeout=1800)
    assert out.returncode == 0, out.stderr[-2000:]
    runs = list((tmp_path / "runs").iterdir())
    assert len(runs) == 1 and "TensorBoard logs" in out.stdout
    metrics = json.loads((runs[0] / "metrics.json").read_text())
    assert metrics["env_steps"] == 102_400 and metrics["mixreg"] is True and metrics["test"]["episodes"] == 100
    floor = metrics["test_random_policy"]
    assert floor["episodes"] == 100 and "uniform random policy on the same episodes" in out.stdout
    assert (runs[0] / "learning_curve.png").stat().st_size > 10_000
