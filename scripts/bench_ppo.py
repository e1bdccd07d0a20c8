#!/usr/bin/env python
"""Throughput of this PPO against stable-baselines3's PPO on the same work.

Both learners get the same Procgen envs (SB3 through the VecEnv adapter), the
same IMPALA network (the registry's, wrapped as an SB3 features extractor), the
same n_envs / n_steps / minibatches / epochs and reward normalisation, and train
for the same number of env steps in this one process. Prints both
steps-per-second figures and ends with `ppo_sps_ratio_vs_sb3=<x>`.

With `--world-size N` it times this PPO alone, on the same work (the same envs in total, split
over the workers, the same iterations) with 1 process and with N processes joined as torchrun
joins them (gloo on CPUs, one GPU per process with NCCL). Both sides get the same total thread
budget T (`--threads`, default the machine's cores, rounded down to a multiple of N): the single
process runs T threads, each of the N processes T / N (torch threads, OMP_NUM_THREADS and
Procgen's env threads alike); both settings are printed. Each side first runs
`--warmup-iterations` untimed PPO iterations, then times `--iterations` with every rank between two
barriers, counting only the timed env steps over all workers. It ends with
`ppo_world_size_speedup=<x>`: steps/s with N processes over steps/s with one.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from agents.ppo import PPO, PPOConfig  # noqa: E402
from envs.procgen import ProcgenVecEnv  # noqa: E402
from workbench.backbones import create_backbone  # noqa: E402
from workbench.distributed import SINGLE, init_distributed, spawn_local  # noqa: E402
from workbench.runtime import PRECISION_CHOICES, Runtime, seconds_per_call  # noqa: E402


def bench_network(args) -> None:
    """Samples/s of the actor-critic network per memory layout and precision: the basis of the defaults."""
    from agents.ppo import ActorCritic

    print("network throughput (samples/s): layout, precision, rollout forward (batch "
          f"{args.num_envs}, inference mode), train step (batch {args.num_envs * args.num_steps // args.num_minibatches})")
    device = torch.device("cuda" if args.device in ("auto", "cuda") and torch.cuda.is_available() else "cpu")
    train_batch = args.num_envs * args.num_steps // args.num_minibatches
    obs = torch.randint(0, 256, (train_batch, 64, 64, 3), dtype=torch.uint8, device=device)
    for channels_last in (False, True):
        for precision in ("fp32", "bf16"):
            rt = Runtime(device, torch.bfloat16 if precision == "bf16" else None, channels_last)
            model = rt.prepare_module(ActorCritic(create_backbone(args.backbone), 15))
            optimizer = torch.optim.Adam(model.parameters(), lr=1e-4)
            # The model permutes NHWC frames to NCHW; for the NCHW path hand it frames whose permuted
            # view is NCHW-contiguous, as a pipeline that stores frames channel-first would.
            frames = obs if channels_last else obs.permute(0, 3, 1, 2).contiguous().permute(0, 2, 3, 1)
            small = frames[: args.num_envs]

            def forward():
                with torch.inference_mode(), rt.autocast():
                    model(small)

            def train_step():
                with rt.autocast():
                    logits, value = model(frames)
                loss = logits.float().logsumexp(-1).mean() + value.float().pow(2).mean()
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()

            fwd = args.num_envs / seconds_per_call(forward, 10, device)
            step = train_batch / seconds_per_call(train_step, 2, device)
            print(f"  {'channels_last' if channels_last else 'NCHW':13s} {precision}: "
                  f"forward {fwd:8.0f}   train step {step:7.0f}")


def time_iterations(agent: PPO, dist=SINGLE, warmup: int = 0, iterations: int = 1) -> tuple[int, float]:
    """(env steps over all workers, seconds) of `iterations` PPO iterations run after `warmup` untimed ones.

    The barriers make the interval cover every rank's timed work: it starts when the slowest rank has
    finished warming up and stops when the slowest rank has finished its last iteration."""
    for _ in range(warmup):
        agent.train_iteration()
    steps_before = agent.env_steps
    _synchronize(agent.rt.device)
    dist.barrier()
    start = time.perf_counter()
    for _ in range(iterations):
        agent.train_iteration()
    _synchronize(agent.rt.device)
    dist.barrier()
    return agent.env_steps - steps_before, time.perf_counter() - start


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def bench_ours(args, dist=SINGLE, warmup: int = 0, env_threads: int | None = None) -> tuple[int, float]:
    """(env steps, seconds) of this PPO's timed iterations, over all workers when `dist` is a torchrun world."""
    torch.manual_seed(dist.seed(args.seed))
    num_envs = args.num_envs // dist.world_size
    env = ProcgenVecEnv(args.env, num_envs, num_levels=200, seed=dist.seed(args.seed), num_threads=env_threads)
    runtime = Runtime.create(args.device, args.precision, distributed=dist)
    cfg = PPOConfig(num_envs=num_envs, num_steps=args.num_steps, num_minibatches=args.num_minibatches,
                    num_epochs=args.num_epochs, backbone=args.backbone, mixreg=args.mixreg)
    agent = PPO(env, cfg, runtime)
    if dist.is_main:
        print(f"ours: {dist.world_size} process(es) x {num_envs} envs, device {runtime.device}, precision "
              f"{runtime.precision_name}, channels_last {runtime.channels_last}, torch threads "
              f"{torch.get_num_threads()}", flush=True)
    return time_iterations(agent, dist, warmup, args.iterations)


@contextmanager
def thread_budget(threads: int):
    """torch's intra-op threads and OMP_NUM_THREADS (inherited by spawned processes, read by the OpenMP
    and BLAS runtimes they load) set to `threads`; both restored afterwards."""
    before_torch, before_env = torch.get_num_threads(), os.environ.get("OMP_NUM_THREADS")
    os.environ["OMP_NUM_THREADS"] = str(threads)
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before_torch)
        if before_env is None:
            del os.environ["OMP_NUM_THREADS"]
        else:
            os.environ["OMP_NUM_THREADS"] = before_env


def _bench_rank(rank: int, args, result_file: str, threads: int) -> None:
    steps, seconds = bench_ours(args, init_distributed(args.device), args.warmup_iterations, threads)
    if rank == 0:  # spawned processes print to their own stdout: rank 0 hands its figures to the parent
        with open(result_file, "w") as f:
            f.write(f"{steps} {seconds!r}")


def bench_world(args, world_size: int, threads: int) -> tuple[int, float]:
    """(env steps, seconds) of bench_ours in `world_size` local processes of `threads` threads each."""
    with thread_budget(threads):
        if world_size == 1:
            return bench_ours(args, warmup=args.warmup_iterations, env_threads=threads)
        with tempfile.TemporaryDirectory() as tmp:
            result = os.path.join(tmp, "steps_seconds")
            spawn_local(_bench_rank, world_size, args, result, threads, threads_per_process=threads)
            with open(result) as f:
                steps, seconds = f.read().split()
    return int(steps), float(seconds)


def total_threads(args) -> int:
    """The thread budget both sides share: --threads (default: every core), rounded down to a multiple of
    the world size so that the N processes together get exactly what the single process gets."""
    threads = args.threads if args.threads is not None else os.cpu_count() or 1
    if threads < args.world_size:
        raise SystemExit(f"error: --threads {threads} is fewer than --world-size {args.world_size}: "
                         "every process needs at least one thread")
    return threads - threads % args.world_size


def _processes(n: int, threads: int) -> str:
    return f"{n} process{'es' if n > 1 else ''} x {threads} thread{'s' if threads > 1 else ''}"


def compare_world_sizes(args) -> float:
    """Steps/s with N processes over steps/s with one, on the same work and the same total threads."""
    if args.num_envs % args.world_size:
        raise SystemExit(f"error: --num-envs {args.num_envs} does not split over --world-size {args.world_size}: "
                         "give a multiple")
    if args.iterations < 1 or args.warmup_iterations < 0:
        raise SystemExit("error: --iterations must be at least 1 and --warmup-iterations at least 0")
    total = total_threads(args)
    print(f"{total} threads in total on each side (torch intra-op, OMP_NUM_THREADS and Procgen env threads per "
          f"process); {args.warmup_iterations} warm-up iteration(s) untimed, {args.iterations} timed", flush=True)
    sps = {}
    for n in (1, args.world_size):
        print(f"{_processes(n, total // n)}: running", flush=True)
        steps, seconds = bench_world(args, n, total // n)
        sps[n] = steps / seconds
        print(f"{_processes(n, total // n)}: {steps} env steps in {seconds:.2f} s = {sps[n]:.1f} steps/s",
              flush=True)
    speedup = sps[args.world_size] / sps[1]
    print(f"ppo_world_size_speedup={speedup:.2f}")
    return speedup


def bench_sb3(args) -> float:
    from stable_baselines3 import PPO as SB3PPO
    from stable_baselines3.common.vec_env import VecNormalize

    from envs.sb3 import BackboneExtractor, ProcgenSB3VecEnv

    torch.manual_seed(args.seed)
    venv = VecNormalize(ProcgenSB3VecEnv(ProcgenVecEnv(args.env, args.num_envs, num_levels=200, seed=args.seed)),
                        norm_obs=False, norm_reward=True, gamma=0.999)
    batch = args.num_envs * args.num_steps // args.num_minibatches
    model = SB3PPO("CnnPolicy", venv, n_steps=args.num_steps, batch_size=batch, n_epochs=args.num_epochs,
                   learning_rate=5e-4, gamma=0.999, gae_lambda=0.95, clip_range=0.2, clip_range_vf=0.2,
                   ent_coef=0.01, vf_coef=0.5, max_grad_norm=0.5, device=args.device if args.device != "auto"
                   else ("cuda" if torch.cuda.is_available() else "cpu"), seed=args.seed, verbose=0,
                   policy_kwargs=dict(features_extractor_class=BackboneExtractor,
                                      features_extractor_kwargs={"backbone": args.backbone},
                                      net_arch=[], optimizer_kwargs={"eps": 1e-5}))
    print(f"sb3: device {model.device}, fp32, default memory format")
    steps = args.iterations * args.num_envs * args.num_steps
    start = time.perf_counter()
    model.learn(total_timesteps=steps)
    elapsed = time.perf_counter() - start
    return model.num_timesteps / elapsed


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--env", default="starpilot")
    p.add_argument("--num-envs", type=int, default=64)
    p.add_argument("--num-steps", type=int, default=None, help="rollout length per env (default 256, the "
                   "recipe's; 64 for the --world-size comparison, which then finishes in about ten minutes on 2 "
                   "cores without AVX-512)")
    p.add_argument("--num-minibatches", type=int, default=8)
    p.add_argument("--num-epochs", type=int, default=3)
    p.add_argument("--iterations", type=int, default=2, help="PPO iterations (rollout + update) per learner")
    p.add_argument("--warmup-iterations", type=int, default=1, help="untimed PPO iterations before the timed "
                   "ones (--world-size comparison)")
    p.add_argument("--threads", type=int, default=None, help="total threads of each side of the --world-size "
                   "comparison: the single process runs them all, each of N processes 1/N (default: every core)")
    p.add_argument("--backbone", default="impala_1x")
    p.add_argument("--device", default="auto")
    p.add_argument("--precision", default="auto", choices=PRECISION_CHOICES, help="for this PPO (SB3 runs fp32)")
    p.add_argument("--mixreg", action="store_true", help="time this PPO with mixreg on")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--skip-network", action="store_true", help="skip the per-layout network timing")
    p.add_argument("--world-size", type=int, default=1, help="time this PPO with 1 and with N torchrun-style "
                   "processes on the same work instead of comparing with SB3")
    args = p.parse_args(argv)
    if args.num_steps is None:
        args.num_steps = 64 if args.world_size > 1 else 256
    work = (f"{args.iterations} iterations x {args.num_envs} envs x {args.num_steps} steps, {args.num_minibatches} "
            f"minibatches, {args.num_epochs} epochs, {args.backbone}")
    if args.world_size > 1:  # each side's threads are set, and printed, by the comparison
        print(work)
        compare_world_sizes(args)
        return
    print(f"{work}, torch threads {torch.get_num_threads()}")
    if not args.skip_network:
        bench_network(args)
    steps, seconds = bench_ours(args)
    ours = steps / seconds
    print(f"this PPO: {ours:.1f} steps/s", flush=True)
    sb3 = bench_sb3(args)
    print(f"stable-baselines3 PPO: {sb3:.1f} steps/s")
    print(f"ppo_sps_ratio_vs_sb3={ours / sb3:.2f}")


if __name__ == "__main__":
    main()
