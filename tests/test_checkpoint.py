"""Checkpoints are data: numpy values and RNG states round-trip, pickled code never runs, v1 files still load."""

import os
import random
from pathlib import Path

import numpy as np
import pytest
import torch

from workbench.checkpoint import FORMAT, FORMAT_V1, CheckpointError, load_checkpoint, save_checkpoint
from workbench.runtime import rng_state, set_rng_state

ARRAYS = {
    "uint8 image": np.arange(24, dtype=np.uint8).reshape(2, 3, 4),
    "int64 actions": np.array([[3, -1], [0, 7]], np.int64),
    "float32 rewards": np.array([0.5, -2.25], np.float32),
    "float64 tree (strided)": np.linspace(0, 1, 10)[::3],
    "bool dones": np.array([True, False, True]),
    "uint32 (no torch dtype)": np.array([1, 2**32 - 1], np.uint32),
    "big-endian float64": np.array([1.5, 2.5], ">f8"),
    "0-d float64": np.array(4.0),
    "empty": np.zeros((0, 3), np.float32),
}
SCALARS = {"float64": np.float64(1e-4), "int64": np.int64(-5), "bool": np.bool_(True)}


class RunsACommand:
    """What a hostile checkpoint holds: unpickling it calls os.system."""

    def __init__(self, command):
        self.command = command

    def __reduce__(self):
        return os.system, (self.command,)


def assert_same(a, b, where="payload"):
    assert type(a) is type(b), f"{where}: {type(a)} != {type(b)}"
    if isinstance(a, (np.ndarray, np.generic)):
        assert a.dtype == b.dtype and a.shape == b.shape and np.array_equal(a, b), where
    elif isinstance(a, torch.Tensor):
        assert a.dtype == b.dtype and torch.equal(a, b), where
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for key in a:
            assert_same(a[key], b[key], f"{where}[{key!r}]")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same(x, y, f"{where}[{i}]")
    else:
        assert a == b, where


def test_numpy_values_and_rng_states_round_trip_and_load_with_weights_only(tmp_path):
    snapshot = rng_state()
    draws = (random.random(), np.random.rand(3), torch.rand(3))
    payload = {"arrays": ARRAYS, "scalars": SCALARS, "counters": (3, np.int64(4)), "rng": snapshot,
               "python_rng": random.getstate(), "numpy_rng": np.random.get_state(),
               "generator": np.random.default_rng(7).bit_generator.state, "torch_rng": torch.get_rng_state(),
               "model": torch.nn.Linear(3, 2).state_dict()}
    path = save_checkpoint(tmp_path / "c.pt", "procgen-agent", payload)
    raw = torch.load(path, weights_only=True)  # plain torch, no allow-list: the file is data only
    assert raw["format"] == FORMAT
    loaded = load_checkpoint(path, kind="procgen-agent")
    assert_same({k: v for k, v in loaded.items() if k not in ("format", "kind")}, payload)
    assert loaded["model"]._metadata == payload["model"]._metadata  # what module state dicts carry besides tensors
    generator = np.random.default_rng()
    generator.bit_generator.state = loaded["generator"]
    assert generator.random() == np.random.default_rng(7).random()
    # a loaded rng_state() restores every generator: the same draws as right after the snapshot
    set_rng_state(loaded["rng"])
    again = (random.random(), np.random.rand(3), torch.rand(3))
    assert draws[0] == again[0] and np.array_equal(draws[1], again[1]) and torch.equal(draws[2], again[2])


@pytest.mark.parametrize("format_tag,extra", [(FORMAT, {}), (FORMAT_V1, {"stats": np.zeros(3)})])
def test_a_checkpoint_whose_pickle_runs_a_command_is_refused_without_running_it(tmp_path, format_tag, extra):
    marker = tmp_path / "pwned"
    path = tmp_path / "shared.pt"
    torch.save({"format": format_tag, "kind": "procgen-agent", **extra,
                "agent_state": RunsACommand(f"touch {marker}")}, path)
    with pytest.raises(CheckpointError, match=f"refusing to load .*{os.system.__module__}.system") as err:
        load_checkpoint(path, kind="procgen-agent")
    assert not marker.exists()
    assert "\n" not in str(err.value)


def test_save_refuses_values_that_would_not_load_as_data(tmp_path):
    for value, named in [(Path("runs/x"), "pathlib"), (np.array([{"a": 1}], dtype=object), "dtype object")]:
        with pytest.raises(CheckpointError, match=f"cannot save checkpoint\\['config'\\]\\['where'\\].*{named}"):
            save_checkpoint(tmp_path / "c.pt", "procgen-agent", {"config": {"where": value}})
        assert not (tmp_path / "c.pt").exists()


def test_v1_checkpoint_loads_and_resaves_as_data_only(tmp_path):
    # What the v1 format pickled directly: RNG states, PPO's running statistics, a Rainbow replay and generator.
    old = {"format": FORMAT_V1, "kind": "procgen-agent", "rng": rng_state(),
           "agent_state": {"reward_normalizer": {"returns": np.zeros(4), "mean": np.float64(0.5),
                                                 "var": np.float64(2.0), "count": 513.0},
                           "replay": {"obs": np.ones((2, 4, 3, 8, 8), np.uint8), "dones": np.zeros((2, 4), bool),
                                      "tree": np.arange(8.0), "t": np.int64(1)},
                           "rng": np.random.default_rng(3).bit_generator.state}}
    torch.save(old, tmp_path / "v1.pt")
    loaded = load_checkpoint(tmp_path / "v1.pt", kind="procgen-agent")
    assert_same(loaded, old)
    set_rng_state(loaded["rng"])
    payload = {k: v for k, v in loaded.items() if k not in ("format", "kind")}
    save_checkpoint(tmp_path / "v2.pt", "procgen-agent", payload)
    assert torch.load(tmp_path / "v2.pt", weights_only=True)["format"] == FORMAT
    assert_same({**load_checkpoint(tmp_path / "v2.pt"), "format": FORMAT_V1}, old)


def test_v1_checkpoint_with_object_arrays_is_refused(tmp_path):
    torch.save({"format": FORMAT_V1, "kind": "procgen-agent", "x": np.array([{"a": 1}], dtype=object)},
               tmp_path / "v1.pt")
    with pytest.raises(CheckpointError, match="numpy data other than numeric arrays"):
        load_checkpoint(tmp_path / "v1.pt")
