"""Adapting a trained Procgen agent to a visual domain as a task of `workbench adapt` (workbench.tasks):
`--target procgen:<game>[:<visual options>]`, one process. Agents train through scripts/train_procgen.py."""

from __future__ import annotations

import argparse

from workbench.arguments import given_or, non_negative_float, non_negative_int, positive_int

from .adapt import METHODS  # noqa: F401  (the registry reads it)
from .evaluate import SPLITS, TEST_SEED, VALIDATION_LEVELS, VALIDATION_SEED, VALIDATION_START

DISTRIBUTED = False
ADAPT_RESUMABLE = True   # `workbench adapt --resume` continues an interrupted adaptation


def adapt_defaults():
    """The adaptation config's defaults (the `workbench adapt` parser shows them)."""
    from .adapt import ProcgenAdaptConfig

    return ProcgenAdaptConfig()


def add_adapt_options(options) -> None:
    """`workbench adapt --target procgen:...` options (workbench.arguments.TaskOptions)."""
    from workbench.adapt.cluster import CLUSTER_BACKENDS

    from .adapt import DIVERSITY_PRIORS

    rd = adapt_defaults()
    options.add_argument("--frames", type=positive_int, default=rd.frames, help=f"frames collected in the target "
                         f"domain (default {rd.frames})")
    options.add_argument("--collect-policy", default=rd.collect_policy, choices=("source", "random"),
                         help="who acts while frames are collected (the frozen source policy, or random)")
    options.add_argument("--frames-file", default=None, help="adapt on saved frames (a frames.npz written by an "
                         "earlier run) instead of collecting, to repeat an experiment")
    options.add_argument("--recollect", action="store_true", help="collect again with the adapted policy before "
                         "every epoch (adapting during play)")
    options.add_argument("--paired-steps", type=non_negative_int, default=rd.paired_steps, help="steps of 32 envs "
                         "whose states are rendered in both visuals, to measure how far the adapted policy is from "
                         "the source policy on the same states (0 skips)")
    options.add_argument("--eval-episodes", type=non_negative_int, default=rd.eval_episodes, help="evaluation "
                         "episodes per domain for the source and the adapted agent (0 skips; where: --eval-split)")
    options.add_argument("--eval-split", default=rd.eval_split, choices=SPLITS, help="where the agents are "
                         f"scored: the test episodes (the full level distribution, seed {TEST_SEED}, default) or "
                         f"the validation levels [{VALIDATION_START}, {VALIDATION_START + VALIDATION_LEVELS}) (seed "
                         f"{VALIDATION_SEED}), on which to choose between methods and variants without looking at "
                         "the test episodes (online PAD plays and adapts on them)")
    options.add_argument("--beta", type=non_negative_float, default=None, help=f"pseudo-label weight (default "
                         f"{rd.beta})")
    options.add_argument("--diversity-prior", default=None, choices=DIVERSITY_PRIORS, help=f"IM diversity towards "
                         f"uniform action proportions ({rd.diversity_prior}, SHOT's and the default) or the source "
                         f"policy's initial mean action distribution on the target (initial)")
    options.add_argument("--cluster-backend", default="auto", choices=CLUSTER_BACKENDS, help="SHOT's clustering")
    options.add_argument("--frame-stride", type=positive_int, default=rd.frame_stride, help="keep every n-th step "
                         f"of play for the target frames and the paired states, so they span whole episodes "
                         f"(default {rd.frame_stride})")
    options.add_argument("--anchor-weight", type=non_negative_float, default=rd.anchor_weight, help="anchored-im: "
                         f"lambda on KL(pi_0 || pi_theta), the anchor to the source policy (default {rd.anchor_weight})")
    options.add_argument("--source-frames", type=positive_int, default=rd.source_frames, help="anchored-im: frames "
                         "of the source policy's own play in the source visuals, for its action marginal (default "
                         f"{rd.source_frames})")
    options.add_argument("--online", action="store_true", help="pad: PAD during deployment, as its paper measures "
                         "it: play the --eval-episodes target episodes, each from a fresh copy of the source agent, "
                         "with one gradient step on the inverse-dynamics loss after every step (default: offline, "
                         "epochs over the collected target frames)")
    options.add_argument("--resume", action="store_true", help="continue the interrupted run in --out after its "
                         "last finished epoch (shot, shot-im, anchored-im, bufr and offline pad write train-state.pt "
                         "after every epoch)")
    options.add_argument("--pad-batch-size", type=positive_int, default=rd.pad_batch_size, help="pad --online: "
                         f"randomly cropped copies of each transition per step (default {rd.pad_batch_size}, PAD's)")
    options.add_argument("--pad-keep-fc", action=argparse.BooleanOptionalAction, default=None, help="pad: adapt "
                         "the encoder's conv layers only and leave its dense layer, the features the policy reads, as "
                         "trained, as PAD's policy keeps its own projection (the default where the encoder has a dense "
                         "layer); --no-pad-keep-fc adapts the whole encoder")


def adapt_config(a):
    rd = adapt_defaults()
    from .adapt import ProcgenAdaptConfig

    return ProcgenAdaptConfig(
        source=a.source, target=a.target, method=a.method or rd.method, frames=a.frames,
        collect_policy=a.collect_policy, frames_file=a.frames_file, recollect=a.recollect,
        epochs=a.epochs, batch_size=a.batch_size, lr=a.lr,   # None: the method's defaults
        beta=given_or(a.beta, rd.beta), diversity_prior=a.diversity_prior or rd.diversity_prior,
        eval_episodes=a.eval_episodes, eval_split=a.eval_split, paired_steps=a.paired_steps,
        cluster_backend=a.cluster_backend,
        frame_stride=a.frame_stride, anchor_weight=a.anchor_weight, source_frames=a.source_frames,
        pad_online=a.online, pad_batch_size=a.pad_batch_size, pad_keep_fc=a.pad_keep_fc, resume=a.resume,
        seed=a.seed, device=a.device, run_dir=a.out, progress=not a.no_progress)


def run_adapt(cfg, dist) -> dict:
    from .adapt import ProcgenAdapter

    adapter = ProcgenAdapter(cfg)
    return {**adapter.run(), "run_dir": str(adapter.run_dir)}


def report_adapt(cfg, m: dict) -> None:
    for who in ("source_agent", "adapted_agent"):
        if who in m:
            print(f"{who.replace('_', ' ')}: target domain return {m[who]['target']['mean_return']:.2f}, source "
                  f"domain {m[who]['source']['mean_return']:.2f}")
    print(f"adapted agent {m['checkpoint']} (a Procgen checkpoint: scripts/evaluate_procgen.py {m['run_dir']}); "
          f"tensorboard --logdir {m['run_dir']}")
