"""Atomic checkpoints with a declared kind, validated on load; checkpoints are data, never code.

A checkpoint is a dict saved by torch.save holding at least `format`,
`kind` (e.g. "procgen-agent", "source-model") and whatever the family stores
(config, model and optimiser state, counters, RNG states ...). Saving writes
a temporary file in the same directory and renames it over the target, so an
interruption or a failed write (a full disk) never leaves a half-written
checkpoint behind, and the previous checkpoint stays loadable.

Loading uses `torch.load(weights_only=True)`, which builds only tensors and
plain Python values and refuses any other pickled global, so a shared file
cannot run code. A payload may therefore hold tensors, numbers, strings,
bytes, None, torch dtypes/devices/sizes and dicts, lists, tuples and sets of
them. numpy arrays and scalars (RNG states, running statistics, replay
buffers) are stored as tensors under a small marker and come back as numpy
values of the same dtype and shape. Anything else is refused when saving.

Files of the previous format (v1) pickled numpy objects directly; they load
through an allow-list of exactly the numpy globals that rebuild plain
numeric arrays and scalars.
"""

from __future__ import annotations

import copy
import os
from collections import OrderedDict
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .files import atomic_write

FORMAT = "workbench-checkpoint-v2"
FORMAT_V1 = "workbench-checkpoint-v1"
LATEST = "checkpoint.pt"
# The file names a run directory may hold its checkpoint under: training runs, adapted models, source models.
RUN_CHECKPOINTS = (LATEST, "adapted.pt", "source.pt")

# A numpy value in a saved payload: {NUMPY_TAG: dtype string, "shape": ..., "scalar": ..., "data": tensor}.
NUMPY_TAG = "__workbench_numpy__"
# numpy dtypes torch holds as tensors of their own dtype; any other plain dtype travels as raw bytes (uint8).
TORCH_NATIVE_DTYPES = frozenset(np.dtype(t) for t in (
    np.bool_, np.uint8, np.int8, np.int16, np.int32, np.int64,
    np.float16, np.float32, np.float64, np.complex64, np.complex128))
# Values stored as they are; weights_only loading rebuilds each of these without running code.
PLAIN_TYPES = (type(None), bool, int, float, complex, str, bytes, torch.dtype, torch.device)
TENSOR_TYPES = (torch.Tensor, torch.nn.Parameter)

# v1 files pickled numpy objects; these globals rebuild numeric/bool arrays and scalars and nothing else.
_RECONSTRUCT, _SCALAR = np.zeros(1).__reduce__()[0], np.float64(0).__reduce__()[0]  # numpy.core.multiarray.*
_NUMPY_DTYPE_CLASSES = {type(np.dtype(c)) for c in np.typecodes["AllInteger"] + np.typecodes["AllFloat"] + "?"}
V1_NUMPY_GLOBALS = [
    *((function, f"{package}.multiarray.{function.__name__}") for function in (_RECONSTRUCT, _SCALAR)
      for package in ("numpy.core", "numpy._core")),  # numpy 1 and numpy 2 spell the module differently
    np.ndarray, np.dtype, *_NUMPY_DTYPE_CLASSES,
]
V1_NUMPY_GLOBAL_NAMES = frozenset(entry[1] if isinstance(entry, tuple) else f"{entry.__module__}.{entry.__qualname__}"
                                  for entry in V1_NUMPY_GLOBALS)


class CheckpointError(RuntimeError):
    """A checkpoint that is missing, truncated, foreign, unsafe, or of the wrong kind."""


# ------------------------------------------------------------------ numpy <-> tensor
def _encode_numpy(value: np.ndarray | np.generic) -> dict:
    array = np.asarray(value)
    flat = np.ascontiguousarray(array).reshape(-1)
    if not flat.flags.writeable:  # torch.from_numpy warns on read-only memory; saving never writes to it
        flat = flat.copy()
    data = flat if flat.dtype in TORCH_NATIVE_DTYPES else flat.view(np.uint8)
    return {NUMPY_TAG: array.dtype.str, "shape": tuple(array.shape), "scalar": isinstance(value, np.generic),
            "data": torch.from_numpy(data)}


def _decode_numpy(stored: dict) -> np.ndarray | np.generic:
    array = stored["data"].cpu().numpy().view(np.dtype(stored[NUMPY_TAG])).reshape(stored["shape"])
    return array[()] if stored["scalar"] else array


def _encode(value: Any, where: str) -> Any:
    """Return `value` with numpy values replaced by tagged tensors; containers are copied only where they change."""
    if isinstance(value, (np.ndarray, np.generic)):  # before the plain types: np.float64 is a float subclass
        subclass = isinstance(value, np.ndarray) and type(value) is not np.ndarray  # np.matrix, masked arrays
        if subclass or value.dtype.hasobject or value.dtype.kind == "V":
            raise CheckpointError(f"cannot save {where}: a {type(value).__name__} of dtype {value.dtype} is not "
                                  f"plain data; store a numeric, bool or string numpy array instead")
        return _encode_numpy(value)
    if type(value) in PLAIN_TYPES or type(value) in TENSOR_TYPES or type(value) is torch.Size:
        return value
    if type(value) in (dict, OrderedDict):
        changed = {}
        for key, item in value.items():
            if type(key) not in PLAIN_TYPES:
                raise CheckpointError(f"cannot save {where}: key {key!r} is a {type(key).__name__}; "
                                      f"use str or int keys")
            encoded = _encode(item, f"{where}[{key!r}]")
            if encoded is not item:
                changed[key] = encoded
        if not changed:
            return value
        out = copy.copy(value)  # keeps an OrderedDict's _metadata (module state dicts)
        out.update(changed)
        return out
    if type(value) in (list, tuple, set):
        items = [_encode(item, f"{where}[{i}]") for i, item in enumerate(value)]
        return value if all(a is b for a, b in zip(items, value)) else type(value)(items)
    raise CheckpointError(f"cannot save {where}: a {type(value).__module__}.{type(value).__qualname__} is not "
                          f"plain data; store tensors, numpy arrays, numbers, strings or dicts/lists of them")


def _decode(value: Any) -> Any:
    """Inverse of _encode on a freshly loaded payload (dicts and lists are updated in place)."""
    if isinstance(value, dict):
        if NUMPY_TAG in value:
            return _decode_numpy(value)
        for key, item in value.items():
            value[key] = _decode(item)
    elif isinstance(value, list):
        value[:] = [_decode(item) for item in value]
    elif isinstance(value, (tuple, set)):
        return type(value)(_decode(item) for item in value)
    return value


# ------------------------------------------------------------------ save / load
def save_checkpoint(path: str | os.PathLike, kind: str, payload: dict[str, Any]) -> Path:
    """Write atomically (workbench.files): a failed write raises WriteError and keeps the previous file."""
    data = _encode({"format": FORMAT, "kind": kind, **payload}, "checkpoint")
    return atomic_write(path, lambda f: torch.save(data, f))


def resolve_checkpoint_path(path: str | os.PathLike) -> Path:
    """Accept either a checkpoint file or a run directory holding one of RUN_CHECKPOINTS."""
    path = Path(path)
    if path.is_dir():
        path = next((path / name for name in RUN_CHECKPOINTS if (path / name).exists()), path / LATEST)
    if not path.exists():
        raise CheckpointError(f"no checkpoint at {path}: pass a run directory or a .pt file written by the workbench")
    return path


def _unreadable(path: Path, exc: Exception) -> CheckpointError:
    return CheckpointError(f"cannot read checkpoint {path} ({type(exc).__name__}): the file is truncated "
                           f"or not a torch checkpoint; re-save it or pick another file")


def _load_data_only(path: Path, map_location) -> dict:
    """torch.load that never runs code from the file; v1 files get the numpy allow-list, nothing more."""
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:  # a global outside the allow-list, a truncated zip, pickle garbage, a text file ...
        first_error = exc
    try:
        unsafe = torch.serialization.get_unsafe_globals_in_checkpoint(path)
    except Exception:
        raise _unreadable(path, first_error) from None
    foreign = sorted(set(unsafe) - V1_NUMPY_GLOBAL_NAMES)
    if foreign:
        raise CheckpointError(f"refusing to load {path}: its pickle asks to run {', '.join(foreign)}; a checkpoint "
                              f"must hold only tensors, numbers, strings and numpy arrays: use one the workbench wrote")
    if not unsafe:
        raise _unreadable(path, first_error)
    try:
        with torch.serialization.safe_globals(V1_NUMPY_GLOBALS):
            data = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:  # an object-dtype array (not plain numeric data), a truncated file ...
        raise CheckpointError(f"cannot read {FORMAT_V1} checkpoint {path} ({type(exc).__name__}): it is truncated or "
                              f"holds numpy data other than numeric arrays; pick another file") from None
    if not isinstance(data, dict) or data.get("format") != FORMAT_V1:
        raise CheckpointError(f"refusing to load {path}: numpy objects are pickled only in '{FORMAT_V1}' "
                              f"checkpoints; pass a checkpoint written by the workbench")
    return data


def load_checkpoint(path: str | os.PathLike, kind: str | tuple[str, ...] | None = None,
                    map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load and validate a checkpoint; `kind` restricts which families are accepted."""
    path = resolve_checkpoint_path(path)
    data = _load_data_only(path, map_location)
    if not isinstance(data, dict) or data.get("format") not in (FORMAT, FORMAT_V1):
        raise CheckpointError(f"{path} is not a workbench checkpoint (no '{FORMAT}' tag): "
                              f"pass a checkpoint written by the workbench")
    kinds = (kind,) if isinstance(kind, str) else kind
    if kinds is not None and data.get("kind") not in kinds:
        raise CheckpointError(f"{path} holds a '{data.get('kind')}' checkpoint, expected "
                              f"{' or '.join(repr(k) for k in kinds)}: pass a checkpoint of that kind")
    return _decode(data)
