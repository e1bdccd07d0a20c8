"""The Procgen training driver shared by every agent: run directory, logging,
periodic evaluation on unseen levels, checkpoints, resume and clean interruption.

An agent plugs in through a small interface:
    agent.kind, agent.env_steps, agent.iterations
    agent.train_iteration(should_stop) -> metrics dict, or None if interrupted before updating
    agent.act(obs, deterministic) -> actions
    agent.state_dict() / agent.load_state_dict(state)
    agent_cls.for_evaluation(env, cfg, runtime) -> an agent that only acts (no training buffers)
    agent_cls.RANK_LOCAL_STATE: state_dict keys that differ between torchrun workers
    agent_cls.RANK_SHARD_STATE: the large ones among them, which each worker writes to a file of its own

Under torchrun (workbench.distributed) every rank builds the same Trainer: each steps its own envs
(seeds offset per rank), the agents average gradients, and rank 0 alone writes the run directory,
TensorBoard, checkpoints and evaluations. A checkpoint holds rank 0's agent state plus every rank's
own part (RANK_LOCAL_STATE and RNG states), so `--resume` puts each rank back where it was; a rank's
RANK_SHARD_STATE (Rainbow's replay with --save-replay) goes to ranks/rank-<r>.step-<steps>.pt, written
by that rank, instead of travelling to rank 0 (N replays in one process's memory).

Beside its TensorBoard events a run leaves its configuration (TEXT tab `config`, and the HPARAMS tab), the
uniform random policy's return on the final evaluation's episodes (`test/random_policy_return`, metrics.json's
`test_random_policy`: the floor the test return is read against) and learning_curve.png (train and test return
against env steps, with the floor), drawn from the event files so that a resumed run's curve is whole.

Checkpoints are written at the end of every `checkpoint_interval` iterations, at the end of the run and
when a stop is requested (Ctrl-C, SIGTERM). A run that fails (an error on any rank) writes nothing more:
the last checkpoint stays as it was, and under torchrun the failed rank leaves at once instead of
entering a collective the others will never join.
"""

from __future__ import annotations

import dataclasses
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from envs.procgen import PROTOCOLS, ProcgenVecEnv, check_game, visual_options
from workbench.checkpoint import LATEST, CheckpointError, load_checkpoint, save_checkpoint
from workbench.distributed import init_distributed
from workbench.logging import RunLogger, default_run_name, plot_learning_curve, read_scalars, run_logger, write_json
from workbench.runtime import Runtime, rng_state, seed_everything, set_rng_state

from .algorithms import ALGORITHMS
from .evaluate import evaluate, evaluate_random_policy
from .feature_stats import STATS_FRAMES
SHARD_DIR, SHARD_KIND = "ranks", "procgen-agent-shard"  # the torchrun workers' own large state
REGULARIZERS = ("none", "cutout_color", "random_crop", "random_conv", "l2", "batchnorm")
LEARNING_CURVE = "learning_curve.png"  # beside the TensorBoard events: train and test return against env steps


@dataclass
class TrainConfig:
    env: str = "starpilot"
    algo: str = "ppo"
    protocol: str = "easy-200"
    total_steps: int = 102_400      # the quick Procgen job's budget (the CLI's defaults: impala_half, 16 x 128)
    seed: int = 0
    device: str = "auto"
    precision: str = "auto"
    compile: bool = False
    visual: list = field(default_factory=list)
    num_test_envs: int = 64
    eval_interval: int = 10         # iterations between evaluations on unseen levels
    eval_episodes: int = 100        # per evaluation: 32 leave a standard error near 0.5 on starpilot, as large
                                    # as the quick Procgen job's margin over random play
    eval_clean_frames: bool = False  # network randomisation: test on clean frames, not through random kernels
    video: bool = True
    checkpoint_interval: int = 1    # iterations between checkpoints
    snapshot_interval: int = 0      # env steps between kept snapshots (snapshots/checkpoint-<steps>.pt); 0 = none
    # PPO: frames of the finished agent's own play on its training levels whose unit statistics the checkpoint
    # keeps (BUFR's source record, agents.feature_stats); 0 = none
    feature_stats_frames: int = STATS_FRAMES
    run_dir: str = ""               # empty: a new, time-stamped directory under runs_root
    runs_root: str = "runs"
    progress: bool = True
    agent: dict = field(default_factory=dict)  # the algorithm's own config (e.g. PPOConfig fields)

    def __post_init__(self):
        check_game(self.env)
        if self.algo not in ALGORITHMS:
            raise ValueError(f"unknown algorithm {self.algo!r}: choose one of {', '.join(ALGORITHMS)}")
        if self.protocol not in PROTOCOLS:
            raise ValueError(f"unknown protocol {self.protocol!r}: choose one of {', '.join(PROTOCOLS)}")
        visual_options(self.visual)
        if self.total_steps <= 0:
            raise ValueError(f"--total-steps must be positive, got {self.total_steps}")


def apply_regularizer(agent_cfg: dict, regularizer: str, l2_coef: float, algo: str = "ppo") -> dict:
    """Translate the paper's comparison regularisers into agent config fields."""
    if regularizer not in REGULARIZERS:
        raise ValueError(f"unknown regularizer {regularizer!r}: choose one of {', '.join(REGULARIZERS)}")
    fields = {f.name for f in dataclasses.fields(ALGORITHMS[algo][1])} if algo in ALGORITHMS else set()
    needs = {"l2": "l2_coef", "batchnorm": "backbone_kwargs"}.get(regularizer, "augment")
    if regularizer != "none" and needs not in fields:
        raise ValueError(f"--regularizer {regularizer} is not available for {algo}: PPO has all of "
                         f"{', '.join(REGULARIZERS[1:])}; Rainbow has l2 and batchnorm")
    cfg = dict(agent_cfg)
    if regularizer in ("cutout_color", "random_crop", "random_conv"):
        cfg["augment"] = regularizer
    elif regularizer == "l2":
        cfg["l2_coef"] = l2_coef
    elif regularizer == "batchnorm":
        cfg["backbone_kwargs"] = {**cfg.get("backbone_kwargs", {}), "batch_norm": True}
    return cfg


class StopFlag:
    """First SIGINT/SIGTERM asks the run to checkpoint and stop; a second SIGINT aborts at once."""

    def __init__(self):
        self.requested = False
        self.signum: int | None = None
        self._previous = {}

    def __call__(self) -> bool:
        return self.requested

    def _handle(self, signum, frame):
        if self.requested and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.requested, self.signum = True, signum
        print(f"\n{signal.Signals(signum).name} received: saving a checkpoint and stopping "
              f"(press Ctrl-C again to abort without saving)", flush=True)

    def __enter__(self):
        for sig in (signal.SIGINT, signal.SIGTERM):
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def effective_batch(agent_cfg, world_size: int) -> dict:
    """What one gradient step sees, summed over the workers of a torchrun job."""
    out = {"envs": agent_cfg.num_envs * world_size}
    if hasattr(agent_cfg, "num_steps"):  # PPO
        out.update(rollout_batch=agent_cfg.batch_size * world_size, minibatch=agent_cfg.minibatch_size * world_size)
    else:  # Rainbow: every worker samples its own replay batch
        out.update(replay_batch=agent_cfg.batch_size * world_size)
    return out


class Trainer:
    def __init__(self, cfg: TrainConfig, resume_state: dict | None = None):
        self.cfg = cfg
        self.protocol = PROTOCOLS[cfg.protocol]
        self.dist = init_distributed(cfg.device)
        run_dir = cfg.run_dir or str(Path(cfg.runs_root) / default_run_name(
            cfg.env, cfg.algo + ("-mixreg" if cfg.agent.get("mixreg") else ""), f"s{cfg.seed}"))
        self.run_dir = Path(self.dist.gather_objects(run_dir)[0])  # rank 0's name (time stamps may differ)
        self.runtime = Runtime.create(cfg.device, cfg.precision, cfg.compile, distributed=self.dist)
        seed_everything(self.dist.seed(cfg.seed))
        agent_cls, agent_cfg_cls = ALGORITHMS[cfg.algo]
        self.agent_cfg = agent_cfg_cls(**cfg.agent)
        if hasattr(self.agent_cfg, "total_steps"):  # schedules that anneal over the run (Rainbow's IS exponent)
            self.agent_cfg = dataclasses.replace(self.agent_cfg, total_steps=cfg.total_steps)
        # A resumed run draws new training episodes: Procgen levels cannot be re-seeded mid-run.
        iterations_done = resume_state["agent"]["iterations"] if resume_state else 0
        self.env = ProcgenVecEnv(cfg.env, self.agent_cfg.num_envs, self.protocol.distribution_mode,
                                 self.protocol.num_levels, self.protocol.start_level, self.runtime.device,
                                 seed=self.dist.seed(cfg.seed + 1000 * iterations_done), **visual_options(cfg.visual))
        self.agent = agent_cls(self.env, self.agent_cfg, self.runtime)
        self.saved_at: int | None = None  # env steps of the latest checkpoint this Trainer wrote
        self.feature_statistics: dict | None = None   # measured when the run finishes (BUFR's source record)
        if resume_state is not None:
            self.agent.load_state_dict(resume_state["agent"])
            set_rng_state(resume_state["rng"])

    @classmethod
    def resume(cls, run_dir: str | Path, total_steps: int | None = None, progress: bool = True) -> "Trainer":
        """Every rank reads the checkpoint and takes the shared state plus its own rank's part."""
        state = load_checkpoint(Path(run_dir) / LATEST, kind="procgen-agent")
        config = dict(state["config"], run_dir=str(run_dir), progress=progress)
        if total_steps is not None:
            config["total_steps"] = total_steps
        agent_state, rng = state["agent_state"], state["rng"]
        saved_world, dist = state.get("world_size", 1), init_distributed(config["device"])
        if saved_world != dist.world_size:
            raise CheckpointError(
                f"{run_dir} was trained by {saved_world} process(es) but this run has {dist.world_size}: resume it "
                + ("without torchrun" if saved_world == 1 else f"with torchrun --nproc-per-node {saved_world} "
                   "(in total, over all nodes)"))
        if "ranks" in state:  # a torchrun run: this rank's own part, and its shard file
            mine = state["ranks"][dist.rank]
            agent_state, rng = {**agent_state, **mine["agent_state"]}, mine["rng"]
            if mine.get("shard"):
                shard = load_checkpoint(Path(run_dir) / mine["shard"], kind=SHARD_KIND)
                agent_state.update(shard["agent_state"])
        return cls(TrainConfig(**config), resume_state={"agent": agent_state, "rng": rng})

    def save(self) -> Path | None:
        """The latest checkpoint; under torchrun every rank calls it: its own small part travels to rank 0,
        its RANK_SHARD_STATE goes to a file it writes itself."""
        agent_state, self.saved_at = self.agent.state_dict(), self.agent.env_steps
        if not self.dist.enabled:
            return save_checkpoint(self.run_dir / LATEST, "procgen-agent", self._payload(agent_state))
        shard = {k: agent_state.pop(k) for k in getattr(self.agent, "RANK_SHARD_STATE", ()) if k in agent_state}
        shard_path = self._save_shard(shard) if shard else None
        own = {"agent_state": {k: agent_state[k] for k in getattr(self.agent, "RANK_LOCAL_STATE", ())
                               if k in agent_state}, "rng": rng_state(),
               "shard": None if shard_path is None else str(shard_path.relative_to(self.run_dir))}
        payload = self._payload(agent_state)
        payload["ranks"] = self.dist.gather_objects_to_main(own)  # every shard is written by now
        path = save_checkpoint(self.run_dir / LATEST, "procgen-agent", payload) if self.dist.is_main else None
        if shard_path is not None:
            self.dist.barrier()  # the checkpoint that names the new shards is written: the older ones can go
            for old in shard_path.parent.glob(f"rank-{self.dist.rank}.step-*.pt"):
                if old != shard_path:
                    old.unlink()
        return path

    def _save_shard(self, shard: dict) -> Path:
        """This rank's large own state, in a file named by its step (the checkpoint in place still names the
        previous one, which stays until the new checkpoint is written)."""
        path = self.run_dir / SHARD_DIR / f"rank-{self.dist.rank}.step-{self.agent.env_steps}.pt"
        return save_checkpoint(path, SHARD_KIND, {"rank": self.dist.rank, "env_steps": self.agent.env_steps,
                                                  "agent_state": shard})

    def save_snapshot(self) -> Path | None:
        """Keep this moment of the run for later evaluation (rank 0's state; the replay stays out, it can be
        GiBs). Snapshots are for evaluation; runs resume from the latest checkpoint."""
        if not self.dist.is_main:
            return None
        agent_state = {k: v for k, v in self.agent.state_dict().items() if k != "replay"}
        return save_checkpoint(self.run_dir / "snapshots" / f"checkpoint-{self.agent.env_steps}.pt",
                               "procgen-agent", self._payload(agent_state))

    def _payload(self, agent_state: dict) -> dict:
        payload = {"algo": self.cfg.algo, "config": dataclasses.asdict(self.cfg), "agent_state": agent_state,
                   "rng": rng_state(), "world_size": self.dist.world_size}
        if self.feature_statistics is not None:
            payload["feature_statistics"] = self.feature_statistics
        return payload

    @property
    def keeps_feature_statistics(self) -> bool:
        """PPO agents (the ones adapted through their policy head) keep BUFR's statistics when they finish."""
        return self.cfg.feature_stats_frames > 0 and hasattr(getattr(self.agent, "model", None), "policy_head")

    def measure_feature_statistics(self) -> dict:
        from .feature_stats import source_statistics

        return source_statistics(self.agent, self.cfg.env, self.cfg.visual, self.cfg.protocol,
                                 self.cfg.feature_stats_frames, seed=self.cfg.seed)

    @property
    def test_episodes(self) -> dict:
        """Where every test evaluation plays (the agent's and the random floor's): envs and env seed."""
        return {"num_envs": min(self.cfg.num_test_envs, self.cfg.eval_episodes), "seed": self.cfg.seed + 12345}

    def evaluate(self, logger: RunLogger | None = None, record_video: bool = False) -> dict:
        where = self.test_episodes
        test_env = ProcgenVecEnv(self.cfg.env, where["num_envs"], self.protocol.distribution_mode, num_levels=0,
                                 start_level=0, device=self.runtime.device, seed=where["seed"],
                                 **visual_options(self.cfg.visual))
        result = evaluate(self.agent, test_env, self.cfg.eval_episodes, record_video=record_video,
                          clean_frames=self.cfg.eval_clean_frames, seed=where["seed"])
        step = self.agent.env_steps
        if logger is not None:
            logger.scalars("test", {"episode_return": result["mean_return"],
                                    "normalized_score": result["normalized_score"]}, step)
            if record_video:
                logger.video("test/video", result["video"], step)
        result.pop("video", None)
        return result

    def random_floor(self) -> dict:
        """The uniform random policy on the very episodes `evaluate` plays (the same envs, levels and env seed;
        each env's first episode): the floor the test return is read against. Cheap: no network."""
        return evaluate_random_policy(self.cfg.env, self.cfg.eval_episodes, **self.test_episodes,
                                      distribution_mode=self.protocol.distribution_mode, visual=self.cfg.visual)

    def write_learning_curve(self, floor: dict | None = None) -> Path:
        """learning_curve.png in the run directory, from its TensorBoard events (a resumed run's whole curve)."""
        points = read_scalars(self.run_dir, ("train/episode_return", "test/episode_return"))
        cfg = self.cfg
        return plot_learning_curve(
            self.run_dir / LEARNING_CURVE,
            {"train return (training levels)": points["train/episode_return"],
             f"test return ({cfg.eval_episodes} episodes, unseen levels)": points["test/episode_return"]},
            {f"uniform random policy, same test episodes ({floor['mean_return']:.2f})": floor["mean_return"]}
            if floor else None,
            title=f"{cfg.algo}{' + mixreg' if getattr(self.agent_cfg, 'mixreg', False) else ''} on {cfg.env} "
                  f"({cfg.protocol}), seed {cfg.seed}")

    def _log_iteration(self, logger: RunLogger, metrics: dict, steps_before: int, seconds: float,
                       recent_returns: list[float]) -> list[float]:
        """TensorBoard scalars of one iteration; returns the last 100 training-episode returns."""
        step = self.agent.env_steps
        returns, lengths = self.env.stats.drain()
        if self.dist.enabled:  # every worker's finished episodes
            every = self.dist.gather_objects((returns, lengths))
            returns, lengths = [r for rs, _ in every for r in rs], [n for _, ns in every for n in ns]
        recent_returns = (recent_returns + returns)[-100:]
        if returns:
            mean = float(np.mean(returns))
            logger.scalars("train", {"episode_return": mean, "episode_length": float(np.mean(lengths)),
                                     "normalized_score": self.env.normalized_score(mean)}, step)
        logger.scalars("losses", metrics, step)
        sps = (step - steps_before) / seconds
        logger.scalars("perf", {"steps_per_second": sps, "learning_rate": self.agent.learning_rate}, step)
        logger.advance(step - steps_before, train_return=np.mean(recent_returns) if recent_returns else 0.0,
                       sps=sps)
        return recent_returns

    def run(self) -> dict:
        cfg, agent, dist = self.cfg, self.agent, self.dist
        if dist.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            write_json(self.run_dir / "config.json", {
                **dataclasses.asdict(cfg), "agent_resolved": dataclasses.asdict(self.agent_cfg),
                "runtime": {"device": str(self.runtime.device), "precision": self.runtime.precision_name},
                "distributed": {"world_size": dist.world_size,
                                "effective_batch": effective_batch(self.agent_cfg, dist.world_size)}})
        # A resumed run drops the events logged after its checkpoint (TensorBoard purges steps >= purge_step);
        # those of the checkpoint's own step were logged before it was written, and stay.
        logger = run_logger(dist.is_main, self.run_dir, total=cfg.total_steps, initial=agent.env_steps,
                            progress=cfg.progress, desc=f"{cfg.algo} {cfg.env}",
                            purge_step=agent.env_steps + 1 if agent.env_steps else None)
        logger.config({**dataclasses.asdict(cfg), "agent": dataclasses.asdict(self.agent_cfg)},
                      metrics=("test/episode_return", "train/episode_return"), step=agent.env_steps)
        recent_returns: list[float] = []
        last_test = None
        interrupted, stop_signal = False, None
        start_steps, start_time = agent.env_steps, time.time()
        try:  # an error skips the final checkpoint: the last one written stays as it was
            with StopFlag() as stop:
                # Workers must stop together (they meet in every gradient all-reduce): under torchrun a stop
                # request ends the run at the next iteration boundary, agreed on by all ranks.
                agent_stop = (lambda: False) if dist.enabled else stop
                while agent.env_steps < cfg.total_steps and not dist.any(stop()):
                    t0, s0 = time.time(), agent.env_steps
                    metrics = agent.train_iteration(agent_stop)
                    if metrics is None:
                        break
                    recent_returns = self._log_iteration(logger, metrics, s0, time.time() - t0, recent_returns)
                    evaluation_due = agent.iterations % cfg.eval_interval == 0 or agent.env_steps >= cfg.total_steps
                    if evaluation_due and dist.is_main:
                        last_test = self.evaluate(logger, record_video=cfg.video)
                        logger.write(f"step {agent.env_steps}: test return {last_test['mean_return']:.2f} "
                                     f"(normalised {last_test['normalized_score']:.3f}) over "
                                     f"{last_test['episodes']} episodes on unseen levels")
                    if agent.iterations % cfg.checkpoint_interval == 0:
                        self.save()
                    if cfg.snapshot_interval and agent.env_steps // cfg.snapshot_interval > s0 // cfg.snapshot_interval:
                        self.save_snapshot()  # this iteration crossed a multiple of the interval
                interrupted, stop_signal = dist.any(stop()), stop.signum
            if not interrupted and agent.env_steps >= cfg.total_steps and self.keeps_feature_statistics:
                if dist.is_main:   # then saved again, with them (every rank takes part in a torchrun save)
                    self.feature_statistics = self.measure_feature_statistics()
                self.saved_at = None
            if self.saved_at != agent.env_steps:  # not already saved by the last iteration (a replay can be GiBs)
                self.save()
            floor = self.random_floor() if last_test is not None and dist.is_main else None
            if floor is not None:
                logger.scalars("test", {"random_policy_return": floor["mean_return"]}, agent.env_steps)
        finally:
            logger.close()
        if dist.is_main:
            self.write_learning_curve(floor)
        elapsed = time.time() - start_time
        metrics = {"env": cfg.env, "algo": cfg.algo, "mixreg": bool(getattr(self.agent_cfg, "mixreg", False)),
                   "seed": cfg.seed, "env_steps": agent.env_steps, "iterations": agent.iterations,
                   "interrupted": interrupted, "stop_signal": stop_signal, "wall_seconds": elapsed,
                   "steps_per_second": (agent.env_steps - start_steps) / max(elapsed, 1e-9),
                   "precision": self.runtime.precision_name, "device": str(self.runtime.device),
                   "train_mean_return_last100": float(np.mean(recent_returns)) if recent_returns else None,
                   "test": last_test, "test_random_policy": floor, "world_size": dist.world_size}
        if dist.is_main:
            write_json(self.run_dir / "metrics.json", metrics)
        return metrics
