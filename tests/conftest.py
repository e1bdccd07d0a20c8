import importlib.util
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture
def load_script():
    """A function that imports scripts/<name>.py as a module."""
    def load(name: str):
        spec = importlib.util.spec_from_file_location(name, ROOT / "scripts" / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module
    return load


class Interrupted(Exception):
    """What `interrupt_adaptation` raises in place of a kill."""


@pytest.fixture
def interrupt_adaptation(monkeypatch):
    """A function making every Procgen adaptation stop as if killed once `epochs` epochs are finished and saved
    (within a `with` block: the adaptations after it run whole)."""
    from contextlib import contextmanager

    from agents.adapt import ProcgenAdapter

    save = ProcgenAdapter.epoch_finished

    def save_then_stop(epochs):
        def epoch_finished(self, history, optimizer, **extra):
            save(self, history, optimizer, **extra)
            if len(history) == epochs:
                raise Interrupted
        return epoch_finished

    @contextmanager
    def after(after: int):
        with monkeypatch.context() as patch:
            patch.setattr(ProcgenAdapter, "epoch_finished", save_then_stop(after))
            with pytest.raises(Interrupted):
                yield
    return after
