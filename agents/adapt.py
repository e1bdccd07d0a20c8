"""Source-free adaptation of a trained Procgen agent to an unseen visual domain.

The PPO agent's network is SHOT's split with actions for classes: the encoder phi (the registry
backbone, 256-d features) plays F, the policy head pi (a linear layer over the 15 actions) plays
the frozen hypothesis C. Frames of the target domain (the same game rendered with other assets:
`--visual` variants) are collected by running the frozen source policy there (or a random
policy), without rewards; then, for `epochs` passes over them,

    L = IM(pi(phi(s))) + beta * CE(pi(phi(s)), y_hat)        (beta = 0: SHOT-IM)

with IM and the cosine k-means pseudo-labels over actions exactly as for images (workbench.adapt.information,
workbench.adapt.cluster). Only phi is trained: the policy head is frozen, and the value head is left
as it was (its input, phi's features, moves with the adaptation; the value head is used only for
further PPO training, not for acting). With `recollect`, the frames are collected again with the
adapted policy before every epoch (adapting during play). `diversity_prior="initial"` pulls the
batch's mean action distribution towards the source policy's own on the target frames instead of
towards uniform (a policy's action marginal is far from uniform).

A PPO policy is not a confident classifier: trained with an entropy bonus, it keeps most of its
entropy (a starpilot agent at 500k steps: 2.28 nats on the target frames, of ln 15 = 2.71), and acts
by sampling. IM's conditional-entropy term makes it nearly deterministic within one epoch (SHOT-IM:
0.07 nats after the first, 0.01 at the end), which changes the behaviour far more than the visual
shift did (docs/RESULTS.md). To see what adaptation does to the policy itself, `paired_steps` plays
the source policy in the source visuals and steps a copy of the same levels in the target visuals
with its actions (the visual options leave the dynamics alone): on those same states, the KL from
the source policy on its own frames to the source and to the adapted policy on the target frames,
their argmax agreement and entropy.

The result is an ordinary Procgen checkpoint (the source run's, with the adapted encoder), whose
config names the target's visual options, so `scripts/evaluate_procgen.py RUN` plays it in the
target domain and `--visual` (empty) in the source domain.
"""

from __future__ import annotations

import copy
import dataclasses
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from envs.procgen import GAMES, PROTOCOLS, ProcgenVecEnv, visual_options
from workbench.adapt.cluster import shot_pseudo_labels
from workbench.adapt.information import DIVERSITY_PRIORS, information_maximization
from workbench.adapt.training import add_terms, set_shot_lr, shot_optimizer, take_step
from workbench.checkpoint import CheckpointError, load_checkpoint, resolve_checkpoint_path, save_checkpoint
from workbench.logging import RunLogger, default_run_name, write_json
from workbench.runtime import RunSettings, Runtime, seed_everything

METHODS = ("shot-im", "shot")
COLLECT_POLICIES = ("source", "random")
FRAMES_FILE = "frames.npz"
# SHOT's image settings (object/image_target.py): lr 0.01 with the pretrained encoder at 0.1x, beta 0.3
LR, ENCODER_LR_MULT, BETA = 1e-2, 0.1, 0.3


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
    paired_steps: int = 64                # x 32 envs: states seen in both visuals to compare policies; 0 skips
    cluster_backend: str = "auto"

    def __post_init__(self):
        if self.method not in METHODS:
            raise ValueError(f"unknown method {self.method!r} for a Procgen agent: choose {' or '.join(METHODS)}")
        if self.collect_policy not in COLLECT_POLICIES:
            raise ValueError(f"unknown --collect-policy {self.collect_policy!r}: choose source or random")
        if self.method == "shot-im":  # information maximisation alone, no pseudo-label term
            self.beta = 0.0
        if self.diversity_prior not in DIVERSITY_PRIORS:
            raise ValueError(f"unknown diversity prior {self.diversity_prior!r}: choose uniform or initial")
        if self.frames < 1 or self.epochs < 1:
            raise ValueError("--frames and --epochs must be positive")
        if self.frames_file and self.recollect:
            raise ValueError("--frames-file and --recollect exclude each other: saved frames cannot be re-collected")


def load_source_agent(path, game: str, runtime: Runtime):
    """(PPO agent that acts with the source weights, the checkpoint) for adapting to `game`."""
    from .algorithms import ALGORITHMS

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


def collect_frames(agent, game: str, options: list[str], frames: int, num_envs: int, policy: str, seed: int,
                   distribution_mode: str) -> np.ndarray:
    """(frames, 64, 64, 3) uint8 from the full level distribution of the target domain, acted on by `policy`."""
    env = ProcgenVecEnv(game, num_envs, distribution_mode, num_levels=0, start_level=0, device=agent.rt.device,
                        seed=seed, **visual_options(options))
    rng = np.random.default_rng(seed)
    out = np.empty((frames, *env.observation_shape), np.uint8)
    obs, filled = env.reset(), 0
    while filled < frames:
        take = min(num_envs, frames - filled)
        out[filled:filled + take] = env.last_frames[:take]
        filled += take
        actions = (rng.integers(0, env.num_actions, num_envs) if policy == "random"
                   else agent.act(obs).cpu().numpy())
        env.step_numpy(actions)
        obs = env.as_tensor(env.last_frames)
    return out


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


def paired_frames(agent, game: str, source_options: list[str], target_options: list[str], steps: int,
                  num_envs: int, seed: int, distribution_mode: str) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The same states rendered in both domains: the agent plays the source visuals, and a copy of the same
    levels in the target visuals is stepped with its actions. Procgen's visual options leave the dynamics
    alone, so the two stay in lockstep; None if rewards or episode ends ever differ (the pairing broke)."""
    envs = [ProcgenVecEnv(game, num_envs, distribution_mode, num_levels=0, start_level=0, device=agent.rt.device,
                          seed=seed, **visual_options(options)) for options in (source_options, target_options)]
    obs = envs[0].reset()
    envs[1].reset()
    source, target = [], []
    with torch.random.fork_rng(devices=[]):  # the same states for every run with this seed
        torch.manual_seed(seed)
        for _ in range(steps):
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
    visuals: mean KL(pi_src(s_source) || pi(s_target)), argmax agreement, and pi's own mean entropy."""
    log = lambda p: p.clamp_min(1e-8).log()  # noqa: E731
    return {"kl_from_source_policy": float((reference * (log(reference) - log(probs))).sum(1).mean()),
            "argmax_agreement": float((reference.argmax(1) == probs.argmax(1)).float().mean()),
            "policy_entropy": float(-(probs * log(probs)).sum(1).mean())}


class ProcgenAdapter:
    def __init__(self, cfg: ProcgenAdaptConfig):
        self.cfg = cfg
        seed_everything(cfg.seed)
        self.game, self.options = parse_procgen_target(cfg.target)
        self.rt = Runtime.create(cfg.device, "fp32")
        self.agent, self.source_state, self.source_path = load_source_agent(cfg.source, self.game, self.rt)
        self.model = self.agent.model
        self.mode = PROTOCOLS[self.source_state["config"]["protocol"]].distribution_mode
        self.run_dir = Path(cfg.run_dir or Path("runs") / default_run_name("adapt-procgen", self.game, cfg.method,
                                                                            f"s{cfg.seed}"))

    def target_frames(self, epoch: int) -> torch.Tensor:
        cfg = self.cfg
        if cfg.frames_file:
            with np.load(cfg.frames_file) as data:
                if str(data["game"]) != self.game:
                    raise ValueError(f"{cfg.frames_file} holds frames of {data['game']}, not {self.game}")
                return torch.from_numpy(data["frames"])
        frames = collect_frames(self.agent, self.game, self.options, cfg.frames, cfg.num_envs, cfg.collect_policy,
                                cfg.seed + 1000 * epoch, self.mode)
        if epoch == 0:  # what the run adapted on first, to repeat the experiment with --frames-file
            np.savez_compressed(self.run_dir / FRAMES_FILE, frames=frames, game=self.game,
                                visual="+".join(self.options), policy=cfg.collect_policy, seed=cfg.seed)
        return torch.from_numpy(frames)

    def steps_per_epoch(self, frames: torch.Tensor) -> int:
        return -(-len(frames) // self.cfg.batch_size)

    def adapt(self, frames: torch.Tensor, logger: RunLogger) -> list[dict]:
        cfg, model = self.cfg, self.model
        model.policy_head.requires_grad_(False)
        model.value_head.requires_grad_(False)
        optimizer = shot_optimizer([(model.backbone, cfg.encoder_lr_mult)], cfg.lr, cfg.weight_decay)
        steps_per_epoch = self.steps_per_epoch(frames)
        total, step, history, prior = cfg.epochs * steps_per_epoch, 0, [], None
        for epoch in range(cfg.epochs):
            if epoch > 0 and cfg.recollect:
                frames = self.target_frames(epoch)
            feats, probs = features_and_policy(model, frames, self.rt)
            if epoch == 0 and cfg.diversity_prior == "initial":
                prior = probs.mean(0).to(self.rt.device)
            pseudo = shot_pseudo_labels(feats, probs, backend=cfg.cluster_backend) if cfg.beta > 0 else None
            stats = {"policy_entropy": float(-(probs * probs.clamp_min(1e-8).log()).sum(1).mean()),
                     "action_agreement_with_pseudo_labels": float((probs.argmax(1) == pseudo).float().mean())
                     if pseudo is not None else None}
            model.train()
            sums: dict[str, float] = {}
            for idx in torch.randperm(len(frames)).split(cfg.batch_size):
                if len(idx) < 2:
                    continue
                step += 1
                set_shot_lr(optimizer, cfg.lr, step / total)
                logits, _ = model(self.rt.images(frames[idx]))
                im, cond, marg = information_maximization(logits.float(), prior)
                loss, terms = im, {"im": im, "conditional_entropy": cond, "marginal_entropy": marg}
                if pseudo is not None:
                    terms["pseudo_ce"] = F.cross_entropy(logits.float(), pseudo[idx].to(self.rt.device))
                    loss = loss + cfg.beta * terms["pseudo_ce"]
                take_step(optimizer, loss)
                add_terms(sums, terms)
                logger.advance(1)
            logger.scalars("loss", {k: v / steps_per_epoch for k, v in sums.items()}, epoch)
            logger.scalars("target", stats, epoch)
            history.append(stats)
        return history

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
        from .evaluate import evaluate_checkpoint

        out = {}
        source_options = list(self.source_state["config"].get("visual", []))
        for domain, options in (("target", self.options), ("source", source_options)):
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
        source_options = list(self.source_state["config"].get("visual", []))
        pairs = paired_frames(self.agent, self.game, source_options, self.options, self.cfg.paired_steps, 32,
                              self.cfg.seed + 777, self.mode)
        if pairs is None:
            print("paired states: the two renderings fell out of step; no policy comparison", flush=True)
            return None
        reference = features_and_policy(self.model, pairs[0], self.rt)[1]
        before = policy_divergence(reference, features_and_policy(self.model, pairs[1], self.rt)[1])

        def score(model) -> dict:
            after = policy_divergence(reference, features_and_policy(model, pairs[1], self.rt)[1])
            for label, d in (("source", before), ("adapted", after)):
                print(f"{label} policy on {len(reference)} paired target frames: KL from the source policy "
                      f"{d['kl_from_source_policy']:.3f}, argmax agreement {d['argmax_agreement']:.3f}, entropy "
                      f"{d['policy_entropy']:.3f}", flush=True)
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


