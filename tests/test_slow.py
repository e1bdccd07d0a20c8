"""Long tests (`python -m pytest -m slow`): the README's main job, end to end."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_main_job_with_no_flags(tmp_path):
    out = subprocess.run([sys.executable, str(ROOT / "scripts" / "train_procgen.py"), "--no-progress"],
                         cwd=tmp_path, capture_output=True, text=True, timeout=1800)
    assert out.returncode == 0, out.stderr[-2000:]
    runs = list((tmp_path / "runs").iterdir())
    assert len(runs) == 1 and "TensorBoard logs" in out.stdout
    metrics = json.loads((runs[0] / "metrics.json").read_text())
    assert metrics["env_steps"] == 102_400 and metrics["mixreg"] is True and metrics["test"]["episodes"] == 32
    floor = metrics["test_random_policy"]
    assert floor["episodes"] == 32 and "uniform random policy on the same episodes" in out.stdout
    assert (runs[0] / "learning_curve.png").stat().st_size > 10_000
