"""torchrun for the Procgen agents, checked with 2 gloo processes on the CPU (spawned here).

- one PPO update with 2 ranks = one rank on the union of their rollouts (gradients averaged,
  advantages normalised over the union);
- a 2-rank run checkpoints, and a resumed 2-rank run puts every rank back in its own state;
- rank 1 writes no file at all (with Rainbow's --save-replay, only its own replay shard);
- the workers log the losses of the union of their batches, and Rainbow's warm-up counts every worker's
  transitions.
"""

import builtins
import copy
import io
import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from agents.ppo import PPO, PPOConfig
from agents.rainbow import RainbowConfig
from agents.train import Trainer, TrainConfig
from workbench.checkpoint import CheckpointError, load_checkpoint
from workbench.distributed import init_distributed, spawn_local
from workbench.runtime import Runtime

T, N_PER_RANK, ACTIONS = 8, 2, 15


def spawn(worker, *args) -> None:
    spawn_local(worker, 2, *args, threads_per_process=1)


# ------------------------------------------------------------------ PPO update equivalence
class StubEnv:
    num_actions, observation_shape = ACTIONS, (64, 64, 3)


def ppo_config(num_envs: int, epochs: int = 2) -> PPOConfig:
    return PPOConfig(num_envs=num_envs, num_steps=T, num_epochs=epochs, num_minibatches=1, mixreg=False,
                     normalize_rewards=False)


def rollout(num_envs: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return {"obs": torch.randint(0, 256, (T, num_envs, 64, 64, 3), dtype=torch.uint8, generator=g),
            "actions": torch.randint(0, ACTIONS, (T, num_envs), generator=g),
            "logprobs": -torch.rand(T, num_envs, generator=g) * 3,
            "values": torch.randn(T, num_envs, generator=g),
            "rewards": torch.randn(T, num_envs, generator=g),
            "dones": torch.rand(T, num_envs, generator=g) < 0.2,
            "next_value": torch.randn(num_envs, generator=g)}


def updated_parameters(num_envs: int, buffer: dict, init: dict, runtime: Runtime) -> dict:
    agent = PPO(StubEnv(), ppo_config(num_envs), runtime)
    agent.model.load_state_dict(init)
    agent.buffer = {k: v.clone() for k, v in buffer.items()}
    agent.update()
    return {k: v.detach().clone() for k, v in agent.model.state_dict().items()}


def _ppo_update_worker(rank, init_path, out_dir):
    dist = init_distributed("cpu")
    union = rollout(2 * N_PER_RANK)
    own = {k: v[..., rank * N_PER_RANK:(rank + 1) * N_PER_RANK] if k == "next_value"
           else v[:, rank * N_PER_RANK:(rank + 1) * N_PER_RANK] for k, v in union.items()}
    params = updated_parameters(N_PER_RANK, own, torch.load(init_path), Runtime.create("cpu", "fp32", distributed=dist))
    torch.save(params, Path(out_dir) / f"rank{rank}.pt")


def test_ppo_update_on_two_ranks_equals_one_rank_on_the_union(tmp_path):
    torch.manual_seed(0)
    init = PPO(StubEnv(), ppo_config(N_PER_RANK), Runtime.create("cpu", "fp32")).model.state_dict()
    torch.save(init, tmp_path / "init.pt")
    single = updated_parameters(2 * N_PER_RANK, rollout(2 * N_PER_RANK), init, Runtime.create("cpu", "fp32"))
    spawn(_ppo_update_worker, str(tmp_path / "init.pt"), str(tmp_path))
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    moved = max(float((single[k] - init[k]).abs().max()) for k in init if init[k].is_floating_point())
    assert moved > 1e-4  # the update did something the comparison can see
    for name, value in single.items():
        torch.testing.assert_close(ranks[0][name], ranks[1][name], rtol=0, atol=0)  # workers stay in sync
        torch.testing.assert_close(ranks[0][name], value, rtol=1e-4, atol=1e-5, msg=name)


# ------------------------------------------------------------------ a run: checkpoint, resume, rank 0 writes
def tiny_run(run_dir: str, total_steps: int) -> TrainConfig:
    return TrainConfig(env="bigfish", total_steps=total_steps, eval_interval=2, eval_episodes=2, num_test_envs=2,
                       precision="fp32", device="cpu", run_dir=run_dir, progress=False, video=False,
                       agent={"num_envs": 2, "num_steps": 16, "num_minibatches": 2})


def record_writes(into: list):
    """Make every open-for-writing and mkdir in this process append its path to `into` (and still happen)."""
    real_open, real_mkdir = builtins.open, os.mkdir

    def open_(file, mode="r", *args, **kwargs):
        if any(c in mode for c in "wax+"):
            into.append(str(file))
        return real_open(file, mode, *args, **kwargs)

    def mkdir_(path, *args, **kwargs):
        into.append(str(path))
        return real_mkdir(path, *args, **kwargs)

    builtins.open = io.open = open_
    os.mkdir = mkdir_


def _run_worker(rank, run_dir, out_dir, resume):
    writes: list[str] = []
    if rank == 1:
        record_writes(writes)
    if resume:
        saved = load_checkpoint(Path(run_dir) / "checkpoint.pt", kind="procgen-agent")
        trainer = Trainer.resume(run_dir, total_steps=128, progress=False)
        restored_rng = torch.get_rng_state()
        mine = saved["ranks"][rank]
        assert torch.equal(restored_rng, torch.as_tensor(mine["rng"]["torch"]))
        np.testing.assert_array_equal(trainer.agent.reward_normalizer.returns,
                                      mine["agent_state"]["reward_normalizer"]["returns"])
        assert trainer.agent.env_steps == 64
    else:
        trainer = Trainer(tiny_run(run_dir, 64))
    metrics = trainer.run()
    checksum = sum(float(p.double().sum()) for p in trainer.agent.model.parameters())
    torch.save({"writes": writes, "env_steps": metrics["env_steps"], "checksum": checksum,
                "env_seed_rank": trainer.dist.seed(0)}, Path(out_dir) / f"rank{rank}-{resume}.pt")


def test_two_rank_run_checkpoints_resumes_and_only_rank_0_writes(tmp_path):
    run_dir, out = tmp_path / "run", tmp_path / "out"
    out.mkdir()
    spawn(_run_worker, str(run_dir), str(out), False)
    saved = load_checkpoint(run_dir / "checkpoint.pt", kind="procgen-agent")
    assert saved["world_size"] == 2 and len(saved["ranks"]) == 2
    assert not torch.equal(torch.as_tensor(saved["ranks"][0]["rng"]["torch"]),
                           torch.as_tensor(saved["ranks"][1]["rng"]["torch"]))  # ranks draw differently
    assert saved["agent_state"]["env_steps"] == 64  # 2 ranks x 2 envs x 16 steps = one iteration
    spawn(_run_worker, str(run_dir), str(out), True)
    for resume in (False, True):
        r0, r1 = (torch.load(out / f"rank{r}-{resume}.pt") for r in range(2))
        assert r0["env_steps"] == r1["env_steps"] == (128 if resume else 64)
        assert r0["checksum"] == r1["checksum"]  # identical weights on both workers
        assert r1["writes"] == [], f"rank 1 wrote {r1['writes']}"
        assert r0["env_seed_rank"] != r1["env_seed_rank"]
    metrics = load_checkpoint(run_dir / "checkpoint.pt", kind="procgen-agent")
    assert metrics["agent_state"]["env_steps"] == 128
    config = json.loads((run_dir / "config.json").read_text())
    assert config["distributed"] == {"world_size": 2, "effective_batch": {"envs": 4, "rollout_batch": 64,
                                                                           "minibatch": 32}}
    with pytest.raises(CheckpointError, match="nproc-per-node 2"):  # one process cannot resume two
        Trainer.resume(run_dir, total_steps=192, progress=False)


# ------------------------------------------------------------------ what the workers log
def _ppo_metrics_worker(rank, init_path, out_dir):
    dist = init_distributed("cpu")
    union = rollout(2 * N_PER_RANK)
    own = {k: v[..., rank * N_PER_RANK:(rank + 1) * N_PER_RANK] if k == "next_value"
           else v[:, rank * N_PER_RANK:(rank + 1) * N_PER_RANK] for k, v in union.items()}
    agent = PPO(StubEnv(), ppo_config(N_PER_RANK, epochs=1), Runtime.create("cpu", "fp32", distributed=dist))
    agent.model.load_state_dict(torch.load(init_path))
    agent.buffer = own
    torch.save(agent.update(), Path(out_dir) / f"metrics{rank}.pt")


def test_ppo_workers_log_the_losses_and_explained_variance_of_the_union(tmp_path):
    """One epoch of one minibatch: every logged loss is a mean over samples taken before the step, so the
    2-rank figures must be the single process's on the union of the rollouts (not rank 0's own half)."""
    torch.manual_seed(0)
    agent = PPO(StubEnv(), ppo_config(2 * N_PER_RANK, epochs=1), Runtime.create("cpu", "fp32"))
    torch.save(agent.model.state_dict(), tmp_path / "init.pt")
    agent.buffer = rollout(2 * N_PER_RANK)
    single = agent.update()
    spawn(_ppo_metrics_worker, str(tmp_path / "init.pt"), str(tmp_path))
    ranks = [torch.load(tmp_path / f"metrics{rank}.pt") for rank in range(2)]
    assert set(single) == set(ranks[0]) >= {"policy_loss", "value_loss", "entropy", "approx_kl", "grad_norm",
                                              "explained_variance"}
    for name, value in single.items():
        assert ranks[0][name] == ranks[1][name], name
        assert ranks[0][name] == pytest.approx(value, rel=1e-4, abs=1e-6), name


def rainbow_config(num_envs: int, update_every: int) -> RainbowConfig:
    return RainbowConfig(num_envs=num_envs, buffer_size=1000, warmup_steps=32, batch_size=8,
                         update_every=update_every, steps_per_iteration=8, target_update=10_000)


def first_update_and_losses(num_envs: int, update_every: int, dist, iterations: int = 3):
    """Env steps (over all workers) at the first gradient update, the losses of this worker's own updates and
    the metrics it reports, iteration by iteration."""
    from agents.rainbow import Rainbow
    from envs.procgen import ProcgenVecEnv

    env = ProcgenVecEnv("bigfish", num_envs, seed=dist.seed(0))
    agent = Rainbow(env, rainbow_config(num_envs, update_every), Runtime.create("cpu", "fp32", distributed=dist))
    real_update, first, own = agent.update, [], []

    def update():
        first.append(agent.env_steps)
        result = real_update()
        own[-1].append(result["loss"])
        return result

    agent.update = update
    reported = []
    for _ in range(iterations):
        own.append([])
        reported.append(agent.train_iteration())
    learning = [i for i, losses in enumerate(own) if losses]  # the first iteration is all warm-up
    return first[0], [float(np.mean(own[i])) for i in learning], [reported[i]["loss"] for i in learning]


def _rainbow_worker(rank, out_dir):
    torch.save(first_update_and_losses(2, 2, init_distributed("cpu")), Path(out_dir) / f"rank{rank}.pt")


def test_rainbow_workers_warm_up_together_and_log_their_mean_loss(tmp_path):
    """2 workers x 2 envs start learning after as many transitions (together) as one process with 4 envs does,
    and report the mean of their losses."""
    from workbench.distributed import SINGLE

    single_first, _, _ = first_update_and_losses(4, 4, SINGLE)
    spawn(_rainbow_worker, str(tmp_path))
    ranks = [torch.load(tmp_path / f"rank{rank}.pt") for rank in range(2)]
    assert single_first == ranks[0][0] == ranks[1][0] == 44  # (44 / 4 - 3-step lag) * 4 transitions >= 32
    assert len(ranks[0][1]) == 2  # iterations with updates
    for iteration, (mine, theirs) in enumerate(zip(ranks[0][1], ranks[1][1])):
        assert ranks[0][2][iteration] == ranks[1][2][iteration]
        assert ranks[0][2][iteration] == pytest.approx((mine + theirs) / 2, rel=1e-6)
    assert ranks[0][1] != ranks[1][1]  # the workers' own losses differ: the mean is not one of them


def _rainbow_run_worker(rank, run_dir, out_dir, resume):
    if resume:
        trainer = Trainer.resume(run_dir, total_steps=256, progress=False)
    else:
        trainer = Trainer(TrainConfig(env="bigfish", algo="rainbow", total_steps=128, eval_interval=100,
                                      eval_episodes=2, num_test_envs=2, precision="fp32", device="cpu",
                                      run_dir=run_dir, progress=False, video=False,
                                      agent={**rainbow_config(2, 8).__dict__, "save_replay": True}))
    restored = copy.deepcopy(trainer.agent.replay.state_dict())  # training goes on writing into the arrays
    trainer.run()
    torch.save({"restored": restored, "replay": trainer.agent.replay.state_dict()},
               Path(out_dir) / f"rank{rank}-{resume}.pt")


def test_rainbow_workers_checkpoint_their_own_replays_and_resume_them(tmp_path):
    run_dir, out = tmp_path / "run", tmp_path / "out"
    out.mkdir()
    spawn(_rainbow_run_worker, str(run_dir), str(out), False)
    saved = load_checkpoint(run_dir / "checkpoint.pt", kind="procgen-agent")
    assert saved["agent_state"]["env_steps"] == 128 and "replay" not in saved["agent_state"]
    assert all("replay" not in rank["agent_state"] for rank in saved["ranks"])  # nothing gathered onto rank 0
    shards = [load_checkpoint(run_dir / rank["shard"], kind="procgen-agent-shard") for rank in saved["ranks"]]
    assert sorted(p.name for p in (run_dir / "ranks").iterdir()) == ["rank-0.step-128.pt", "rank-1.step-128.pt"]
    for rank, shard in enumerate(shards):
        ended = torch.load(out / f"rank{rank}-False.pt", weights_only=False)["replay"]
        assert shard["rank"] == rank and np.array_equal(shard["agent_state"]["replay"]["obs"], ended["obs"])
    assert not np.array_equal(shards[0]["agent_state"]["replay"]["obs"], shards[1]["agent_state"]["replay"]["obs"])
    spawn(_rainbow_run_worker, str(run_dir), str(out), True)
    for rank, shard in enumerate(shards):  # each worker resumed with its own replay
        resumed = torch.load(out / f"rank{rank}-True.pt", weights_only=False)
        assert np.array_equal(resumed["restored"]["obs"], shard["agent_state"]["replay"]["obs"])
        assert resumed["replay"]["t"] == 2 * shard["agent_state"]["replay"]["t"]
    # the new checkpoint names the new shards; the old ones are gone
    assert sorted(p.name for p in (run_dir / "ranks").iterdir()) == ["rank-0.step-256.pt", "rank-1.step-256.pt"]
