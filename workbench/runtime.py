"""Device, precision, compilation and seeding: one place that decides how tensors run.

Every family calls these helpers instead of choosing devices or autocast
settings on its own, so that the same code runs on CUDA and on the CPU.
"""

from __future__ import annotations

import contextlib
import os
import random
import time
from dataclasses import dataclass, field, replace

import numpy as np
import torch

from .distributed import SINGLE, Distributed, device_for

DEVICE_CHOICES = ("auto", "cpu", "cuda")
PRECISION_CHOICES = ("auto", "fp32", "bf16")
PRECISION_HELP = "fp32 (default) or bf16 autocast (auto: bf16 where the CPU or GPU computes it natively)"


def select_device(name: str = "auto") -> torch.device:
    """`auto` picks CUDA when present, else the CPU; `cuda` without a GPU is an error."""
    if name not in DEVICE_CHOICES and not name.startswith("cuda:"):
        raise ValueError(f"unknown device {name!r}: use one of {', '.join(DEVICE_CHOICES)} (or cuda:N)")
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise RuntimeError(f"device {name!r} asked for but no CUDA GPU is visible: use --device cpu or auto")
    return torch.device(name)


def cpu_supports_bf16() -> bool:
    """True when the CPU has native bf16 arithmetic (AVX-512 BF16 or AMX), where bf16 autocast pays off."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = f.read()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def resolve_precision(precision: str, device: torch.device) -> torch.dtype | None:
    """Map a precision name to the autocast dtype (None means plain fp32).

    `auto` uses bf16 where the hardware computes it natively (CUDA with bf16
    support, CPUs with AVX-512 BF16 / AMX) and fp32 elsewhere.
    """
    if precision not in PRECISION_CHOICES:
        raise ValueError(f"unknown precision {precision!r}: use one of {', '.join(PRECISION_CHOICES)}")
    if precision == "fp32":
        return None
    if precision == "bf16":
        return torch.bfloat16
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else None
    return torch.bfloat16 if cpu_supports_bf16() else None


@dataclass(kw_only=True)
class RunSettings:
    """Where and how a run runs, shared by every run config (source training, each adapter): its seed, the
    device, data-loading processes, its directory (empty: a new time-stamped one) and the progress bar.
    Keyword-only, so that a config's own fields keep their order."""
    seed: int = 0
    device: str = "auto"
    workers: int = 0
    run_dir: str = ""
    progress: bool = True


@dataclass
class Runtime:
    """How a job runs: device, autocast dtype, memory format, compilation, and its place among the
    processes of a torchrun job (`dist`; a world of one by default)."""

    device: torch.device
    amp_dtype: torch.dtype | None = None
    channels_last: bool = True
    compile: bool = False
    dist: Distributed = field(default=SINGLE)

    @classmethod
    def create(cls, device: str = "auto", precision: str = "auto", compile: bool = False,
               channels_last: bool = True, distributed: Distributed = SINGLE) -> "Runtime":
        dev = select_device(device_for(distributed, device))
        if dev.type == "cuda":
            torch.backends.cudnn.benchmark = True
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True
        return cls(device=dev, amp_dtype=resolve_precision(precision, dev),
                   channels_last=channels_last, compile=compile, dist=distributed)

    @property
    def precision_name(self) -> str:
        return "bf16" if self.amp_dtype == torch.bfloat16 else "fp32"

    def autocast(self):
        """Autocast context for forward passes (a no-op in fp32)."""
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.amp_dtype)

    def scoring(self) -> "Runtime":
        """This runtime without autocast: reported scores are computed in fp32 whatever the training
        precision, so that `workbench evaluate` reproduces them on any hardware."""
        return replace(self, amp_dtype=None)

    def prepare_module(self, module: torch.nn.Module) -> torch.nn.Module:
        """Move a module to the device and memory format the runtime uses."""
        module = module.to(self.device)
        if self.channels_last:
            module = module.to(memory_format=torch.channels_last)
        return module

    def images(self, batch: torch.Tensor) -> torch.Tensor:
        """Move an (N, C, H, W) image batch to the device in the memory format the runtime uses."""
        batch = batch.to(self.device, non_blocking=True)
        return batch.contiguous(memory_format=torch.channels_last) if self.channels_last else batch

    def maybe_compile(self, module: torch.nn.Module) -> torch.nn.Module:
        return torch.compile(module) if self.compile else module


def seconds_per_call(fn, repeats: int, device: torch.device) -> float:
    """Mean wall time of fn() after one warm-up call, synchronising the GPU around the timing."""
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - start) / repeats


def available_memory_bytes() -> int:
    """Memory the OS can still hand out (MemAvailable), for checking big allocations up front."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    os.environ.setdefault("PYTHONHASHSEED", str(seed))


def rng_state() -> dict:
    """Snapshot of every random generator a run uses, for checkpoints."""
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
