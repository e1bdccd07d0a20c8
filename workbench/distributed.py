"""torch.distributed for both families: one process per device, launched by `torchrun`.

    torchrun --nproc-per-node 2 scripts/train_procgen.py ...              (one machine, 2 workers)
    torchrun --nnodes 2 --node-rank R --nproc-per-node 4 \\
             --rdzv-backend c10d --rdzv-endpoint HOST:29500 scripts/train_procgen.py ...

torchrun sets RANK, LOCAL_RANK, WORLD_SIZE, MASTER_ADDR and MASTER_PORT for every process;
`init_distributed` reads them and joins the process group (NCCL on GPUs, gloo on CPUs). A plain
`python` run has no WORLD_SIZE and gets a world of one, where every helper below is a no-op or an
identity, so single-process code paths stay exactly as they were.

The helpers are the few collectives the learners need: gradients averaged over ranks (so N workers
take the step one worker would take on the union of their batches), the model broadcast from rank 0
at start, tensors and Python objects gathered from every rank, and a stop flag that any rank can
raise and every rank sees at the same moment.
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass
from typing import Any, Iterable

import torch
import torch.distributed as dist
from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

# Seeds of rank r are offset by r * RANK_SEED_STRIDE, so that rank 0 of a distributed run draws what a
# single-process run with the same --seed draws, and no two ranks share env levels or action noise.
RANK_SEED_STRIDE = 10_000_000


@dataclass(frozen=True)
class Distributed:
    """This process's place in the job; the default is a world of one (no process group)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        """Rank 0 alone writes files (TensorBoard, checkpoints, metrics) and runs evaluations."""
        return self.rank == 0

    def seed(self, seed: int) -> int:
        return seed + RANK_SEED_STRIDE * self.rank

    # ------------------------------------------------------------------ collectives
    def average_gradients(self, parameters: Iterable[torch.nn.Parameter]) -> None:
        """All-reduce the mean of every gradient, in one flat buffer (one collective per step)."""
        if not self.enabled:
            return
        grads = [p.grad for p in parameters if p.grad is not None]
        if not grads:
            return
        flat = _flatten_dense_tensors(grads)
        dist.all_reduce(flat)
        flat /= self.world_size
        for grad, reduced in zip(grads, _unflatten_dense_tensors(flat, grads)):
            grad.copy_(reduced)

    def broadcast_module(self, module: torch.nn.Module, src: int = 0) -> None:
        """Make every rank's parameters and buffers equal to rank `src`'s."""
        if not self.enabled:
            return
        with torch.no_grad():
            for tensor in module.state_dict().values():
                if tensor.is_floating_point() or tensor.dtype in (torch.int64, torch.int32, torch.uint8):
                    dist.broadcast(tensor, src)

    def sum(self, values: torch.Tensor) -> torch.Tensor:
        """Element-wise sum over ranks (a new tensor; the input is left as it was)."""
        if not self.enabled:
            return values
        values = values.clone()
        dist.all_reduce(values)
        return values

    def gather_cat(self, tensor: torch.Tensor) -> torch.Tensor:
        """Concatenate every rank's (N_r, ...) tensor along dim 0, in rank order; N_r may differ."""
        if not self.enabled:
            return tensor
        size = torch.tensor([tensor.shape[0]], device=tensor.device)
        sizes = [torch.zeros_like(size) for _ in range(self.world_size)]
        dist.all_gather(sizes, size)
        longest = int(max(s.item() for s in sizes))
        padded = torch.zeros((longest, *tensor.shape[1:]), dtype=tensor.dtype, device=tensor.device)
        padded[:tensor.shape[0]] = tensor
        parts = [torch.empty_like(padded) for _ in range(self.world_size)]
        dist.all_gather(parts, padded.contiguous())
        return torch.cat([part[:int(s.item())] for part, s in zip(parts, sizes)])

    def gather_objects(self, obj: Any) -> list:
        """Every rank's picklable `obj`, in rank order, on every rank."""
        if not self.enabled:
            return [obj]
        out = [None] * self.world_size
        dist.all_gather_object(out, obj)
        return out

    def gather_objects_to_main(self, obj: Any) -> list | None:
        """Every rank's `obj` on rank 0 (None elsewhere): for per-rank state that rank 0 saves."""
        if not self.enabled:
            return [obj]
        out = [None] * self.world_size if self.is_main else None
        dist.gather_object(obj, out, dst=0)
        return out

    def any(self, flag: bool) -> bool:
        """True on every rank when it is true on any rank (e.g. a stop signal that reached one)."""
        if not self.enabled:
            return flag
        device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else "cpu"
        value = torch.tensor([1.0 if flag else 0.0], device=device)
        dist.all_reduce(value, op=dist.ReduceOp.MAX)
        return bool(value.item() > 0)

    def barrier(self) -> None:
        if self.enabled:
            dist.barrier()


SINGLE = Distributed()


def launched_distributed() -> bool:
    """True in a process that torchrun (or an equivalent launcher) started as part of a larger world."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def init_distributed(device: str = "auto") -> Distributed:
    """Join the process group torchrun describes (once per process), or return a world of one.

    GPUs: NCCL, one GPU per process (LOCAL_RANK picks it). CPUs (or --device cpu): gloo."""
    if not launched_distributed():
        return SINGLE
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = device != "cpu" and torch.cuda.is_available()
    if not dist.is_initialized():
        if use_cuda:
            if local_rank >= torch.cuda.device_count():
                raise RuntimeError(f"LOCAL_RANK {local_rank} but only {torch.cuda.device_count()} GPU(s) here: "
                                   f"start at most {torch.cuda.device_count()} processes per node")
            torch.cuda.set_device(local_rank)
        dist.init_process_group("nccl" if use_cuda else "gloo")
    return Distributed(dist.get_rank(), dist.get_world_size(), local_rank)


def device_for(distributed: Distributed, device: str) -> str:
    """The device a rank runs on: its own GPU (cuda:LOCAL_RANK) when the job runs on GPUs."""
    if distributed.enabled and device in ("auto", "cuda") and torch.cuda.is_available():
        return f"cuda:{distributed.local_rank}"
    return device


def shutdown_distributed() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def free_port() -> int:
    """A TCP port nobody listens on now, for a local process group's rendezvous."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def spawn_local(worker, world_size: int, *args, threads_per_process: int | None = None) -> None:
    """Run worker(rank, *args) in `world_size` local processes that see the environment torchrun would
    give them (so `init_distributed` joins them into one group): for benchmarks and tests. A failing
    process raises here."""
    import torch.multiprocessing as mp

    mp.spawn(_as_torchrun_process, args=(world_size, free_port(), threads_per_process, worker, args),
             nprocs=world_size, join=True)


def _as_torchrun_process(rank, world_size, port, threads, worker, args):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE=str(world_size))
    if threads:
        os.environ["OMP_NUM_THREADS"] = str(threads)
        torch.set_num_threads(threads)
    try:
        worker(rank, *args)
    finally:
        shutdown_distributed()
