"""The person detector's data and scores: boxes mirrored with their frame, COCO box AP against hand-made
predictions, and a checkpoint of the wrong kind refused in one line."""

import numpy as np
import pytest
import torch

from adaptation.detection.data import BoxDataset, mirror_boxes, person_boxes
from adaptation.detection.evaluate import box_scores, load_detector


@pytest.fixture
def frames(tmp_path, monkeypatch):
    monkeypatch.setenv("WORKBENCH_DATA", str(tmp_path / "data"))
    monkeypatch.setenv("WORKBENCH_CROWDS_N", "1,1,1")
    monkeypatch.setenv("WORKBENCH_CROWDS_FRAMES", "6")
    return BoxDataset("builtin:crowds/flat:test")


def test_a_mirrored_frame_keeps_its_people_inside_their_mirrored_boxes(frames):
    frame = frames.frames[0]
    image = frame.image()
    background = image[0, 0]   # the flat domain's plain background (no person in the corner pixel)
    mirrored = image[:, ::-1]
    for person, box in zip(frame.people, mirror_boxes(person_boxes(frame.people), image.shape[1])):
        x1, y1, x2, y2 = box
        inside = np.zeros(image.shape[:2], bool)
        inside[int(y1):int(y2), int(x1):int(x2)] = True
        original = np.zeros(image.shape[:2], bool)
        x, y, w, h = person.bbox.astype(int)
        original[y:y + h, x:x + w] = True
        # the person's own pixels, mirrored, fall in the mirrored box, as the box's pixel columns do
        assert np.array_equal(original[:, ::-1], inside)
        assert (mirrored[inside] != background).any(axis=-1).any()


def test_box_ap_is_100_for_the_annotations_and_halves_without_half_of_them(frames):
    truth = [{"boxes": person_boxes(f.people), "scores": np.ones(len(f.people))} for f in frames.frames]
    assert box_scores(frames, truth)["ap"] == pytest.approx(100.0)
    every_other = [{"boxes": t["boxes"][::2], "scores": t["scores"][::2]} for t in truth]
    total = sum(len(t["boxes"]) for t in truth)
    kept = sum(len(t["boxes"]) for t in every_other)
    # every kept box is right: precision 1 up to recall kept / total, so AP (101-point) is about that recall
    assert box_scores(frames, every_other)["ap"] == pytest.approx(100.0 * kept / total, abs=2.0)
    shifted = [{"boxes": t["boxes"] + np.array([6.0, 0.0, 6.0, 0.0]), "scores": t["scores"]} for t in truth]
    assert box_scores(frames, shifted)["ap"] < 60


def test_a_pose_checkpoint_is_not_a_detector(tmp_path):
    from workbench.checkpoint import save_checkpoint

    save_checkpoint(tmp_path / "source.pt", "source-model", {"task": "pose", "model_config": {"task": "pose"},
                                                            "model": {}})
    with pytest.raises(ValueError, match="holds a pose model, not a person detector: train one"):
        load_detector(tmp_path)


def test_the_detector_learns_on_a_fixed_batch():
    from adaptation.detection.model import person_detector

    torch.manual_seed(0)
    detector = person_detector("resnet18")
    images = [torch.rand(3, 64, 64) for _ in range(2)]
    targets = [{"boxes": torch.tensor([[10.0, 8.0, 24.0, 50.0]]), "labels": torch.tensor([1])} for _ in range(2)]
    optimiser = torch.optim.SGD(detector.parameters(), lr=0.01, momentum=0.9)
    losses = []
    for _ in range(12):
        loss = sum(detector(images, targets).values())
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
        losses.append(loss.item())
    assert losses[-1] < 0.6 * losses[0], losses
