"""The crowd pose tracking pipeline (detect, propagate with flow, estimate, track, smooth) and its commands.

The pipeline is checked with an oracle detector and pose model built from the annotations, so that what is
measured is the pipeline's own doing: with every person detected the tracks score MOTA near 100; a person
the detector misses for a few frames loses those frames without flow and keeps them, under the same track,
with it. The commands run end to end on tiny trained models: train-source --task detection, track, and
evaluate --task tracking (which reproduces the run's own figures), with one-line errors for a checkpoint of
the wrong kind and tracks that do not cover the data."""

import json

import numpy as np
import pytest

from adaptation.tracking import crowds
from adaptation.tracking.data import load_videos
from adaptation.tracking.pipeline import TrackConfig, posetrack_predictions, score_tracks, track_video

FRAMES = 24


@pytest.fixture
def video(tmp_path, monkeypatch):
    monkeypatch.setenv("WORKBENCH_DATA", str(tmp_path / "data"))
    [first] = load_videos("builtin:crowds/flat:test", n_train=1, n_test=1, n_val=1, frames=FRAMES)
    return first


def oracle(video, missed: dict[int, set[int]] | None = None):
    """detect / estimate functions that read the annotations: every person's box (but those of `missed`:
    {track_id: frames}) and, for each box asked about, the joints of the annotated person it overlaps most."""
    from adaptation.tracking.tracker import iou_matrix

    step = {"frame": -1}
    missed = missed or {}

    def detect(image):
        step["frame"] += 1
        people = [p for p in video.frames[step["frame"]].people
                  if step["frame"] not in missed.get(p.track_id, set())]
        boxes = np.array([[*p.bbox[:2], *(p.bbox[:2] + p.bbox[2:])] for p in people]).reshape(-1, 4)
        return {"boxes": boxes, "scores": np.ones(len(boxes))}

    def estimate(image, boxes):
        people = video.frames[step["frame"]].people
        truth = np.array([p.bbox for p in people])
        out = []
        for row in iou_matrix(np.asarray(boxes).reshape(-1, 4), truth):
            person = people[int(row.argmax())]
            out.append(np.concatenate([person.keypoints[:, :2], (person.keypoints[:, 2:] > 0) * 1.0], 1))
        return np.array(out).reshape(len(boxes), -1, 3)

    return detect, estimate


def scores(video, frames):
    return score_tracks([(video, posetrack_predictions(video, frames))])


def test_with_every_person_detected_the_tracks_score_near_perfect(video):
    detect, estimate = oracle(video)
    frames = track_video(video, detect, estimate, TrackConfig(flow="none", smooth=False))
    s = scores(video, frames)
    assert s["mota"] > 95 and s["ap"] > 95 and s["motp"] > 99, s


def test_flow_carries_a_missed_person_and_keeps_its_track(video):
    counts = {}
    for f in video.frames[4:12]:
        for p in f.people:
            counts[p.track_id] = counts.get(p.track_id, 0) + 1
    person = max(counts, key=counts.get)                       # in every frame of the gap
    gap = {t for t in range(6, 9) if any(p.track_id == person for p in video.frames[t].people)}
    assert len(gap) == 3
    results = {}
    for flow in ("none", "dis"):
        detect, estimate = oracle(video, {person: gap})
        frames = track_video(video, detect, estimate, TrackConfig(flow=flow, smooth=False))
        results[flow] = (scores(video, frames), frames)
    assert results["dis"][0]["recall"] > results["none"][0]["recall"] + 0.5, (results["dis"][0], results["none"][0])
    frames = results["dis"][1]

    def ids_of(frame_index):   # the tracks drawn on the missed person's box
        from adaptation.tracking.tracker import iou_matrix

        truth = next(p for p in video.frames[frame_index].people if p.track_id == person).bbox
        return {t.track_id for t in frames[frame_index] if iou_matrix(t.box[None], truth[None])[0, 0] > 0.5}

    before, during, after = ids_of(5), ids_of(7), ids_of(10)
    assert before and before == during == after               # one track through the gap, carried by flow
    assert all(t.propagated == 0 for t in frames[10])          # detected again


# ------------------------------------------------------------------ the commands, on tiny trained models
@pytest.fixture(scope="module")
def tiny_models(tmp_path_factory):
    from adaptation.cli import train_source_main

    root = tmp_path_factory.mktemp("track")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("WORKBENCH_DATA", str(root / "data"))
        mp.setenv("WORKBENCH_CROWDS_N", "1,1,1")
        mp.setenv("WORKBENCH_CROWDS_FRAMES", "16")
        mp.setenv("WORKBENCH_FIGURES_N", "16,8")
        assert train_source_main(["--task", "detection", "--epochs", "1", "--batch-size", "8", "--device", "cpu",
                                  "--out", str(root / "detector"), "--no-progress"]) == 0
        assert train_source_main(["--task", "pose", "--data", "builtin:figures/flat", "--backbone", "dtn", "--head",
                                  "deconv", "--head-channels", "16", "--epochs", "1", "--batch-size", "8",
                                  "--device", "cpu", "--out", str(root / "pose"), "--no-progress"]) == 0
        yield root


def test_track_writes_posetrack_tracks_a_gif_and_the_metrics_evaluate_reproduces(tiny_models, capsys):
    from PIL import Image

    from adaptation.cli import evaluate_main
    from workbench.cli import main

    root = tiny_models
    assert main(["track", "--detector", str(root / "detector"), "--pose", str(root / "pose"),
                 "--detection-threshold", "0.05", "--device", "cpu", "--out", str(root / "run"),
                 "--no-progress"]) == 0
    metrics = json.loads((root / "run" / "metrics.json").read_text())
    assert metrics["videos"] == 1 and metrics["frames"] == 16
    tracks = json.loads((root / "run" / "tracks" / "000001.json").read_text())
    assert len(tracks["images"]) == 16 and tracks["categories"][0]["keypoints"] == list(crowds.JOINTS)
    assert {a["track_id"] for a in tracks["annotations"]} and all(len(a["keypoints"]) == 3 * len(crowds.JOINTS)
                                                                  for a in tracks["annotations"])
    with Image.open(root / "run" / "videos" / "000001.gif") as gif:
        assert gif.n_frames == 16
    capsys.readouterr()
    assert evaluate_main(["--task", "tracking", "--model", str(root / "run"), "--data",
                          "builtin:crowds/flat:test"]) == 0
    again = json.loads(capsys.readouterr().out)
    for key in ("mota", "motp", "ap", "id_switches"):
        assert again[key] == pytest.approx(metrics[key]), key


def test_track_runs_on_a_video_file_without_annotations(tiny_models, tmp_path, capsys):
    from PIL import Image

    from workbench.cli import main

    frames = [Image.fromarray(image) for image, _ in crowds.render_video("textured", "test", 1, frames=5)]
    frames[0].save(tmp_path / "clip.gif", save_all=True, append_images=frames[1:])
    root = tiny_models
    assert main(["track", "--detector", str(root / "detector"), "--pose", str(root / "pose"), "--data",
                 str(tmp_path / "clip.gif"), "--detection-threshold", "0.05", "--device", "cpu", "--out",
                 str(tmp_path / "run"), "--no-progress"]) == 0
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["frames"] == 5 and "mota" not in metrics       # nothing to score against
    tracks = json.loads((tmp_path / "run" / "tracks" / "clip.json").read_text())
    assert len(tracks["images"]) == 5 and tracks["categories"][0]["keypoints"] == list(crowds.JOINTS)
    assert "MOTA" not in capsys.readouterr().out


def test_tracking_inputs_of_the_wrong_kind_are_one_line(tiny_models, capsys, tmp_path):
    from adaptation.cli import evaluate_main
    from workbench.cli import main

    root = tiny_models
    assert main(["track", "--detector", str(root / "pose"), "--pose", str(root / "pose"), "--device", "cpu",
                 "--out", str(tmp_path / "x"), "--no-progress"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "holds a pose model, not a person detector" in err[0]
    from adaptation.cli import adapt_main

    assert adapt_main(["--source", str(root / "detector"), "--target", "builtin:crowds/flat"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "holds a detection model, which has no adaptation method" in err[0]
    empty = tmp_path / "empty"
    empty.mkdir()
    assert evaluate_main(["--task", "tracking", "--model", str(empty), "--data", "builtin:crowds/flat:test"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no PoseTrack JSON tracks in it" in err[0]
