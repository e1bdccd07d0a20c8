#!/usr/bin/env python
"""Throughput of this Rainbow against stable-baselines3's DQN (SB3 has no Rainbow) on the same work.

Both learners get the same Procgen envs (SB3 through the VecEnv adapter), the same IMPALA
backbone (wrapped as an SB3 features extractor), the same batch size, one gradient update per
`--update-every` env steps, the same warm-up and the same number of env steps, in this one
process. Rainbow does more per update (C51 over 51 atoms, a dueling noisy head, a double-Q
forward pass, prioritised sampling). Ends with `rainbow_sps_ratio_vs_sb3_dqn=<x>`.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from agents.rainbow import Rainbow, RainbowConfig  # noqa: E402
from envs.procgen import ProcgenVecEnv  # noqa: E402
from workbench.runtime import PRECISION_CHOICES, Runtime  # noqa: E402


def bench_ours(args) -> float:
    torch.manual_seed(args.seed)
    env = ProcgenVecEnv(args.env, args.num_envs, num_levels=200, seed=args.seed)
    runtime = Runtime.create(args.device, args.precision)
    cfg = RainbowConfig(num_envs=args.num_envs, buffer_size=args.buffer_size, batch_size=args.batch_size,
                        update_every=args.update_every, warmup_steps=args.warmup, backbone=args.backbone,
                        mixreg=args.mixreg, total_steps=args.steps, steps_per_iteration=16)
    agent = Rainbow(env, cfg, runtime)
    print(f"ours: device {runtime.device}, precision {runtime.precision_name}, mixreg {args.mixreg}")
    start = time.perf_counter()
    while agent.env_steps < args.steps:
        agent.train_iteration()
    elapsed = time.perf_counter() - start
    print(f"  {agent.updates} updates")
    return agent.env_steps / elapsed


def bench_sb3(args) -> float:
    from stable_baselines3 import DQN

    from envs.sb3 import BackboneExtractor, ProcgenSB3VecEnv

    torch.manual_seed(args.seed)
    venv = ProcgenSB3VecEnv(ProcgenVecEnv(args.env, args.num_envs, num_levels=200, seed=args.seed))
    device = args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    model = DQN("CnnPolicy", venv, buffer_size=args.buffer_size, batch_size=args.batch_size,
                learning_starts=args.warmup, train_freq=(max(1, args.update_every // args.num_envs), "step"),
                gradient_steps=1, target_update_interval=8192, learning_rate=2.5e-4, gamma=0.99, device=device,
                seed=args.seed, verbose=0, policy_kwargs=dict(features_extractor_class=BackboneExtractor,
                                                              features_extractor_kwargs={"backbone": args.backbone},
                                                              net_arch=[]))
    print(f"sb3 DQN: device {model.device}, fp32")
    start = time.perf_counter()
    model.learn(total_timesteps=args.steps)
    elapsed = time.perf_counter() - start
    print(f"  {model._n_updates} updates")
    return model.num_timesteps / elapsed


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--env", default="starpilot")
    p.add_argument("--num-envs", type=int, default=64)
    p.add_argument("--steps", type=int, default=16_384, help="env steps per learner, warm-up included")
    p.add_argument("--warmup", type=int, default=4096)
    p.add_argument("--batch-size", type=int, default=512)
    p.add_argument("--update-every", type=int, default=64, help="env steps per gradient update")
    p.add_argument("--buffer-size", type=int, default=50_000)
    p.add_argument("--backbone", default="impala_1x")
    p.add_argument("--device", default="auto")
    p.add_argument("--precision", default="auto", choices=PRECISION_CHOICES, help="for this Rainbow (SB3 runs fp32)")
    p.add_argument("--mixreg", action="store_true")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    print(f"{args.steps} env steps, {args.num_envs} envs, batch {args.batch_size}, one update per "
          f"{args.update_every} env steps after {args.warmup}, {args.backbone}, torch threads {torch.get_num_threads()}")
    ours = bench_ours(args)
    print(f"this Rainbow: {ours:.1f} steps/s", flush=True)
    sb3 = bench_sb3(args)
    print(f"stable-baselines3 DQN: {sb3:.1f} steps/s")
    print(f"rainbow_sps_ratio_vs_sb3_dqn={ours / sb3:.2f}")


if __name__ == "__main__":
    main()
