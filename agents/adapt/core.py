"""Source-free adaptation of a trained Procgen agent to an unseen visual domain: the shared frame.

The PPO agent's network is SHOT's split with actions for classes: the encoder phi (the registry backbone,
256-d features) plays F, the policy head pi (a linear layer over the 15 actions) plays the frozen hypothesis
C. The target domain is the same game rendered with other assets (`--visual` variants; the levels and the
physics stay, but for restrict-themes' sprite-sized hitboxes: paired_frames). Without rewards, an adapter
sees:

- transitions of the target domain, played by the frozen source policy (or uniformly random actions):
  frames, the action taken and the next frame, kept every `frame_stride`-th step of play so that they
  span whole episodes rather than their first steps (TargetFrames);
- the source domain as a simulator: the source policy's own rollouts in the source visuals (for the
  action marginal the entropy-safe IM keeps, or feature statistics).

Each method is a module of this package with `adapt(adapter, frames, logger) -> list[dict]` (one dict
of statistics per epoch), named in METHOD_MODULES. Only phi is trained by every method here (PAD: phi and
its inverse-dynamics head): the policy and value heads stay as they were. A method that reads no policy head
(PAD) names the agents it adapts in its SOURCE_ALGOS (Rainbow too: the adapter's `model` is then its online
network).

What adaptation does to the policy is measured on paired states (`paired_steps`): the source policy
plays the source visuals and a copy of the same levels in the target visuals is stepped with its actions
(an env that falls out of step, as restrict-themes' hitboxes now and then make it, is dropped from then
on: paired_frames), states kept every `frame_stride`-th step over whole episodes; on those states, the
total-variation and Jensen-Shannon distances from the source policy on its own frames to the source and
to the adapted policy on the target frames, their argmax agreement and entropy.

An offline method writes train-state.pt after every epoch (weights, optimizer, statistics, random
generators, the evaluation before adapting); `resume` continues an interrupted run from it, to the same
weights an uninterrupted run reaches, and the finished run deletes it.

The result is an ordinary Procgen checkpoint (the source run's, with the adapted encoder), whose config
names the target's visual options, so `scripts/evaluate_procgen.py RUN` plays it in the target domain and
`--visual` (empty) in the source domain.
"""

from __future__ import annotations

import copy
import dataclasses
import importlib
import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from envs.procgen import GAMES, PROTOCOLS, ProcgenVecEnv, domain_name, visual_options
from workbench.adapt.information import DIVERSITY_PRIORS
from workbench.checkpoint import CheckpointError, load_checkpoint, resolve_checkpoint_path, save_checkpoint
from workbench.logging import RunLogger, check_same_settings, default_run_name, write_json
from workbench.runtime import RunSettings, Runtime, rng_state, seed_everything, set_rng_state

from ..evaluate import SPLITS, split_levels
from ..inverse_dynamics import PAD_BATCH_SIZE, PAD_LR
from ..rollouts import FRAME_STRIDE, TargetFrames, collect_frames

# method -> module of this package holding its `adapt(adapter, frames, logger)`
METHOD_MODULES = {"shot-im": "shot", "shot": "shot", "anchored-im": "anchored", "bufr": "bufr", "pad": "pad"}
METHODS = tuple(METHOD_MODULES)
COLLECT_POLICIES = ("source", "random")
FRAMES_FILE = "frames.npz"
ADAPT_STATE, ADAPT_STATE_KIND = "train-state.pt", "procgen-adaptation-state"
# SHOT's image settings (object/image_target.py): lr 0.01 with the pretrained encoder at 0.1x, beta 0.3
LR, ENCODER_LR_MULT, BETA = 1e-2, 0.1, 0.3
# epochs, batch size and lr where the method's own differ from SHOT's (BUFR: epochs per block, agents.adapt.bufr)
TRAINING_DEFAULTS = {"bufr": dict(epochs=30, batch_size=256, lr=1e-4),   # the official 30 per block, batch 256
                     # PAD: its training batch (src/arguments.py L19) and Adam lr (L42, L49); epochs as SHOT's
                     "pad": dict(epochs=15, batch_size=128, lr=PAD_LR)}
SHOT_TRAINING = dict(epochs=15, batch_size=64, lr=LR)
PAIRED_ENVS = 32
EVAL_ENVS = 64   # envs of the evaluation episodes of both domains (and online PAD's); their levels: --eval-split


def parse_procgen_target(spec: str) -> tuple[str, list[str]]:
    """`procgen:<game>[:<option>+<option>...]` -> (game, visual options)."""
    parts = spec.split(":")
    if parts[0] != "procgen" or len(parts) not in (2, 3) or not parts[1]:
        raise ValueError(f"bad Procgen target {spec!r}: write procgen:<game>[:<visual options joined by +>], e.g. "
                         "procgen:starpilot:no-backgrounds+monochrome")
    game, options = parts[1], parts[2].split("+") if len(parts) == 3 and parts[2] else []
    if game not in GAMES:
        raise ValueError(f"unknown Procgen game {game!r} in {spec!r}: choose one of {', '.join(GAMES)}")
    visual_options(options)  # names checked, with the list of valid ones in the error
    return game, options


@dataclass
class ProcgenAdaptConfig(RunSettings):
    source: str = ""                      # a Procgen run directory (or its checkpoint.pt)
    target: str = ""                      # procgen:<game>[:<visual options>]
    method: str = "shot"
    frames: int = 8192                    # target frames collected per collection
    num_envs: int = 64
    frame_stride: int = FRAME_STRIDE      # keep every n-th step of play (target frames and paired states)
    collect_policy: str = "source"        # the frozen source policy, or uniformly random actions
    frames_file: str | None = None        # adapt on these saved frames instead of collecting
    recollect: bool = False               # collect again with the adapted policy before every epoch
    epochs: int | None = None             # default: the method's (TRAINING_DEFAULTS), else SHOT's 15
    batch_size: int | None = None         # likewise (SHOT's 64)
    lr: float | None = None               # likewise (SHOT's 1e-2)
    encoder_lr_mult: float = ENCODER_LR_MULT
    beta: float = BETA                    # set to 0 for shot-im
    diversity_prior: str = "uniform"      # SHOT's uniform action marginal, or the source policy's own on the frames
    weight_decay: float = 1e-3
    eval_episodes: int = 100              # per domain, before and after; 0 skips the evaluation
    eval_split: str = "test"              # on the test episodes, or the validation levels (to choose a method on)
    paired_steps: int = 64                # kept steps x 32 envs: states seen in both visuals; 0 skips
    cluster_backend: str = "auto"
    # anchored-im (the entropy-safe IM, agents.adapt.anchored)
    anchor_weight: float = 1.0            # lambda on KL(pi_0 || pi_theta); our choice, made before any run
    source_frames: int = 4096             # source-visual frames of the source policy, for its action marginal
    # pad (PAD's inverse-dynamics adaptation, agents.adapt.pad; epochs, batch size and lr: TRAINING_DEFAULTS)
    pad_online: bool = False              # play the target evaluation episodes, adapting during each (PAD's eval)
    pad_batch_size: int = PAD_BATCH_SIZE  # online: augmented copies of each transition per step (PAD's 32)
    pad_keep_fc: bool | None = None       # leave the encoder's dense layer (what the policy reads) as trained, so
                                          # only the conv trunk adapts, as PAD's policy keeps its own projection;
                                          # None: keep it where the encoder has one (resolved by pad.check_source)
    resume: bool = False                  # continue the run in run_dir after its last finished epoch

    def __post_init__(self):
        if self.method not in METHODS:
            raise ValueError(f"unknown method {self.method!r} for a Procgen agent: choose {' or '.join(METHODS)}")
        if self.collect_policy not in COLLECT_POLICIES:
            raise ValueError(f"unknown --collect-policy {self.collect_policy!r}: choose source or random")
        if self.method == "shot-im":  # information maximisation alone, no pseudo-label term
            self.beta = 0.0
        for name, value in TRAINING_DEFAULTS.get(self.method, SHOT_TRAINING).items():
            if getattr(self, name) is None:
                setattr(self, name, value)
        if self.diversity_prior not in DIVERSITY_PRIORS:
            raise ValueError(f"unknown diversity prior {self.diversity_prior!r}: choose uniform or initial")
        if self.frames < 1 or self.epochs < 1 or self.frame_stride < 1:
            raise ValueError("--frames, --epochs and --frame-stride must be positive")
        if self.frames_file and self.recollect:
            raise ValueError("--frames-file and --recollect exclude each other: saved frames cannot be re-collected")
        if self.resume and not self.run_dir:
            raise ValueError("--resume continues the run in --out: give its folder")
        if self.pad_keep_fc is not None and self.method != "pad":
            raise ValueError("--pad-keep-fc and --no-pad-keep-fc are PAD's: use them with --method pad")
        if self.eval_split not in SPLITS:
            raise ValueError(f"unknown --eval-split {self.eval_split!r}: choose {' or '.join(SPLITS)}")
        if self.pad_online and (self.method != "pad" or self.eval_episodes < 1):
            raise ValueError("--online is PAD's: use it with --method pad and --eval-episodes > 0 (the episodes it "
                             "plays)")


def load_source_agent(path, game: str, runtime: Runtime, algos: tuple[str, ...] = ("ppo",)):
    """(agent that acts with the source weights, the checkpoint) for adapting to `game`; `algos`: the agents
    the method can adapt (PPO only, unless it needs no policy head)."""
    from ..algorithms import ALGORITHMS

    ckpt_path = resolve_checkpoint_path(path)
    state = load_checkpoint(ckpt_path, kind="procgen-agent")
    config = state["config"]
    if config["algo"] not in algos:
        raise CheckpointError(f"{ckpt_path} holds a {config['algo']} agent: source-free adaptation over actions "
                              "needs a policy head (a PPO agent); train the source with --algo ppo")
    if config["env"] != game:
        raise ValueError(f"the source agent was trained on {config['env']} but the target is {game}: adapt to "
                         f"procgen:{config['env']}[:<visual options>] (the actions mean different things per game)")
    agent_cls, agent_cfg_cls = ALGORITHMS[config["algo"]]
    env = ProcgenVecEnv(game, 1, device=runtime.device)
    agent = agent_cls.for_evaluation(env, agent_cfg_cls(**config["agent"]), runtime)
    agent.load_state_dict(state["agent_state"])
    actions = agent.model.policy_head.out_features if agent.kind == "ppo" else agent.online.num_actions
    if actions != env.num_actions:
        raise ValueError(f"the source policy has {actions} actions but procgen:{game} has "
                         f"{env.num_actions}: the checkpoint does not belong to this game's action space")
    return agent, state, ckpt_path


@torch.no_grad()
def features_and_policy(model, frames: torch.Tensor, runtime: Runtime, batch: int = 512):
    """Encoder features (N, 256) and action probabilities (N, A) of uint8 frames, in eval mode."""
    model.eval()
    feats, probs = [], []
    for start in range(0, len(frames), batch):
        logits, _, f = model(runtime.images(frames[start:start + batch]), with_features=True)
        feats.append(f.float().cpu())
        probs.append(logits.float().softmax(1).cpu())
    return torch.cat(feats), torch.cat(probs)


def policy_entropy(probs: torch.Tensor) -> float:
    """Mean entropy of the rows of `probs`, in nats (0 log 0 = 0)."""
    return float(-torch.special.xlogy(probs, probs).sum(1).mean())


def paired_frames(agent, game: str, source_options: list[str], target_options: list[str], kept_steps: int,
                  num_envs: int, seed: int, distribution_mode: str,
                  stride: int = FRAME_STRIDE) -> tuple[torch.Tensor, torch.Tensor, int]:
    """The same states rendered in both domains: the agent plays the source visuals, and a copy of the same
    levels in the target visuals is stepped with its actions; every `stride`-th step is kept, `kept_steps`
    times, so the states span whole episodes. The visual options leave the levels and the physics alone, with
    one exception: restrict-themes draws every entity with its first theme's sprite, and some games size an
    entity's hitbox by its sprite's aspect ratio (BasicAbstractGame::fit_aspect_ratio), so now and then a
    collision happens in one rendering and not in the other. An env whose rewards or episode ends ever
    differ has fallen out of step: its states from then on are left out (the states before, the first one
    at least, were the same in both). Returns the source frames, the target frames and the number of envs
    that fell out of step."""
    envs = [ProcgenVecEnv(game, num_envs, distribution_mode, num_levels=0, start_level=0, device=agent.rt.device,
                          seed=seed, **visual_options(options)) for options in (source_options, target_options)]
    obs = envs[0].reset()
    envs[1].reset()
    source, target = [], []
    in_step = np.ones(num_envs, dtype=bool)
    with torch.random.fork_rng(devices=[]):  # the same states for every run with this seed
        torch.manual_seed(seed)
        for step in range(kept_steps * stride):
            if step % stride == 0:
                source.append(envs[0].last_frames[in_step])
                target.append(envs[1].last_frames[in_step])
            actions = agent.act(obs).cpu().numpy()
            (_, r0, d0), (_, r1, d1) = (env.step_numpy(actions) for env in envs)
            in_step &= (r0 == r1) & (d0 == d1)
            if not in_step.any():
                break
            obs = envs[0].as_tensor(envs[0].last_frames)
    fell_out = int(num_envs - in_step.sum())
    return torch.from_numpy(np.concatenate(source)), torch.from_numpy(np.concatenate(target)), fell_out


def policy_divergence(reference: torch.Tensor, probs: torch.Tensor) -> dict:
    """How far a policy on the target frames is from the source policy on the same states in the source
    visuals, per state and averaged: total variation 1/2 sum |p - q| (in [0, 1]), Jensen-Shannon divergence
    in nats (in [0, ln 2]; finite where either policy gives an action no mass, unlike the KL), argmax
    agreement, and the policy's own mean entropy in nats."""
    mixture = (reference + probs) / 2
    kl_to_mixture = lambda p: (torch.special.xlogy(p, p) - torch.special.xlogy(p, mixture)).sum(1)  # noqa: E731
    return {"tv_from_source_policy": float(0.5 * (reference - probs).abs().sum(1).mean()),
            "js_from_source_policy": float((0.5 * kl_to_mixture(reference) + 0.5 * kl_to_mixture(probs)).mean()),
            "argmax_agreement": float((reference.argmax(1) == probs.argmax(1)).float().mean()),
            "policy_entropy": policy_entropy(probs)}


@dataclass
class Progress:
    """Where a method's epochs start: the number finished, their statistics, the optimizer's state and the
    method's own counters (`extra`)."""
    epochs: int = 0
    history: list = field(default_factory=list)
    optimizer: dict | None = None
    extra: dict = field(default_factory=dict)


class ProcgenAdapter:
    def __init__(self, cfg: ProcgenAdaptConfig):
        self.cfg = cfg
        seed_everything(cfg.seed)
        self.game, self.options = parse_procgen_target(cfg.target)
        self.rt = Runtime.create(cfg.device, "fp32")
        module = self.method_module()
        self.agent, self.source_state, self.source_path = load_source_agent(
            cfg.source, self.game, self.rt, getattr(module, "SOURCE_ALGOS", ("ppo",)))
        self.model = self.agent.model if self.agent.kind == "ppo" else self.agent.online   # Rainbow: its online net
        self._source_model = copy.deepcopy(self.model).requires_grad_(False)   # pi_0, as loaded
        self.mode = PROTOCOLS[self.source_state["config"]["protocol"]].distribution_mode
        self.run_dir = Path(cfg.run_dir or Path("runs") / default_run_name("adapt-procgen", self.game, cfg.method,
                                                                            f"s{cfg.seed}"))
        if hasattr(module, "check_source"):   # what the method needs of the source (PAD: its inverse-dynamics head)
            module.check_source(self)
        # False where the method plays the target itself (online PAD): no frames are collected
        self.uses_target_frames = getattr(module, "uses_target_frames", lambda cfg: True)(cfg)
        self.resumed = self.state_to_resume() if cfg.resume else None
        self.before: dict = {}   # the measurements before adapting, kept in train-state.pt
        self.start = time.time()

    def state_to_resume(self) -> dict:
        """The run_dir's train-state.pt, checked: an unfinished run of this method with these settings."""
        path = self.run_dir / ADAPT_STATE
        if (self.run_dir / "metrics.json").exists():
            raise ValueError(f"{self.run_dir} holds a finished run (metrics.json): nothing to resume; pass "
                             f"--overwrite to run it again, or another --out")
        if not path.exists():
            raise ValueError(f"{self.run_dir} has no {ADAPT_STATE} to resume from (the run stopped within its first "
                             f"epoch, or it played online): run it again with --overwrite")
        check_same_settings(self.run_dir, self.cfg, ignored=("resume", "source"))
        written = json.loads((self.run_dir / "config.json").read_text())["source"]
        try:   # the same checkpoint, however its path is written (relative or not)
            same = resolve_checkpoint_path(written).resolve() == Path(self.source_path).resolve()
        except CheckpointError:
            same = False
        if not same:
            raise ValueError(f"{self.run_dir} was adapting {written}, not {self.cfg.source}: resume it with the same "
                             f"--source")
        return load_checkpoint(path, kind=ADAPT_STATE_KIND)

    def resume_point(self, optimizer: torch.optim.Optimizer | None = None) -> Progress:
        """Where the method's epochs start (call it just before them): after the last finished epoch of the
        run being resumed, with its weights, random generators and `optimizer`'s state put back, else at
        the first. A method with an optimizer per stage (BUFR) passes none and loads Progress.optimizer."""
        if self.resumed is None:
            return Progress()
        state = self.resumed
        self.model.load_state_dict(state["model"])
        if optimizer is not None:
            optimizer.load_state_dict(state["optimizer"])
        set_rng_state(state["rng"])
        return Progress(state["epochs"], list(state["history"]), state["optimizer"], dict(state["extra"]))

    def epoch_finished(self, history: list[dict], optimizer: torch.optim.Optimizer, **extra) -> None:
        """Write train-state.pt after an epoch (`history` holds every epoch's statistics so far): what
        resume_point gives back after an interruption."""
        save_checkpoint(self.run_dir / ADAPT_STATE, ADAPT_STATE_KIND, {
            "method": self.cfg.method, "epochs": len(history), "history": history, "model": self.model.state_dict(),
            "optimizer": optimizer.state_dict(), "extra": extra, "rng": rng_state(), "before": self.before,
            "wall_seconds": time.time() - self.start})

    def target_frames(self, epoch: int) -> TargetFrames:
        """Transitions of the target domain: the saved ones, or collected (epoch > 0: again, for --recollect,
        by the policy as adapted so far)."""
        cfg = self.cfg
        if cfg.frames_file:
            return TargetFrames.load(cfg.frames_file, self.game)
        if epoch == 0 and self.resumed is not None:   # the frames the interrupted run collected first
            return TargetFrames.load(self.run_dir / FRAMES_FILE, self.game)
        frames = collect_frames(self.agent, self.game, self.options, cfg.frames, cfg.num_envs, cfg.collect_policy,
                                cfg.seed + 1000 * epoch, self.mode, cfg.frame_stride)
        if epoch == 0:  # what the run adapted on first, to repeat the experiment with --frames-file
            frames.save(self.run_dir / FRAMES_FILE, game=self.game, visual="+".join(self.options),
                        policy=cfg.collect_policy, seed=cfg.seed, stride=cfg.frame_stride)
        return frames

    @property
    def source_options(self) -> list[str]:
        return list(self.source_state["config"].get("visual", []))

    def source_action_marginal(self) -> torch.Tensor:
        """The source policy's mean action distribution on its own rollouts in the source visuals (the
        simulator of the source domain; no rewards used), on the runtime's device."""
        cfg = self.cfg
        rollout = collect_frames(self.agent, self.game, self.source_options, cfg.source_frames, cfg.num_envs,
                                 "source", cfg.seed + 555, self.mode, cfg.frame_stride)
        return features_and_policy(self.model, rollout.frames, self.rt)[1].mean(0).to(self.rt.device)

    def source_model(self):
        """A frozen copy of the source network as loaded (the model itself is adapted in place)."""
        return self._source_model

    def steps_per_epoch(self, frames: TargetFrames) -> int:
        return -(-len(frames) // self.cfg.batch_size)

    def encoder_only(self) -> None:
        """Freeze the policy and value heads: the methods here train the encoder phi alone."""
        self.model.policy_head.requires_grad_(False)
        self.model.value_head.requires_grad_(False)

    def method_module(self):
        return importlib.import_module(f"{__package__}.{METHOD_MODULES[self.cfg.method]}")

    def progress_total(self, frames: TargetFrames) -> int:
        """Steps the progress bar counts: epochs x batches, or the method's own `progress_total` (BUFR's
        epochs are per encoder block)."""
        own = getattr(self.method_module(), "progress_total", None)
        return own(self, frames) if own else self.cfg.epochs * self.steps_per_epoch(frames)

    def adapt(self, frames: TargetFrames, logger: RunLogger) -> list[dict]:
        """The method's own `adapt` (its module in METHOD_MODULES): one dict of statistics per epoch."""
        return self.method_module().adapt(self, frames, logger)

    def checkpoint_payload(self) -> dict:
        """The source checkpoint with the adapted encoder, playing in the target domain by default."""
        payload = copy.deepcopy(self.source_state)
        agent_state = dict(payload["agent_state"], **{"model" if self.agent.kind == "ppo" else "online":
                                                      self.model.state_dict()})
        config = dict(payload["config"], visual=list(self.options), run_dir=str(self.run_dir))
        payload.update(agent_state=agent_state, config=config,
                       adapted_from={"checkpoint": str(self.source_path), "method": self.cfg.method,
                                     "target": self.cfg.target, "frames": self.frames_used})
        payload.pop("ranks", None)
        payload["world_size"] = 1
        return payload

    @property
    def frames_used(self) -> str | None:
        """The frames file the adaptation learnt from (none where the method played the target itself)."""
        return (self.cfg.frames_file or FRAMES_FILE) if self.uses_target_frames else None

    def evaluate_both_domains(self, checkpoint: Path, label: str) -> dict:
        from ..evaluate import evaluate_checkpoint

        out = {}
        for domain, options in (("target", self.options), ("source", self.source_options)):
            result, _ = evaluate_checkpoint(checkpoint, episodes=self.cfg.eval_episodes,
                                            num_envs=min(EVAL_ENVS, self.cfg.eval_episodes), visual=options,
                                            device=self.cfg.device, **split_levels(self.cfg.eval_split))
            out[domain] = {k: result[k] for k in ("mean_return", "stderr_return", "normalized_score", "episodes",
                                                  "start_level", "num_levels", "seed")}
            print(f"{label} agent on the {domain} domain ({domain_name(options)}, {self.cfg.eval_split} episodes): "
                  f"mean return {result['mean_return']:.2f} over {result['episodes']} episodes", flush=True)
        return out

    def paired_policies(self):
        """A function scoring a model's policy on the target renderings of states that the source policy
        visited in the source visuals (policy_divergence), for the source model now and the adapted later."""
        if self.agent.kind != "ppo":
            print(f"paired states: a {self.agent.kind} agent has no action distribution to compare", flush=True)
            return None
        source_frames, target_frames, fell_out = paired_frames(
            self.agent, self.game, self.source_options, self.options, self.cfg.paired_steps, PAIRED_ENVS,
            self.cfg.seed + 777, self.mode, self.cfg.frame_stride)
        if fell_out:
            print(f"paired states: {fell_out} of {PAIRED_ENVS} envs fell out of step (a collision in one rendering "
                  f"only); their later states are left out", flush=True)
        reference = features_and_policy(self.model, source_frames, self.rt)[1]
        before = policy_divergence(reference, features_and_policy(self.model, target_frames, self.rt)[1])

        def score(model) -> dict:
            after = policy_divergence(reference, features_and_policy(model, target_frames, self.rt)[1])
            for label, d in (("source", before), ("adapted", after)):
                print(f"{label} policy on {len(reference)} paired target frames: from the source policy TV "
                      f"{d['tv_from_source_policy']:.3f}, JS {d['js_from_source_policy']:.3f} nats; argmax agreement "
                      f"{d['argmax_agreement']:.3f}, entropy {d['policy_entropy']:.3f} nats", flush=True)
            return {"frames": len(reference), "envs_out_of_step": fell_out, "source_agent": before,
                    "adapted_agent": after}
        return score

    def run(self) -> dict:
        cfg = self.cfg
        self.run_dir.mkdir(parents=True, exist_ok=True)
        write_json(self.run_dir / "config.json", dataclasses.asdict(cfg))
        self.start = time.time()   # a resumed run counts the time its first part took up to its last save
        metrics = {"source": str(self.source_path), "target": cfg.target, "method": cfg.method,
                   "game": self.game, "visual": self.options}
        if self.resumed is not None:
            self.before, self.start = self.resumed["before"], self.start - self.resumed["wall_seconds"]
            metrics["resumed_after_epoch"] = self.resumed["epochs"]
            print(f"resuming {self.run_dir} after epoch {self.resumed['epochs']}", flush=True)
        elif cfg.eval_episodes:
            self.before = {"source_agent": self.evaluate_both_domains(self.source_path, "source")}
        metrics.update(self.before)
        paired = self.paired_policies() if cfg.paired_steps else None
        frames = self.target_frames(0) if self.uses_target_frames else None
        done = self.resumed["epochs"] if self.resumed is not None else 0
        logger = RunLogger(self.run_dir, total=self.progress_total(frames),
                           initial=done * self.steps_per_epoch(frames) if frames is not None else 0,
                           desc=f"{cfg.method} {self.game}", progress=cfg.progress,
                           purge_step=done if self.resumed is not None else None)
        try:
            metrics["epochs"] = self.adapt(frames, logger)
        finally:
            logger.close()
        checkpoint = save_checkpoint(self.run_dir / "checkpoint.pt", "procgen-agent", self.checkpoint_payload())
        if paired is not None:
            metrics["paired_states"] = paired(self.model)
        if cfg.eval_episodes:
            metrics["adapted_agent"] = self.evaluate_both_domains(checkpoint, "adapted")
            if not self.uses_target_frames:   # online PAD: its measure is the return of the episodes it adapted in
                online = metrics["epochs"][0]
                metrics["adapted_agent"]["last_episode_network_target"] = metrics["adapted_agent"]["target"]
                metrics["adapted_agent"]["target"] = {"mean_return": online["online_mean_return"],
                                                      "stderr_return": online["online_stderr_return"],
                                                      "episodes": len(online["online_returns"]), "online": True}
        metrics.update(checkpoint=str(checkpoint), wall_seconds=time.time() - self.start)
        write_json(self.run_dir / "metrics.json", metrics)
        (self.run_dir / ADAPT_STATE).unlink(missing_ok=True)   # the checkpoint holds the adapted agent
        return metrics


