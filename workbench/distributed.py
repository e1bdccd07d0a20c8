"""torch.distributed for both families: one process per device, launched by `torchrun`.

    torchrun --nproc-per-node 2 scripts/train_procgen.py ...              (one machine, 2 workers)
    torchrun --nnodes 2 --node-rank R --nproc-per-node 4 \\
             --rdzv-backend c10d --rdzv-endpoint HOST:29500 scripts/train_procgen.py ...

torchrun sets RANK, LOCAL_RANK, WORLD_SIZE, MASTER_ADDR and MASTER_PORT for every process;
`init_distributed` reads them and joins the process group: gloo for CPU tensors, and on GPUs NCCL for
GPU tensors beside it (`cpu:gloo,cuda:nccl`), so that every collective finds a backend for the device
its tensors live on. A torchrun job of one process joins a group of one and runs every collective
(which is how one GPU checks the multi-GPU path). A plain `python` run gets a world of one without a
group, where every helper below is a no-op or an identity, so single-process code stays as it was.

The helpers are the few collectives the learners need: gradients averaged over ranks (so N workers
take the step one worker would take on the union of their batches), the model broadcast from rank 0
at start, tensors, means and Python objects gathered from every rank, and a stop flag that any rank
can raise and every rank sees at the same moment.

Failures end the job instead of hanging it. Input problems are found before training starts and
agreed on by every rank (`main_first`, `agree`), so each rank stops with the same one-line error. A
rank that fails later leaves the group at once (no collective on its way out); the collective the
others wait in then fails, and `worker_main` turns that into one line pointing at the failed rank's
error, so the job ends within seconds with the real error in the log.
"""

from __future__ import annotations

import os
import signal
import socket
import sys
from dataclasses import dataclass
from typing import Any, Callable, Iterable

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
    joined: bool = False  # a member of a process group (a torchrun job, even one of one process)

    @property
    def enabled(self) -> bool:
        """Whether collectives run: in a torchrun job of any size, and in any world of more than one."""
        return self.joined or self.world_size > 1

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

    def mean(self, values: dict[str, float]) -> dict[str, float]:
        """The mean over ranks of each named number (e.g. a rank's losses for TensorBoard), in one collective."""
        if not self.enabled or not values:
            return dict(values)
        totals = self.sum(torch.tensor([float(v) for v in values.values()], dtype=torch.float64))
        return {name: float(total) / self.world_size for name, total in zip(values, totals)}

    def moments(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean and sample variance (as torch.var) of the union of every rank's values of `x`, in float64."""
        x = x.double().flatten()
        total, total_sq, n = self.sum(torch.stack([x.sum(), (x * x).sum(), x.new_tensor(x.numel())])).unbind()
        mean = total / n
        return mean, (total_sq - n * mean * mean).clamp_min(0) / (n - 1)

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

    def broadcast_object(self, obj: Any, src: int = 0) -> Any:
        """Rank `src`'s picklable `obj`, on every rank."""
        if not self.enabled:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src)
        return box[0]

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
        value = torch.tensor([1.0 if flag else 0.0])
        dist.all_reduce(value, op=dist.ReduceOp.MAX)
        return bool(value.item() > 0)

    def barrier(self) -> None:
        if self.enabled:
            dist.barrier()

    # ------------------------------------------------------------------ failing together
    def agree(self, error: BaseException | None) -> None:
        """Collective: every rank says whether its part failed (`error`); if any rank's did, every rank raises
        that rank's error (the lowest failed rank's, same type and message), so that all ranks stop together
        with the same one-line message instead of some waiting for the ones that stopped."""
        if not self.enabled:
            if error is not None:
                raise error
            return
        outcomes = self.gather_objects(None if error is None else (type(error), str(error)))
        failed = next((outcome for outcome in outcomes if outcome is not None), None)
        if failed is not None:
            if error is not None and type(error) is failed[0] and str(error) == failed[1]:
                raise error
            raise _rebuilt(*failed)

    def main_first(self, fn: Callable[[], Any], errors: tuple[type[BaseException], ...]) -> Any:
        """fn() on rank 0, then on the other ranks (rank 0 alone builds a missing data cache, which the others
        then read), with its `errors` agreed on: if fn raises one of them on any rank, every rank raises it."""
        if not self.enabled:
            return fn()
        result, error = _attempt(fn, errors) if self.is_main else (None, None)
        failed_on_main = self.broadcast_object(None if error is None else (type(error), str(error)))
        if failed_on_main is not None:
            raise error if self.is_main else _rebuilt(*failed_on_main)
        if not self.is_main:
            result, error = _attempt(fn, errors)
        self.agree(error)
        return result

    def main_only(self, fn: Callable[[], Any], errors: tuple[type[BaseException], ...]) -> Any:
        """fn() on rank 0 alone (checks of, and changes to, the run directory it writes), with its `errors`
        raised on every rank."""
        return self.main_first(lambda: fn() if self.is_main else None, errors)


def _attempt(fn: Callable[[], Any], errors) -> tuple[Any, BaseException | None]:
    try:
        return fn(), None
    except errors as exc:
        return None, exc


def _rebuilt(kind: type[BaseException], message: str) -> BaseException:
    """Another rank's error, raised here with the same type and message (plain exceptions take one argument)."""
    try:
        return kind(message)
    except Exception:  # noqa: BLE001  (a type whose constructor wants more: the message is what matters)
        return RuntimeError(message)


SINGLE = Distributed()


def launched_distributed() -> bool:
    """True in a process that torchrun (or an equivalent launcher) started: a worker of a larger world, or
    the one worker of a torchrun job of one process."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1 or "TORCHELASTIC_RUN_ID" in os.environ


def single_process_only(what: str) -> None:
    """A clear error for the pipelines that do not run under torchrun (yet)."""
    if launched_distributed():
        raise ValueError(f"{what} does not run distributed yet: run it with one process (without torchrun)")


# Backends of the process group: CPU tensors (object collectives, counters, gathered returns) always go
# through gloo; on GPUs, GPU tensors (gradients, features) through NCCL.
CPU_BACKEND = "gloo"
GPU_BACKENDS = "cpu:gloo,cuda:nccl"


def init_distributed(device: str = "auto") -> Distributed:
    """Join the process group torchrun describes (once per process), or return a world of one.

    GPUs: one GPU per process (LOCAL_RANK picks it), NCCL for GPU tensors and gloo for CPU tensors.
    CPUs (or --device cpu): gloo."""
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
        dist.init_process_group(GPU_BACKENDS if use_cuda else CPU_BACKEND)
    return Distributed(dist.get_rank(), dist.get_world_size(), local_rank, joined=True)


def device_for(distributed: Distributed, device: str) -> str:
    """The device a rank runs on: its own GPU (cuda:LOCAL_RANK) when the job runs on GPUs."""
    if distributed.enabled and device in ("auto", "cuda") and torch.cuda.is_available():
        return f"cuda:{distributed.local_rank}"
    return device


def shutdown_distributed(failed: bool = False) -> None:
    """Leave the process group. After a failure a group with NCCL is left to the process's exit: destroying
    it would wait for the collectives the other ranks are stuck in."""
    if dist.is_available() and dist.is_initialized():
        if failed and "nccl" in str(dist.get_backend()):
            return
        dist.destroy_process_group()


# What a collective raises on a rank whose peer has stopped: gloo's closed or reset connection, the store
# (on rank 0's machine) gone, NCCL's aborted communicator.
PEER_LOST = ("Connection closed by peer", "Connection reset by peer", "remote worker crashing", "Broken pipe",
             "Connection refused", "NCCL communicator was aborted", "Socket Timeout")


def lost_a_peer(exc: BaseException) -> bool:
    """True for an error a collective raised because another rank of the job has stopped."""
    return isinstance(exc, dist.DistError) or (isinstance(exc, RuntimeError)
                                               and any(text in str(exc) for text in PEER_LOST))


def speaks() -> bool:
    """Whether this process prints user-facing errors: a plain run, or the first worker on each machine of a
    torchrun job (the others would print the same line again)."""
    return int(os.environ.get("LOCAL_RANK", "0")) == 0


class StoppedByLauncher(BaseException):
    """torchrun's SIGTERM, raised where the worker is (a BaseException, so no `except Exception` on the way
    swallows it, while `finally` blocks still run and remove half-written files)."""


def _raise_stopped(signum, frame):
    raise StoppedByLauncher()


def _leaving() -> None:
    """On the way out after a failure: a SIGTERM from here on must not interrupt the one line or the
    traceback being printed."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


def _say_stopped(reason: str) -> None:
    if speaks():
        print(f"error: worker {os.environ.get('RANK', '?')} stopped because {reason}", file=sys.stderr, flush=True)


def worker_main(body: Callable[[], int]) -> int:
    """Run a command's body as one worker of a torchrun job (or as a plain process) and leave the process
    group on the way out.

    A worker whose collective failed because another worker stopped says so in one line and exits 1,
    rather than adding a traceback of its own. So does a worker that torchrun terminates (SIGTERM) because
    another worker exited while this one was between collectives, or because torchrun itself was stopped.
    A worker that fails itself keeps its place in the group until its traceback is printed (and recorded
    for torchrun's failure report): the others, who notice when it leaves, then stop after its error is in
    the log."""
    if not launched_distributed():
        return body()
    previous = signal.signal(signal.SIGTERM, _raise_stopped)
    try:
        return _run_worker(body)
    except StoppedByLauncher:
        _leaving()
        _say_stopped("torchrun ended the job (another worker of the job failed, its error in the log above "
                     "this line, or torchrun itself was stopped)")
        shutdown_distributed(failed=True)
        return 1
    finally:
        signal.signal(signal.SIGTERM, previous)


def _run_worker(body: Callable[[], int]) -> int:
    try:
        code = body()
    except Exception as exc:
        _leaving()
        if lost_a_peer(exc):
            _say_stopped("another worker of the job failed (its error is in the log above this line)")
            shutdown_distributed(failed=True)
            return 1
        from torch.distributed.elastic.multiprocessing.errors import ErrorHandler

        ErrorHandler().record_exception(exc)  # torchrun's report names this worker's error as the root cause
        raise  # the process leaves the group when it exits, after Python has printed the traceback
    shutdown_distributed()
    return code


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
    worker(rank, *args)  # a failing worker leaves the group when its process exits, after its traceback
    shutdown_distributed()
