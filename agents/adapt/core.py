"""Source-free adaptation of a trained Procgen agent to an unseen visual domain: the shared frame.

The PPO agent's network is SHOT's split with actions for classes: the encoder phi (the registry backbone,
256-d features) plays F, the policy head pi (a linear layer over the 15 actions) plays the frozen hypothesis
C. The target domain is the same game rendered with other assets (`--visual` variants; the dynamics do not
change). Without rewards, an adapter sees:

- transitions of the target domain, played by the frozen source policy (or uniformly random actions):
  frames, the action taken and the next frame, kept every `frame_stride`-th step of play so that they
  span whole episodes rather than their first steps (TargetFrames);
- the source domain as a simulator: the source policy's own rollouts in the source visuals (for the
  action marginal the entropy-safe IM keeps, or feature statistics).

Each method is a module of this package with `adapt(adapter, frames, logger) -> list[dict]` (one dict
of statistics per epoch), named in METHOD_MODULES. Only phi is trained by every method here: the policy
and value heads stay as they were.

What adaptation does to the policy is measured on paired states (`paired_steps`): the source policy
plays the source visuals and a copy of the same levels in the target visuals is stepped with its actions
(the visual options leave the dynamics alone), states kept every `frame_stride`-th step over whole
episodes; on those states, the total-variation and Jensen-Shannon distances from the source policy on
its own frames to the source and to the adapted policy on the target frames, their argmax agreement and
entropy.

The result is an ordinary Procgen checkpoint (the source run's, with the adapted encoder), whose config
names the target's visual options, so `scripts/evaluate_procgen.py RUN` plays it in the target domain and
`--visual` (empty) in the source domain.
"""

from __future__ import annotations

import copy
import dataclasses
import importlib
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from envs.procgen import GAMES, PROTOCOLS, ProcgenVecEnv, visual_options
from workbench.adapt.information import DIVERSITY_PRIORS
from workbench.checkpoint import CheckpointError, load_checkpoint, resolve_checkpoint_path, save_checkpoint
from workbench.logging import RunLogger, default_run_name, write_json
from workbench.runtime import RunSettings, Runtime, seed_everything

from ..rollouts import FRAME_STRIDE, TargetFrames, collect_frames

# method -> module of this package holding its `adapt(adapter, frames, logger)`
METHOD_MODULES = {"shot-im": "shot", "shot": "shot", "anchored-im": "anchored"}
METHODS = tuple(METHOD_MODULES)
COLLECT_POLICIES = ("source", "random")
FRAMES_FILE = "frames.npz"
# SHOT's image settings (object/image_target.py): lr 0.01 with the pretrained encoder at 0.1x, beta 0.3
LR, ENCODER_LR_MULT, BETA = 1e-2, 0.1, 0.3
PAIRED_ENVS = 32


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
    epochs: int = 15
    batch_size: int = 64
    lr: float = LR
    encoder_lr_mult: float = ENCODER_LR_MULT
    beta: float = BETA                    # set to 0 for shot-im
    diversity_prior: str = "uniform"      # SHOT's uniform action marginal, or the source policy's own on the frames
    weight_decay: float = 1e-3
    eval_episodes: int = 100              # per domain, before and after; 0 skips the evaluation
    paired_steps: int = 64                # kept steps x 32 envs: states seen in both visuals; 0 skips
    cluster_backend: str = "auto"
    # anchored-im (the entropy-safe IM, agents.adapt.anchored)
    anchor_weight: float = 1.0            # lambda on KL(pi_0 || pi_theta); our choice, made before any run
    source_frames: int = 4096             # source-visual frames of the source policy, for its action marginal

    def __post_init__(self):
        if self.method not in METHODS:
            raise ValueError(f"unknown method {self.method!r} for a Procgen agent: choose {' or '.join(METHODS)}")
        if self.collect_policy not in COLLECT_POLICIES:
            raise ValueError(f"unknown --collect-policy {self.collect_policy!r}: choose source or random")
        if self.method == "shot-im":  # information maximisation alone, no pseudo-label term
            self.beta = 0.0
        if self.diversity_prior not in DIVERSITY_PRIORS:
            raise ValueError(f"unknown diversity prior {self.diversity_prior!r}: choose uniform or initial")
        if self.frames < 1 or self.epochs < 1 or self.frame_stride < 1:
            raise ValueError("--frames, --epochs and --frame-stride must be positive")
        if self.frames_file and self.recollect:
            raise ValueError("--frames-file and --recollect exclude each other: saved frames cannot be re-collected")


def load_source_agent(path, game: str, runtime: Runtime):
    """(PPO agent that acts with the source weights, the checkpoint) for adapting to `game`."""
    from ..algorithms import ALGORITHMS

    ckpt_path = resolve_checkpoint_path(path)
    state = load_checkpoint(ckpt_path, kind="procgen-agent")
    config = state["config"]
    if config["algo"] != "ppo":
        raise CheckpointError(f"{ckpt_path} holds a {config['algo']} agent: source-free adaptation over actions "
                              "needs a policy head (a PPO agent); train the source with --algo ppo")
    if config["env"] != game:
        raise ValueError(f"the source agent was trained on {config['env']} but the target is {game}: adapt to "
                         f"procgen:{config['env']}[:<visual options>] (the actions mean different things per game)")
    agent_cls, agent_cfg_cls = ALGORITHMS["ppo"]
    env = ProcgenVecEnv(game, 1, device=runtime.device)
    agent = agent_cls.for_evaluation(env, agent_cfg_cls(**config["agent"]), runtime)
    agent.load_state_dict(state["agent_state"])
    head = agent.model.policy_head
    if head.out_features != env.num_actions:
        raise ValueError(f"the source policy has {head.out_features} actions but procgen:{game} has "
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
                  stride: int = FRAME_STRIDE) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The same states rendered in both domains: the agent plays the source visuals, and a copy of the same
    levels in the target visuals is stepped with its actions; every `stride`-th step is kept, `kept_steps`
    times, so the states span whole episodes. Procgen's visual options leave the dynamics alone, so the two
    stay in lockstep; None if rewards or episode ends ever differ (the pairing broke)."""
    envs = [ProcgenVecEnv(game, num_envs, distribution_mode, num_levels=0, start_level=0, device=agent.rt.device,
                          seed=seed, **visual_options(options)) for options in (source_options, target_options)]
    obs = envs[0].reset()
    envs[1].reset()
    source, target = [], []
    with torch.random.fork_rng(devices=[]):  # the same states for every run with this seed
        torch.manual_seed(seed)
        for step in range(kept_steps * stride):
            if step % stride == 0:
                source.append(envs[0].last_frames.copy())
                target.append(envs[1].last_frames.copy())
            actions = agent.act(obs).cpu().numpy()
            (_, r0, d0), (_, r1, d1) = (env.step_numpy(actions) for env in envs)
            if not (np.array_equal(r0, r1) and np.array_equal(d0, d1)):
                return None
            obs = envs[0].as_tensor(envs[0].last_frames)
    return torch.from_numpy(np.concatenate(source)), torch.from_numpy(np.concatenate(target))


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


class ProcgenAdapter:
    def __init__(self, cfg: ProcgenAdaptConfig):
        self.cfg = cfg
        seed_everything(cfg.seed)
        self.game, self.options = parse_procgen_target(cfg.target)
        self.rt = Runtime.create(cfg.device, "fp32")
        self.agent, self.source_state, self.source_path = load_source_agent(cfg.source, self.game, self.rt)
        self.model = self.agent.model
        self._source_model = copy.deepcopy(self.model).requires_grad_(False)   # pi_0, as loaded
        self.mode = PROTOCOLS[self.source_state["config"]["protocol"]].distribution_mode
        self.run_dir = Path(cfg.run_dir or Path("runs") / default_run_name("adapt-procgen", self.game, cfg.method,
                                                                            f"s{cfg.seed}"))

    def target_frames(self, epoch: int) -> TargetFrames:
        """Transitions of the target domain: the saved ones, or collected (epoch > 0: again, for --recollect,
        by the policy as adapted so far)."""
        cfg = self.cfg
        if cfg.frames_file:
            return TargetFrames.load(cfg.frames_file, self.game)
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

    def adapt(self, frames: TargetFrames, logger: RunLogger) -> list[dict]:
        """The method's own `adapt` (its module in METHOD_MODULES): one dict of statistics per epoch."""
        module = importlib.import_module(f"{__package__}.{METHOD_MODULES[self.cfg.method]}")
        return module.adapt(self, frames, logger)

    def checkpoint_payload(self) -> dict:
        """The source checkpoint with the adapted encoder, playing in the target domain by default."""
        payload = copy.deepcopy(self.source_state)
        agent_state = dict(payload["agent_state"], model=self.model.state_dict())
        config = dict(payload["config"], visual=list(self.options), run_dir=str(self.run_dir))
        payload.update(agent_state=agent_state, config=config,
                       adapted_from={"checkpoint": str(self.source_path), "method": self.cfg.method,
                                     "target": self.cfg.target, "frames": self.cfg.frames_file or FRAMES_FILE})
        payload.pop("ranks", None)
        payload["world_size"] = 1
        return payload

    def evaluate_both_domains(self, checkpoint: Path, label: str) -> dict:
        from ..evaluate import evaluate_checkpoint

        out = {}
        for domain, options in (("target", self.options), ("source", self.source_options)):
            result, _ = evaluate_checkpoint(checkpoint, episodes=self.cfg.eval_episodes,
                                            num_envs=min(64, self.cfg.eval_episodes), visual=options,
                                            seed=12345, device=self.cfg.device)
            out[domain] = {k: result[k] for k in ("mean_return", "stderr_return", "normalized_score", "episodes")}
            print(f"{label} agent on the {domain} domain ({'+'.join(options) or 'as trained'}): mean return "
                  f"{result['mean_return']:.2f} over {result['episodes']} episodes", flush=True)
        return out

    def paired_policies(self):
        """A function scoring a model's policy on the target renderings of states that the source policy
        visited in the source visuals (policy_divergence), for the source model now and the adapted later."""
        pairs = paired_frames(self.agent, self.game, self.source_options, self.options, self.cfg.paired_steps,
                              PAIRED_ENVS, self.cfg.seed + 777, self.mode, self.cfg.frame_stride)
        if pairs is None:
            print("paired states: the two renderings fell out of step; no policy comparison", flush=True)
            return None
        reference = features_and_policy(self.model, pairs[0], self.rt)[1]
        before = policy_divergence(reference, features_and_policy(self.model, pairs[1], self.rt)[1])

        def score(model) -> dict:
            after = policy_divergence(reference, features_and_policy(model, pairs[1], self.rt)[1])
            for label, d in (("source", before), ("adapted", after)):
                print(f"{label} policy on {len(reference)} paired target frames: from the source policy TV "
                      f"{d['tv_from_source_policy']:.3f}, JS {d['js_from_source_policy']:.3f} nats; argmax agreement "
                      f"{d['argmax_agreement']:.3f}, entropy {d['policy_entropy']:.3f} nats", flush=True)
            return {"frames": len(reference), "source_agent": before, "adapted_agent": after}
        return score

    def run(self) -> dict:
        cfg = self.cfg
        self.run_dir.mkdir(parents=True, exist_ok=True)
        write_json(self.run_dir / "config.json", dataclasses.asdict(cfg))
        start = time.time()
        metrics = {"source": str(self.source_path), "target": cfg.target, "method": cfg.method,
                   "game": self.game, "visual": self.options}
        if cfg.eval_episodes:
            metrics["source_agent"] = self.evaluate_both_domains(self.source_path, "source")
        paired = self.paired_policies() if cfg.paired_steps else None
        frames = self.target_frames(0)
        logger = RunLogger(self.run_dir, total=cfg.epochs * self.steps_per_epoch(frames),
                           desc=f"{cfg.method} {self.game}", progress=cfg.progress)
        try:
            metrics["epochs"] = self.adapt(frames, logger)
        finally:
            logger.close()
        checkpoint = save_checkpoint(self.run_dir / "checkpoint.pt", "procgen-agent", self.checkpoint_payload())
        if paired is not None:
            metrics["paired_states"] = paired(self.model)
        if cfg.eval_episodes:
            metrics["adapted_agent"] = self.evaluate_both_domains(checkpoint, "adapted")
        metrics.update(checkpoint=str(checkpoint), wall_seconds=time.time() - start)
        write_json(self.run_dir / "metrics.json", metrics)
        return metrics


