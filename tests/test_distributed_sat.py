"""Self-adaptive training under torchrun equals single-process SAT (2 gloo processes on the CPU, spawned here).

- the soft targets, the update counter, the rank-averaged loss and the rank-averaged gradient of 2 ranks fed
  uneven shares of each batch equal those of one process fed the whole (union) batches;
- a 2-rank `train-source --objective sat` run ends with the same soft-target table on both ranks, and saves it.
"""

import json
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from adaptation.robust.sat import SelfAdaptiveTargets
from workbench.distributed import SINGLE, init_distributed, spawn_local

# ------------------------------------------------------------------ the loss on gathered batches
N, K, D, EPOCHS = 40, 4, 6, 3
_g = torch.Generator().manual_seed(0)
FEATURES = torch.randn(N, D, generator=_g)
WEIGHT = torch.randn(K, D, generator=_g)  # a fixed linear "model": no step is taken, only gradients are read
LABELS = torch.randint(0, K, (N,), generator=_g)  # noisy: often not the model's own prediction


def schedule():
    """(epoch, union batch, size of rank 0's share) of every step: uneven shares and a short last batch."""
    g = torch.Generator().manual_seed(1)
    for epoch in range(EPOCHS):
        order = torch.randperm(N, generator=g)
        for start, size, cut in ((0, 12, 6), (12, 12, 7), (24, 12, 4), (36, 4, 3)):
            yield epoch, order[start:start + size], cut


def moved(targets: torch.Tensor) -> torch.Tensor:
    """Which rows of a soft-target table are no longer one-hot."""
    return (targets != F.one_hot(targets.argmax(1), targets.shape[1])).any(1)


def feed(sat: SelfAdaptiveTargets, steps, dist=SINGLE) -> dict:
    """Run the SAT loss over (epoch, batch) steps; the losses and the rank-averaged weight gradients of each step."""
    losses, grads = [], []
    for epoch, index in steps:
        weight = WEIGHT.clone().requires_grad_()
        loss, _ = sat.loss(FEATURES[index] @ weight.T, LABELS[index], index, epoch)
        loss.backward()
        dist.average_gradients([weight])
        losses.append(loss.detach())
        grads.append(weight.grad)
    return {"targets": sat.targets, "updates": sat.updates, "losses": torch.stack(losses), "grads": torch.stack(grads)}


def _sat_worker(rank, out_dir):
    dist = init_distributed("cpu")
    steps = [(epoch, batch[:cut] if rank == 0 else batch[cut:]) for epoch, batch, cut in schedule()]
    sat = SelfAdaptiveTargets(LABELS, K, start_epoch=0, dist=dist)
    torch.save(feed(sat, steps, dist), Path(out_dir) / f"rank{rank}.pt")


def test_two_ranks_hold_the_targets_and_take_the_step_of_one_process_on_the_union(tmp_path):
    spawn_local(_sat_worker, 2, str(tmp_path), threads_per_process=1)
    ranks = [torch.load(tmp_path / f"rank{rank}.pt") for rank in range(2)]
    single = feed(SelfAdaptiveTargets(LABELS, K, start_epoch=0), [(epoch, batch) for epoch, batch, _ in schedule()])

    assert torch.equal(ranks[0]["targets"], ranks[1]["targets"]), "the ranks' soft targets differ"
    torch.testing.assert_close(ranks[0]["targets"], single["targets"], rtol=1e-6, atol=1e-7)
    assert moved(single["targets"]).all()  # every sample was in a batch
    assert ranks[0]["updates"] == ranks[1]["updates"] == single["updates"] == EPOCHS * N
    # averaging the ranks' gradients (take_step) must give one process's loss and gradient on the union batch
    torch.testing.assert_close((ranks[0]["losses"] + ranks[1]["losses"]) / 2, single["losses"], rtol=1e-6, atol=0)
    assert torch.equal(ranks[0]["grads"], ranks[1]["grads"])
    torch.testing.assert_close(ranks[0]["grads"], single["grads"], rtol=1e-5, atol=1e-7)


# ------------------------------------------------------------------ end to end: train-source --objective sat
def write_class_folders(root: Path, classes: int = 3, per_class: int = 14) -> Path:
    """Class folders of small noise images: what is learnt does not matter here, only that the ranks agree."""
    g = np.random.default_rng(0)
    for c in range(classes):
        (root / f"class{c}").mkdir(parents=True)
        for i in range(per_class):
            pixels = g.normal(60 + 50 * c, 25, (32, 32, 3))
            Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(root / f"class{c}" / f"{i}.png")
    return root


def _sat_source_worker(rank, argv, out_dir):
    import adaptation.classification.source as source
    from adaptation.cli import train_source_main

    built = []
    real = source.build_objective
    source.build_objective = lambda name, model, **kw: built.append(real(name, model, **kw)) or built[-1]
    code = train_source_main(argv)
    torch.save({"code": code, **built[0].targets.state_dict()}, Path(out_dir) / f"rank{rank}.pt")


def test_two_rank_sat_source_training_shares_and_saves_one_target_table(tmp_path):
    from workbench.checkpoint import load_checkpoint

    data, run, out = write_class_folders(tmp_path / "data"), tmp_path / "run", tmp_path / "out"
    out.mkdir()
    argv = ["--data", str(data), "--backbone", "lenet", "--objective", "sat", "--label-noise", "0.2", "--epochs", "4",
            "--batch-size", "8", "--transform", "digits", "--device", "cpu", "--out", str(run), "--no-progress"]
    spawn_local(_sat_source_worker, 2, argv, str(out), threads_per_process=1)
    r0, r1 = (torch.load(out / f"rank{rank}.pt") for rank in range(2))
    assert r0["code"] == r1["code"] == 0
    # 38 training images (4 held out), 19 per rank; targets move from epoch start_epoch_for(4) = 1 on: 3 epochs
    assert r0["start_epoch"] == 1 and r0["updates"] == r1["updates"] == 3 * 38
    assert torch.equal(r0["targets"], r1["targets"]), "the ranks' soft targets differ"
    assert int(moved(r0["targets"]).sum()) == 38  # the training rows moved, the held-out ones did not
    saved = load_checkpoint(run / "train-state.pt", kind="source-training")["objective"]["targets"]
    assert torch.equal(saved["targets"], r0["targets"]) and saved["updates"] == r0["updates"]
    assert json.loads((run / "config.json").read_text())["objective"] == "sat"
