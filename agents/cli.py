"""Command lines of the Procgen agents: training and evaluation on unseen levels."""

from __future__ import annotations

import argparse
import json
import signal
from pathlib import Path

from envs.procgen import GAMES, PROTOCOLS, VISUAL_OPTIONS
from workbench.arguments import (ArgumentParser, discount, non_negative_float, non_negative_int, non_negative_steps,
                                 positive_float, positive_int, positive_steps, report_error, seed)
from workbench.backbones import list_backbones
from workbench.runtime import DEVICE_CHOICES, PRECISION_CHOICES

from .algorithms import ALGORITHMS
from .inverse_dynamics import AUX_TASKS, AUX_WEIGHT
from .train import LEARNING_CURVE, REGULARIZERS, Trainer, TrainConfig, apply_regularizer

TRAIN_HELP = """Train an agent on a Procgen game and evaluate it on unseen levels.

With no flags: the quick Procgen job, PPO+mixreg on starpilot (easy, 200 training levels) with a
half-width IMPALA CNN, 16 envs x 128 steps, 102,400 steps: about 11 minutes on 2 CPU cores without
AVX-512 (timed with 32 test episodes; 100 are the default now), and it ends with the test return over
100 episodes beside the uniform random policy's on the same episodes.
The paper-scale recipe (its network and rollout length):

    python scripts/train_procgen.py --env starpilot --protocol easy-200 --num-envs 64 --backbone impala_1x --num-steps 256 --total-steps protocol
    python scripts/train_procgen.py --env climber --protocol hard-500 --num-envs 64 --backbone impala_1x --num-steps 256 --total-steps protocol --no-mixreg
"""


def total_steps_arg(value: str):
    return value if value == "protocol" else positive_steps(value)


def parse_train_args(argv=None) -> argparse.Namespace:
    p = ArgumentParser(prog="train-procgen", description=TRAIN_HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--env", default="starpilot", help=f"Procgen game: {', '.join(GAMES)}")
    p.add_argument("--algo", default="ppo", help=f"algorithm: {', '.join(ALGORITHMS)}")
    p.add_argument("--buffer-size", type=positive_steps, default=500_000, help="Rainbow: replay capacity (transitions)")
    p.add_argument("--save-replay", action="store_true", help="Rainbow: keep the replay in checkpoints")
    p.add_argument("--warmup-steps", type=non_negative_steps, default=20_000, help="Rainbow: env steps before learning (under torchrun: of all workers together)")
    p.add_argument("--batch-size", type=positive_int, default=512, help="Rainbow: replay batch size")
    p.add_argument("--update-every", type=positive_int, default=64, help="Rainbow: env steps per gradient update")
    p.add_argument("--target-update", type=positive_steps, default=8192, help="Rainbow: env steps between target-network copies")
    p.add_argument("--mixreg", action=argparse.BooleanOptionalAction, default=True,
                   help="mixture regularisation (default on; --no-mixreg for the plain algorithm)")
    p.add_argument("--mix-alpha", type=positive_float, default=0.2, help="Beta(alpha, alpha) of the mixing weights")
    p.add_argument("--regularizer", default="none", choices=REGULARIZERS,
                   help="the mixreg paper's comparison regularisers")
    p.add_argument("--l2-coef", type=non_negative_float, default=1e-4,
                   help="coefficient of the L2 penalty, 0.5 * sum of squared weights (--regularizer l2)")
    p.add_argument("--aux", default="none", choices=AUX_TASKS,
                   help="an auxiliary self-supervised head on the shared encoder: inverse-dynamics is PAD's (Hansen "
                        "et al. 2021), which `workbench adapt --method pad` adapts with at deployment")
    p.add_argument("--aux-crop", action=argparse.BooleanOptionalAction, default=None,
                   help="the auxiliary head learns on random crops of its frames, as PAD's (default: on with --aux)")
    p.add_argument("--aux-weight", type=positive_float, default=None,
                   help=f"weight of the auxiliary loss beside the RL loss (default {AUX_WEIGHT}, PAD's)")
    p.add_argument("--protocol", default="easy-200", choices=sorted(PROTOCOLS),
                   help="level split and distribution mode (easy-200: easy, levels [0,200); hard-500: hard, 500)")
    p.add_argument("--total-steps", type=total_steps_arg, default=None,
                   help="env steps to train for; 'protocol' uses the protocol's budget (25M / 200M); "
                        f"default {TrainConfig.total_steps} (the quick Procgen job: about 10 minutes on 2 CPU cores)")
    p.add_argument("--num-envs", type=positive_int, default=16, help="parallel training envs (the recipe uses 64)")
    p.add_argument("--num-steps", type=positive_int, default=128,
                   help="PPO: rollout length per env (default 128, the quick Procgen job's; the paper's is 256)")
    p.add_argument("--reward-norm-gamma", type=discount, default=0.99,
                   help="PPO: discount of the reward scaler's running return (VecNormalize's 0.99; GAE uses 0.999)")
    p.add_argument("--backbone", default=None,
                   help="registered backbone (default: impala_half for PPO, the quick Procgen job's; impala_1x, the "
                        "papers', for Rainbow): "
                        f"{', '.join(list_backbones())}")
    p.add_argument("--lr", type=positive_float, default=None, help="default: 5e-4 (PPO), 2.5e-4 (Rainbow)")
    p.add_argument("--seed", type=seed, default=0)
    p.add_argument("--device", default="auto", choices=DEVICE_CHOICES)
    p.add_argument("--precision", default="auto", choices=PRECISION_CHOICES,
                   help="auto: bf16 autocast where the hardware computes bf16 natively, else fp32")
    p.add_argument("--amp", action="store_true", help="shorthand for --precision bf16")
    p.add_argument("--compile", action="store_true", help="torch.compile the network")
    p.add_argument("--visual", nargs="*", default=[], choices=sorted(VISUAL_OPTIONS),
                   help="visual-domain variants (dynamics unchanged)")
    p.add_argument("--eval-interval", type=positive_int, default=10, help="iterations between test evaluations")
    p.add_argument("--eval-episodes", type=positive_int, default=TrainConfig.eval_episodes,
                   help=f"test episodes per evaluation, on up to {TrainConfig.num_test_envs} envs (default "
                        f"{TrainConfig.eval_episodes}); the random floor plays the final evaluation's episodes")
    p.add_argument("--eval-clean-frames", action="store_true",
                   help="--regularizer random_conv: evaluate on clean frames instead of through random kernels "
                        "(the paper's test worker plays through them)")
    p.add_argument("--no-video", action="store_true", help="skip the test-episode GIF in TensorBoard")
    p.add_argument("--feature-stats-frames", type=non_negative_int, default=TrainConfig.feature_stats_frames,
                   help="PPO: frames of the finished agent's own play whose unit statistics the checkpoint keeps, "
                        "for adapting it with BUFR (workbench adapt --method bufr); 0 skips (default %(default)s)")
    p.add_argument("--snapshot-every", type=non_negative_steps, default=0, metavar="STEPS",
                   help="also keep snapshots/checkpoint-<steps>.pt every STEPS env steps, to evaluate later (0: off)")
    p.add_argument("--run-name", default=None, help="run directory name under runs/ (one that holds a run is "
                   "refused unless --overwrite)")
    p.add_argument("--overwrite", action="store_true", help="replace the run in --run-name (its checkpoints, "
                   "metrics and TensorBoard events are removed first)")
    p.add_argument("--runs-root", default="runs", help="folder that holds the run directories (default: runs)")
    p.add_argument("--resume", default=None, metavar="RUN_DIR", help="continue the run saved in RUN_DIR")
    p.add_argument("--no-progress", action="store_true")
    return p.parse_args(argv)


PAPER_BACKBONE = "impala_1x"
QUICK_BACKBONE = {"ppo": "impala_half"}  # the quick Procgen job's network; Rainbow keeps the papers' (its figures used it)


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    total = args.total_steps
    if total == "protocol":
        total = PROTOCOLS[args.protocol].total_steps
    backbone = args.backbone or QUICK_BACKBONE.get(args.algo, PAPER_BACKBONE)
    agent = {"num_envs": args.num_envs, "backbone": backbone, "mixreg": args.mixreg, "mix_alpha": args.mix_alpha}
    if args.lr is not None:
        agent["learning_rate"] = args.lr
    if args.aux != "none":
        agent.update(aux=args.aux, aux_weight=AUX_WEIGHT if args.aux_weight is None else args.aux_weight,
                     aux_crop=args.aux_crop is not False)
    elif args.aux_weight is not None or args.aux_crop is not None:
        raise ValueError("--aux-weight and --aux-crop are the auxiliary loss's: add --aux inverse-dynamics")
    if args.algo == "ppo":
        agent.update(num_steps=args.num_steps, reward_norm_gamma=args.reward_norm_gamma)
    elif args.algo == "rainbow":
        agent.update(buffer_size=args.buffer_size, save_replay=args.save_replay, warmup_steps=args.warmup_steps,
                     batch_size=args.batch_size, update_every=args.update_every, target_update=args.target_update)
    run_dir = str(Path(args.runs_root) / args.run_name) if args.run_name else ""
    return TrainConfig(env=args.env, algo=args.algo, protocol=args.protocol,
                       total_steps=total if total is not None else TrainConfig.total_steps,
                       seed=args.seed, device=args.device, precision="bf16" if args.amp else args.precision,
                       compile=args.compile, visual=list(args.visual), eval_interval=args.eval_interval,
                       eval_episodes=args.eval_episodes,
                       num_test_envs=min(args.eval_episodes, TrainConfig.num_test_envs),
                       eval_clean_frames=args.eval_clean_frames,
                       video=not args.no_video, snapshot_interval=args.snapshot_every,
                       feature_stats_frames=args.feature_stats_frames, run_dir=run_dir,
                       runs_root=args.runs_root,
                       progress=not args.no_progress,
                       agent=apply_regularizer(agent, args.regularizer, args.l2_coef, args.algo))


def train_main(argv=None) -> int:
    """Train (or resume) one agent; under torchrun every worker runs this and rank 0 reports."""
    from workbench.distributed import worker_main

    return worker_main(lambda: _train(parse_train_args(argv)))


def _start(args: argparse.Namespace) -> Trainer:
    """The Trainer a command line asks for; problems with the input raise before training starts."""
    from workbench.distributed import init_distributed
    from workbench.logging import claim_run_dir

    if args.resume:
        if args.total_steps == "protocol":
            raise ValueError("--total-steps protocol cannot be combined with --resume: give a number")
        if args.overwrite or args.run_name:
            raise ValueError("--resume continues the run in its own directory: leave out --run-name and --overwrite")
        return Trainer.resume(args.resume, total_steps=args.total_steps, progress=not args.no_progress)
    cfg = config_from_args(args)
    if cfg.run_dir:  # rank 0 writes the run directory; every rank stops if it is taken
        init_distributed(cfg.device).main_only(lambda: claim_run_dir(
            cfg.run_dir, args.overwrite, "--run-name", f"continue it with --resume {cfg.run_dir}"), (ValueError,))
    return Trainer(cfg)


def _train(args: argparse.Namespace) -> int:
    from workbench.distributed import lost_a_peer
    from workbench.files import WriteError

    try:
        trainer = _start(args)
    except (ValueError, RuntimeError, MemoryError) as exc:
        if lost_a_peer(exc):
            raise
        report_error(str(exc))
        return 2
    if trainer.dist.is_main:
        _announce(args, trainer)
    try:
        return _report(args, trainer, trainer.run())
    except WriteError as exc:  # the last checkpoint written stays loadable
        report_error(str(exc), every_rank=True)
        return 1


def _announce(args: argparse.Namespace, trainer: Trainer) -> None:
    cfg = trainer.cfg
    workers = f", {trainer.dist.world_size} workers" if trainer.dist.enabled else ""
    print(f"run directory: {trainer.run_dir}  (tensorboard --logdir {trainer.run_dir.parent})")
    print(f"{cfg.algo} on {cfg.env} ({cfg.protocol}), mixreg {'on' if trainer.agent_cfg.mixreg else 'off'}, "
          f"{trainer.agent_cfg.num_envs} envs{' per worker' if workers else ''}{workers}, {cfg.total_steps} "
          f"steps, device {trainer.runtime.device}, precision {trainer.runtime.precision_name}" +
          (f", resuming at step {trainer.agent.env_steps}" if args.resume else ""))


def _mean_se(result: dict) -> str:
    se = result.get("stderr_return")
    return f"{result['mean_return']:.2f}" + (f" ± {se:.2f}" if se is not None else "")


def _report(args: argparse.Namespace, trainer: Trainer, metrics: dict) -> int:
    main = trainer.dist.is_main
    if not main:
        return 128 + (metrics["stop_signal"] or signal.SIGTERM) if metrics["interrupted"] else 0
    print(json.dumps({k: metrics[k] for k in ("env_steps", "steps_per_second", "train_mean_return_last100")}))
    test, floor = metrics["test"], metrics.get("test_random_policy")
    if test:
        print(f"test on unseen levels: mean return {_mean_se(test)} over {test['episodes']} episodes, "
              f"normalised score {test['normalized_score']:.3f}")
    if floor:
        print(f"uniform random policy on the same episodes (the floor): mean return {_mean_se(floor)}")
    print(f"TensorBoard logs: {trainer.run_dir}  ->  tensorboard --logdir {trainer.run_dir.parent}")
    if (trainer.run_dir / LEARNING_CURVE).exists():
        print(f"learning curve: {trainer.run_dir / LEARNING_CURVE}")
    # Interrupted runs exit as a signal-killed process would (130 for SIGINT, 143 for SIGTERM).
    return 128 + (metrics["stop_signal"] or signal.SIGTERM) if metrics["interrupted"] else 0



def parse_evaluate_args(argv=None) -> argparse.Namespace:
    p = ArgumentParser(prog="evaluate-procgen",
                       description="Evaluate a trained Procgen agent on unseen levels and write JSON.")
    p.add_argument("checkpoint", help="a run directory or its checkpoint.pt; random:<game> plays the uniform random "
                   "policy instead (the floor to read a return against; easy mode and own visuals unless told)")
    p.add_argument("--episodes", type=positive_int, default=100)
    p.add_argument("--num-envs", type=positive_int, default=64)
    p.add_argument("--num-levels", type=non_negative_int, default=0,
                   help="0 = the full level distribution (unseen levels)")
    p.add_argument("--start-level", type=non_negative_int, default=0)
    p.add_argument("--distribution-mode", choices=("easy", "hard"), default=None,
                   help="default: the training protocol's")
    p.add_argument("--visual", nargs="*", default=None, choices=sorted(VISUAL_OPTIONS),
                   help="visual-domain variants (default: as in training)")
    p.add_argument("--deterministic", action="store_true",
                   help="PPO: the most likely action instead of a sample; Rainbow: the noise-free mean network")
    p.add_argument("--clean-frames", action="store_true",
                   help="an agent trained with --regularizer random_conv plays clean frames instead of random "
                        "kernels (default: through them, a new kernel every rollout length, as the paper's test "
                        "worker); other agents always play clean frames")
    p.add_argument("--seed", type=seed, default=12345)
    p.add_argument("--device", default="auto", choices=DEVICE_CHOICES)
    p.add_argument("--out", default=None, help="JSON file to write (default: <run dir>/evaluation.json)")
    return p.parse_args(argv)


def evaluate_main(argv=None) -> int:
    from workbench.checkpoint import CheckpointError

    from .evaluate import RANDOM_POLICY, evaluate_checkpoint, evaluate_random_policy

    args = parse_evaluate_args(argv)
    episodes = dict(episodes=args.episodes, num_envs=args.num_envs, num_levels=args.num_levels,
                    start_level=args.start_level, distribution_mode=args.distribution_mode, visual=args.visual,
                    seed=args.seed)
    try:
        if args.checkpoint.startswith(RANDOM_POLICY):
            if args.deterministic or args.clean_frames:
                flag = "--deterministic" if args.deterministic else "--clean-frames"
                raise ValueError(f"{flag} has no meaning for the uniform random policy: leave it out")
            game = args.checkpoint[len(RANDOM_POLICY):]
            result = evaluate_random_policy(game, **episodes)
            visual = "-".join(args.visual or []) or "default"
            default_out = Path("runs") / "random-policy" / f"{game}-{result['distribution_mode']}-{visual}.json"
        else:
            result, default_out = evaluate_checkpoint(args.checkpoint, deterministic=args.deterministic,
                                                      device=args.device, clean_frames=args.clean_frames,
                                                      **episodes)
    except (CheckpointError, ValueError, RuntimeError) as exc:
        report_error(str(exc))
        return 2
    from workbench.files import WriteError
    from workbench.logging import write_json

    try:
        out = write_json(args.out or default_out, result)
    except WriteError as exc:
        report_error(str(exc))
        return 1
    print(json.dumps(result, indent=2))
    print(f"written to {out}")
    return 0
