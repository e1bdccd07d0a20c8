"""scripts/bench_ppo.py --world-size: same total threads on both sides, warm-up excluded, one speedup line."""

import re
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

SCRIPTS = Path(__file__).resolve().parents[1] / "scripts"
TINY = ["--env", "bigfish", "--num-envs", "2", "--num-steps", "16", "--num-minibatches", "1", "--num-epochs", "1",
        "--iterations", "1", "--warmup-iterations", "1", "--world-size", "2", "--skip-network"]
RESULT = re.compile(r"^(\d+) process(?:es)? x (\d+) threads?: (\d+) env steps in [\d.]+ s = ([\d.]+) steps/s$")


@pytest.fixture
def bench(load_script, monkeypatch):
    """The script as a module that spawned processes can import by name (they unpickle its rank function)."""
    module = load_script("bench_ppo")
    monkeypatch.syspath_prepend(str(SCRIPTS))
    monkeypatch.setitem(sys.modules, "bench_ppo", module)
    return module


def test_world_size_comparison_shares_threads_excludes_warmup_and_ends_with_the_speedup(bench, capsys):
    bench.main([*TINY, "--threads", "2"])
    lines = capsys.readouterr().out.strip().splitlines()
    results = {int(m[1]): m for m in map(RESULT.match, lines) if m}
    assert sorted(results) == [1, 2]
    assert int(results[1][2]) == 2 and int(results[2][2]) == 1  # 2 threads x 1 process, 1 thread x 2 processes
    timed_steps = 1 * 2 * 16  # --iterations x --num-envs x --num-steps: the warm-up iteration is not counted
    assert int(results[1][3]) == timed_steps and int(results[2][3]) == timed_steps
    last = re.fullmatch(r"ppo_world_size_speedup=(\d+\.\d+)", lines[-1])
    assert last, lines[-1]
    one, many = float(results[1][4]), float(results[2][4])
    # The steps/s figures are printed to 0.05 and the speedup, computed before rounding, to 0.005.
    rounding = many / one * (0.05 / one + 0.05 / many) + 0.005
    assert float(last[1]) == pytest.approx(many / one, abs=rounding * 1.01)


class CountingAgent:
    """Stands in for PPO: each iteration adds one rollout's env steps over `world_size` workers."""

    def __init__(self, steps_per_iteration: int):
        self.steps_per_iteration, self.env_steps, self.iterations = steps_per_iteration, 0, 0
        self.rt = SimpleNamespace(device=SimpleNamespace(type="cpu"))

    def train_iteration(self):
        self.env_steps += self.steps_per_iteration
        self.iterations += 1


def test_time_iterations_counts_only_the_timed_iterations(bench):
    agent = CountingAgent(steps_per_iteration=64)
    steps, seconds = bench.time_iterations(agent, warmup=2, iterations=3)
    assert agent.iterations == 5
    assert steps == 3 * 64 and seconds > 0


def test_fewer_threads_than_processes_is_refused_in_one_line(bench, capsys):
    with pytest.raises(SystemExit) as exc:
        bench.main([*TINY, "--threads", "1"])
    message = str(exc.value)
    assert "\n" not in message and message.startswith("error:") and "--threads 1" in message
    assert "steps/s" not in capsys.readouterr().out  # refused before either side ran
