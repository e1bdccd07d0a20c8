"""Adapting a trained Procgen agent to a visual domain as a task of `workbench adapt` (workbench.tasks):
`--target procgen:<game>[:<visual options>]`, one process. Agents train through scripts/train_procgen.py."""

from __future__ import annotations

from workbench.arguments import given_or

from .adapt import METHODS  # noqa: F401  (the registry reads it)

DISTRIBUTED = False


def adapt_defaults():
    """The adaptation config's defaults (the `workbench adapt` parser shows them)."""
    from .adapt import ProcgenAdaptConfig

    return ProcgenAdaptConfig()


def adapt_config(a):
    from .adapt import ProcgenAdaptConfig

    rd = ProcgenAdaptConfig()
    if a.precision not in (None, "fp32"):
        raise ValueError("--precision applies to segmentation and pose adaptation; Procgen agents adapt in fp32")
    return ProcgenAdaptConfig(
        source=a.source, target=a.target, method=a.method or rd.method, frames=a.frames,
        collect_policy=a.collect_policy, frames_file=a.frames_file, recollect=a.recollect,
        epochs=given_or(a.epochs, rd.epochs), batch_size=given_or(a.batch_size, rd.batch_size), lr=given_or(a.lr, rd.lr),
        beta=given_or(a.beta, rd.beta), diversity_prior=a.diversity_prior or rd.diversity_prior,
        eval_episodes=a.eval_episodes, paired_steps=a.paired_steps, cluster_backend=a.cluster_backend,
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
