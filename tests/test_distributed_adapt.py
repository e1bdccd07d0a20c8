"""torchrun for SHOT and source training, checked with 2 gloo processes on the CPU (spawned here).

- pseudo-labels from features gathered over 2 uneven shards equal the labels of one process;
- sharded prediction, gathered back into data set order, equals one process's predict();
- a 2-rank `adapt --method shot` run writes its outputs from rank 0 only, and rank 1 writes nothing;
- a 2-rank `train-source` run keeps the ranks' models equal at every selection check, and saves one of them;
- the dense pipelines refuse to run under torchrun with a one-line error.
"""

import builtins
import io
import json
import math
import os
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from workbench.adapt.cluster import shot_pseudo_labels
from workbench.adapt.training import gather_in_dataset_order, make_loader, predict, set_epoch
from workbench.distributed import Distributed, init_distributed, spawn_local
from workbench.runtime import Runtime

CLASSES, IMAGES_PER_CLASS = 3, 14


def spawn(worker, *args) -> None:
    """Run worker(rank, *args) in 2 gloo processes; an exception in either fails the test here."""
    spawn_local(worker, 2, *args, threads_per_process=1)


def checksum(module: torch.nn.Module) -> list[float]:
    """Sum and sum of squares of every parameter and buffer, correctly rounded (math.fsum: the same in any
    process, whatever its thread count or SIMD width): equal models give equal lists."""
    values = [v.double().flatten() for v in module.state_dict().values() if v.is_floating_point()]
    flat = torch.cat(values)
    return [math.fsum(flat.tolist()), math.fsum((flat * flat).tolist())]


# ------------------------------------------------------------------ gathering over shards
def features_and_probs(n=101, k=5, d=12):
    g = torch.Generator().manual_seed(3)
    centres = torch.randn(k, d, generator=g) * 3
    y = torch.randint(0, k, (n,), generator=g)
    features = centres[y] + torch.randn(n, d, generator=g)
    probs = (torch.randn(n, k, generator=g) + 2 * torch.nn.functional.one_hot(y, k)).softmax(1)
    return features, probs


def _pseudo_label_worker(rank, out_dir):
    dist = init_distributed("cpu")
    features, probs = features_and_probs()
    # an interleaved, uneven split (51 and 50 rows) in a scrambled order: gathering must restore data set order
    mine = torch.arange(len(features))[rank::2].flip(0)
    gathered = gather_in_dataset_order({"features": features[mine], "probs": probs[mine]}, mine, dist)
    labels = shot_pseudo_labels(gathered["features"], gathered["probs"], backend="torch")
    torch.save({**gathered, "labels": labels}, Path(out_dir) / f"rank{rank}.pt")


def test_pseudo_labels_from_gathered_shards_equal_single_process_labels(tmp_path):
    spawn(_pseudo_label_worker, str(tmp_path))
    features, probs = features_and_probs()
    expected = shot_pseudo_labels(features, probs, backend="torch")
    assert len(expected.unique()) > 1
    for rank in range(2):
        got = torch.load(tmp_path / f"rank{rank}.pt")
        assert torch.equal(got["features"], features) and torch.equal(got["probs"], probs)
        assert torch.equal(got["labels"], expected)


class TinyNet(torch.nn.Module):
    """embed() and classifier, as predict() expects of a ShotModel, with batch norm in eval mode."""

    def __init__(self):
        super().__init__()
        self.body = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3, stride=2), torch.nn.BatchNorm2d(4), torch.nn.ReLU(),
                                        torch.nn.AdaptiveAvgPool2d(2), torch.nn.Flatten())
        self.classifier = torch.nn.Linear(16, 3)

    def embed(self, x):
        return self.body(x)


def tiny_prediction_data(n=37):
    g = torch.Generator().manual_seed(5)
    return torch.utils.data.TensorDataset(torch.randn(n, 3, 12, 12, generator=g), torch.randint(0, 3, (n,), generator=g),
                                          torch.arange(n))


def _predict_worker(rank, model_path, out_dir):
    dist = init_distributed("cpu")
    model = TinyNet()
    model.load_state_dict(torch.load(model_path))
    rt = Runtime.create("cpu", "fp32", distributed=dist)
    loader = make_loader(tiny_prediction_data(), 8, train=False, dist=dist)
    torch.save({"shard": len(loader.sampler), "out": predict(model, loader, rt)}, Path(out_dir) / f"rank{rank}.pt")


def test_sharded_predict_gathers_what_one_process_predicts(tmp_path):
    model = TinyNet()
    with torch.no_grad():  # batch norm statistics that matter in eval mode
        model.body[1].running_mean.uniform_(-1, 1)
        model.body[1].running_var.uniform_(0.5, 2)
    torch.save(model.state_dict(), tmp_path / "model.pt")
    spawn(_predict_worker, str(tmp_path / "model.pt"), str(tmp_path))
    single = predict(model, make_loader(tiny_prediction_data(), 8, train=False), Runtime.create("cpu", "fp32"))
    results = [torch.load(tmp_path / f"rank{rank}.pt") for rank in range(2)]
    assert [r["shard"] for r in results] == [18, 19]  # contiguous shards, no padding
    for r in results:
        assert torch.equal(r["out"]["labels"], single["labels"])
        for name in ("features", "probs"):
            torch.testing.assert_close(r["out"][name], single[name], rtol=1e-5, atol=1e-6)


def test_distributed_training_loaders_split_the_data_and_reshuffle_per_epoch():
    data = tiny_prediction_data(129)
    loaders = [make_loader(data, 64, train=True, dist=Distributed(rank, 2), seed=7) for rank in range(2)]
    # 65 samples per rank (one padded): a last batch of one would be dropped, on each rank alike
    assert [len(loader) for loader in loaders] == [1, 1]
    loaders = [make_loader(data, 10, train=True, dist=Distributed(rank, 2), seed=7) for rank in range(2)]
    shards = [[int(i) for _, _, idx in loader for i in idx] for loader in loaders]
    assert len(set(shards[0]) & set(shards[1])) <= 1 and set(shards[0]) | set(shards[1]) == set(range(129))
    set_epoch(loaders[0], 1)
    assert [int(i) for _, _, idx in loaders[0] for i in idx] != shards[0]


# ------------------------------------------------------------------ end-to-end runs
def write_domain(root: Path, inverted: bool) -> Path:
    """Class folders of 32x32 images: class c is a bright horizontal band at height c (inverted: dark on bright)."""
    g = np.random.default_rng(1 if inverted else 0)
    for c in range(CLASSES):
        folder = root / f"class{c}"
        folder.mkdir(parents=True)
        for i in range(IMAGES_PER_CLASS):
            img = g.normal(60, 25, (32, 32, 3))
            top = 4 + 9 * c + int(g.integers(-2, 3))
            img[top:top + 6] += 150
            img = 255 - img if inverted else img
            Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(folder / f"{i}.png")
    return root


@pytest.fixture(scope="module")
def tiny_source(tmp_path_factory):
    from adaptation.classification.source import SourceConfig, train_source

    root = tmp_path_factory.mktemp("domains")
    source, target = write_domain(root / "source", False), write_domain(root / "target", True)
    out = root / "source-run"
    train_source(SourceConfig(data=str(source), backbone="lenet", epochs=2, batch_size=8, transform="digits",
                              device="cpu", run_dir=str(out), progress=False))
    return out, target


@contextmanager
def recorded_writes(under: Path, into: list):
    """Record (and still perform) every file opened for writing and every folder made below `under`."""
    under = os.path.abspath(under)
    real_open, real_os_open, real_mkdir = builtins.open, os.open, os.mkdir

    def note(path):
        path = os.path.abspath(os.fsdecode(path)) if isinstance(path, (str, bytes, os.PathLike)) else None
        if path and path.startswith(under):
            into.append(path)

    def open_(file, mode="r", *args, **kwargs):
        if any(c in mode for c in "wax+"):
            note(file)
        return real_open(file, mode, *args, **kwargs)

    def os_open(path, flags, *args, **kwargs):
        if flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT):
            note(path)
        return real_os_open(path, flags, *args, **kwargs)

    def mkdir_(path, *args, **kwargs):
        note(path)
        return real_mkdir(path, *args, **kwargs)

    builtins.open = io.open = open_
    os.open, os.mkdir = os_open, mkdir_
    try:
        yield into
    finally:
        builtins.open = io.open = real_open
        os.open, os.mkdir = real_os_open, real_mkdir


def _adapt_worker(rank, argv, watched, out_dir):
    import adaptation.classification.shot as shot
    from adaptation.cli import adapt_main

    checksums, writes = [], []
    real_run = shot.ShotAdapter.run

    def run(self):
        metrics = real_run(self)
        checksums.append(checksum(self.model))
        return metrics

    shot.ShotAdapter.run = run
    if rank == 1:
        with recorded_writes(Path(watched), writes):
            code = adapt_main(argv)
    else:
        code = adapt_main(argv)
    (Path(out_dir) / f"rank{rank}.json").write_text(json.dumps({"code": code, "writes": writes,
                                                                "checksum": checksums[0]}))


@pytest.mark.parametrize("method", ["shot", "shot++"])
def test_two_rank_adaptation_writes_from_rank_0_only(tiny_source, tmp_path, method):
    src, target = tiny_source
    run, out = tmp_path / "run", tmp_path / "out"
    out.mkdir()
    argv = ["--method", method, "--source", str(src), "--target", str(target), "--epochs", "2", "--batch-size", "8",
            "--rotation-epochs", "1", "--transfer-epochs", "1", "--transfer-batch-size", "4", "--device", "cpu",
            "--out", str(run), "--no-progress"]
    spawn(_adapt_worker, argv, str(tmp_path), str(out))
    r0, r1 = (json.loads((out / f"rank{r}.json").read_text()) for r in range(2))
    assert r0["code"] == r1["code"] == 0
    assert r1["writes"] == [], f"rank 1 wrote {r1['writes']}"
    assert r0["checksum"] == r1["checksum"], "the ranks' adapted models differ"
    assert {"adapted.pt", "metrics.json", "config.json", "predictions.csv"} <= {p.name for p in run.iterdir()}
    assert len(list(run.glob("events.out.tfevents.*"))) == 1
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["samples"] == CLASSES * IMAGES_PER_CLASS and len(metrics["accuracy_per_epoch"]) == 2
    assert metrics["config"]["distributed"] == {"world_size": 2, "effective_batch_size": 16,
                                                "effective_transfer_batch_size": 8 if method == "shot++" else None}
    assert len((run / "predictions.csv").read_text().splitlines()) == CLASSES * IMAGES_PER_CLASS + 1


def _source_worker(rank, argv, out_dir):
    import adaptation.classification.source as source
    from adaptation.cli import train_source_main

    checks = []
    real_predict = source.predict

    def predict_(model, loader, runtime):
        checks.append(checksum(model))  # the model every selection check scores (and may save)
        return real_predict(model, loader, runtime)

    source.predict = predict_
    code = train_source_main(argv)
    (Path(out_dir) / f"rank{rank}.json").write_text(json.dumps({"code": code, "checks": checks}))


def test_two_rank_source_training_keeps_ranks_equal_and_saves_their_model(tiny_source, tmp_path):
    from workbench.checkpoint import load_checkpoint

    _, data = tiny_source
    run, out = tmp_path / "run", tmp_path / "out"
    out.mkdir()
    argv = ["--data", str(data), "--backbone", "lenet", "--epochs", "3", "--batch-size", "8", "--transform", "digits",
            "--device", "cpu", "--out", str(run), "--no-progress"]
    spawn(_source_worker, argv, str(out))
    r0, r1 = (json.loads((out / f"rank{r}.json").read_text()) for r in range(2))
    assert r0["code"] == r1["code"] == 0
    # 38 training images (4 held out for selection): 19 per rank, 3 batches of 8 per epoch, 9 steps in all,
    # fewer than the 10 checks a run makes: every step is checked
    assert len(r0["checks"]) == 9 and r0["checks"] == r1["checks"]
    assert r0["checks"][0] != r0["checks"][-1]
    saved = load_checkpoint(run / "source.pt", kind="source-model")
    assert checksum_of_state(saved["model"]) == r0["checks"][saved["iteration"] - 1]
    config = json.loads((run / "config.json").read_text())
    assert config["distributed"] == {"world_size": 2, "effective_batch_size": 16}


def checksum_of_state(state: dict) -> list[float]:
    module = torch.nn.Module()
    for i, value in enumerate(state.values()):
        module.register_buffer(f"b{i}", value)
    return checksum(module)


# ------------------------------------------------------------------ what does not run distributed
def test_dense_pipelines_refuse_torchrun_with_one_line(monkeypatch, capsys):
    from adaptation.cli import adapt_main, train_source_main

    monkeypatch.setenv("WORLD_SIZE", "2")
    assert adapt_main(["--task", "segmentation", "--source", "nothing.pt", "--target", "nowhere"]) == 2
    assert train_source_main(["--task", "pose"]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert lines == ["error: segmentation adaptation does not run distributed yet: run it with one process "
                     "(without torchrun)",
                     "error: pose source training does not run distributed yet: run it with one process "
                     "(without torchrun)"]
