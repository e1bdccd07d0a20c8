"""Crowd pose tracking: the SORT-style tracker, optical-flow propagation and smoothing, PoseTrack's metrics."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.ndimage import gaussian_filter

from adaptation.tracking.flow import (PROPAGATED_BOX_MARGIN, box_from_joints, dense_flow, propagate_box,
                                      propagate_joints, smooth_tracks)
from adaptation.tracking.metrics import pose_tracking_metrics, precision_recall, voc_ap
from adaptation.tracking.tracker import KalmanBoxFilter, Tracker

BOX_W, BOX_H = 20.0, 40.0


# ------------------------------------------------------------------ tracker
def _ids_by_person(tracker: Tracker, frames, embeddings=None) -> list[dict[str, int]]:
    """Run the tracker over frames of {person: x}; the detections come in a different order every other frame."""
    out = []
    for t, frame in enumerate(frames):
        people = sorted(frame, reverse=t % 2 == 1)
        boxes = np.array([[frame[p], 50.0, BOX_W, BOX_H] for p in people])
        emb = None if embeddings is None or not people else np.stack([embeddings[p][t] for p in people])
        pairs = tracker.update(boxes.reshape(-1, 4), np.ones(len(people)), emb)
        assert sorted(d for _, d in pairs) == list(range(len(people)))     # every detection gets an id
        out.append({people[d]: tid for tid, d in pairs})
    return out


def _crossing(turn: bool, gap=()) -> list[dict[str, float]]:
    """a moves right and b left at 4 px a frame on one row, passing at frame 10 (a at 40, b at 38; the boxes
    overlap over frames 8-12); with `turn` both go back the way they came from there, which a
    constant-velocity prediction cannot follow. Frames in `gap` have no detections."""
    frames = []
    for t in range(21):
        k = t if not turn or t <= 10 else 20 - t
        frames.append({} if t in gap else {"a": 0.0 + 4 * k, "b": 78.0 - 4 * k})
    return frames


def _kept(ids: list[dict[str, int]]) -> bool:
    """Whether both people keep their first frame's ids, distinct, throughout."""
    return ids[0]["a"] != ids[0]["b"] and all(f == ids[0] for f in ids if f)


def test_iou_tracker_keeps_identities_through_a_crossing(monkeypatch):
    assert _kept(_ids_by_person(Tracker(), _crossing(turn=False)))
    # it is the velocity that carries them: boxes predicted where they were last seen swap at frame 10, where
    # a's last box (36) lies nearer b's detection (38) than its own (40)
    monkeypatch.setattr(KalmanBoxFilter, "F", np.eye(7))
    assert not _kept(_ids_by_person(Tracker(), _crossing(turn=False)))


def _embeddings(rng, frames: int) -> dict[str, np.ndarray]:
    """Two people with orthogonal appearances and per-frame noise."""
    base = {"a": np.eye(8)[0], "b": np.eye(8)[1]}
    return {p: v + 0.05 * rng.standard_normal((frames, 8)) for p, v in base.items()}


def test_appearance_keeps_identities_where_iou_alone_swaps_them():
    frames = _crossing(turn=True)
    iou_only = _ids_by_person(Tracker(), frames)
    # after the turn each box's prediction runs on into the other person: IoU alone swaps the two identities
    assert iou_only[-1]["a"] == iou_only[0]["b"] and iou_only[-1]["b"] == iou_only[0]["a"]

    embeddings = _embeddings(np.random.default_rng(0), len(frames))
    assert _kept(_ids_by_person(Tracker(appearance_weight=0.5), frames, embeddings))

    # missed for the two frames after the turn, each prediction has run 24 px past its person: no overlap is
    # left, only the appearance gate (cosine distance under 0.2) lets the tracks take their people back
    frames = _crossing(turn=True, gap=(11, 12))
    assert not _kept(_ids_by_person(Tracker(), frames))
    assert _kept(_ids_by_person(Tracker(appearance_weight=0.5), frames, embeddings))
    assert not _kept(_ids_by_person(Tracker(appearance_weight=0.5, appearance_threshold=0.0), frames, embeddings))


def test_a_track_lost_longer_than_max_age_returns_with_a_new_id():
    tracker = Tracker(max_age=3)
    box, nothing = np.array([[30.0, 30.0, BOX_W, BOX_H]]), np.zeros((0, 4))
    seen = [tracker.update(box) for _ in range(4)]
    assert all(pairs == [(1, 0)] for pairs in seen)
    for _ in range(3):                            # gone for max_age frames: the track waits
        assert tracker.update(nothing) == []
    assert tracker.update(box) == [(1, 0)]
    for _ in range(4):                            # gone for longer: the track is dropped
        tracker.update(nothing)
    assert 1 not in tracker.predicted_boxes()
    assert tracker.update(box) == [(2, 0)]
    tracker.reset()
    assert tracker.update(box) == [(1, 0)] and list(tracker.predicted_boxes()) == [1]


def test_min_hits_gates_new_tracks_as_sort_does():
    tracker = Tracker(min_hits=3)
    first = np.array([[0.0, 0.0, BOX_W, BOX_H]])
    for _ in range(4):                            # the video's first min_hits frames are reported at once
        assert tracker.update(first) == [(1, 0)]
    late = np.array([[0.0, 0.0, BOX_W, BOX_H], [200.0, 0.0, BOX_W, BOX_H]])
    assert tracker.update(late) == [(1, 0)]       # born: 1 hit
    assert tracker.update(late) == [(1, 0)]       # 2 hits
    assert tracker.update(late) == [(1, 0), (2, 1)]


def test_kalman_filter_one_step_against_the_formulas():
    kf = KalmanBoxFilter([10.0, 20.0, 30.0, 60.0])          # centre (25, 50), area 1800, aspect 0.5
    np.testing.assert_allclose(kf.x, [25, 50, 1800, 0.5, 0, 0, 0])

    F = np.eye(7)
    F[0, 4] = F[1, 5] = F[2, 6] = 1.0
    H = np.hstack([np.eye(4), np.zeros((4, 3))])
    P = np.diag([10.0, 10, 10, 10, 10000, 10000, 10000])
    Q = np.diag([1.0, 1, 1, 1, 0.01, 0.01, 0.0001])
    R = np.diag([1.0, 1, 10, 10])
    x = np.array([25.0, 50, 1800, 0.5, 0, 0, 0])

    predicted = kf.predict()
    x, P = F @ x, F @ P @ F.T + Q
    np.testing.assert_allclose(kf.x, x)
    np.testing.assert_allclose(kf.P, P)
    np.testing.assert_allclose(predicted, [10, 20, 30, 60])

    kf.update([14.0, 18.0, 32.0, 60.0])                     # centre (30, 48), area 1920, aspect 8/15
    z = np.array([30.0, 48.0, 1920.0, 32.0 / 60.0])
    K = P @ H.T @ np.linalg.inv(H @ P @ H.T + R)
    x, P = x + K @ (z - H @ x), (np.eye(7) - K @ H) @ P
    np.testing.assert_allclose(kf.x, x)
    np.testing.assert_allclose(kf.P, P, rtol=1e-9, atol=1e-9)
    # by hand for the centre's x: prior variance 10 + 10000 + 1, covariance with its velocity 10000, R = 1
    assert kf.x[0] == pytest.approx(25 + 5 * 10011 / 10012)
    assert kf.x[4] == pytest.approx(5 * 10000 / 10012)


# ------------------------------------------------------------------ flow
def _texture(size: int = 128) -> np.ndarray:
    """Smooth RGB noise: texture at every scale the flow's pyramid looks at."""
    noise = gaussian_filter(np.random.default_rng(0).standard_normal((size, size, 3)), sigma=(2, 2, 0))
    return np.clip(128 + 50 * noise / noise.std(), 0, 255).astype(np.uint8)


@pytest.mark.parametrize("method", ["dis", "farneback"])
def test_flow_carries_joints_with_a_translated_frame(method):
    previous = _texture()
    current = np.roll(previous, shift=(-2, 3), axis=(0, 1))   # content moves by (dx, dy) = (3, -2)
    joints = np.random.default_rng(1).uniform(24, 104, size=(14, 2))
    flow = dense_flow(previous, current, method)
    assert flow.shape == (128, 128, 2) and flow.dtype == np.float32
    moved = propagate_joints(joints, flow)
    np.testing.assert_allclose(moved - joints, np.tile([3.0, -2.0], (14, 1)), atol=0.5)

    lost = np.array([[np.nan, np.nan], [-5.0, 40.0], [40.0, 200.0]])   # not seen, left of, below the frame
    np.testing.assert_array_equal(propagate_joints(lost, flow), lost)


def test_flow_refuses_frames_of_different_sizes():
    with pytest.raises(ValueError, match=r"frames of shapes \(64, 64\) and \(64, 48\): flow needs two frames"):
        dense_flow(np.zeros((64, 64), np.uint8), np.zeros((64, 48), np.uint8))


def test_propagated_box_is_the_box_of_the_moved_joints_with_the_margin():
    before = np.array([[10.0, 10.0], [30.0, 10.0], [20.0, 50.0], [np.nan, np.nan]])
    after = before + [3.0, -2.0]
    box = propagate_box([5.0, 5.0, 30.0, 50.0], before, after)
    np.testing.assert_allclose(box, box_from_joints(after[:3]))
    np.testing.assert_allclose(box[2:], [20 * (1 + PROPAGATED_BOX_MARGIN), 40 * (1 + PROPAGATED_BOX_MARGIN)])
    np.testing.assert_allclose(box[:2] + box[2:] / 2, [23.0, 28.0])         # centred on the joints' box
    # one joint left: the old box moves with it
    one = np.array([[10.0, 10.0], [np.nan, np.nan]])
    np.testing.assert_allclose(propagate_box([5.0, 5.0, 30.0, 50.0], one, one + [3.0, -2.0]), [8, 3, 30, 50])


def test_smoothing_reduces_jitter_on_a_straight_track():
    rng = np.random.default_rng(0)
    t = np.arange(60.0)
    line = np.stack([np.stack([5 + 2 * t, 30 - t], 1), np.stack([50 - 0.5 * t, 10 + 1.5 * t], 1)], axis=1)
    noisy = line + rng.normal(0.0, 1.5, line.shape)
    noisy[[7, 8, 30], 1] = np.nan                            # joint 1 unseen in three frames
    for method in ("savgol", "mean"):
        smoothed = smooth_tracks(noisy, method=method)
        assert np.isnan(smoothed[[7, 8, 30], 1]).all()
        seen = np.isfinite(noisy).all(-1)
        before = np.sqrt(np.mean((noisy[seen] - line[seen]) ** 2))
        after = np.sqrt(np.mean((smoothed[seen] - line[seen]) ** 2))
        assert after < 0.75 * before, (method, before, after)
        np.testing.assert_allclose(smooth_tracks(line, method=method), line, atol=1e-9)   # a line stays put


# ------------------------------------------------------------------ metrics
HEAD = [0.0, 0.0, 30.0, 40.0]     # diagonal 50: head size 0.6 x 50 = 30 px, matching within 15 px
NAMES = ["head", "neck"]


def _gt(track_id, head_xy, neck_xy, neck_v=2):
    return {"track_id": track_id, "bbox_head": HEAD,
            "keypoints": [[*head_xy, 2], [*neck_xy, neck_v]]}


def _pred(track_id, head_xy, neck_xy, head_score=0.9, neck_score=0.9):
    return {"track_id": track_id, "keypoints": [[*head_xy, head_score], [*neck_xy, neck_score]]}


NAN2 = (np.nan, np.nan)
GROUND_TRUTH = {
    "f1": [_gt(1, (10, 10), (10, 50)), _gt(2, (100, 10), (100, 50))],
    "f2": [_gt(1, (10, 10), (10, 50)), _gt(2, (100, 10), (100, 50), neck_v=0)],   # b's neck unannotated
}
PREDICTIONS = {
    "f1": [_pred(7, (12, 10), (10, 50)), _pred(8, (100, 16), (100, 52)), _pred(9, (200, 200), NAN2, 0.3)],
    "f2": [_pred(8, (11, 10), (10, 53))],                  # track 8 now on person 1: a switch on both joints
}


def test_mota_and_motp_against_a_hand_count():
    m = pose_tracking_metrics(GROUND_TRUTH, PREDICTIONS, joint_names=NAMES)
    # head: 4 ground-truth joints; frame 1 matches 1-7 and 2-8, 9 is a false positive; frame 2 matches 1-8,
    # a switch (1 was with 7), and misses 2: MOTA = 1 - (1 + 1 + 1) / 4
    assert m["mota"]["head"] == pytest.approx(25.0)
    # neck: 3 annotated joints, all matched (1-7, 2-8, then 1-8: a switch): MOTA = 1 - 1 / 3
    assert m["mota"]["neck"] == pytest.approx(100 * 2 / 3)
    assert m["mota"]["total"] == pytest.approx((25.0 + 200 / 3) / 2)
    assert m["id_switches"] == 2
    # MOTP = 100 (1 - mean matched distance / head size): head (2 + 6 + 1) / 30 / 3, neck (0 + 2 + 3) / 30 / 3
    assert m["motp"]["head"] == pytest.approx(100 * (1 - 9 / 90))
    assert m["motp"]["neck"] == pytest.approx(100 * (1 - 5 / 90))
    assert m["motp"]["total"] == pytest.approx((90.0 + 100 * (1 - 5 / 90)) / 2)
    assert m["precision"]["head"] == pytest.approx(75.0) and m["recall"]["head"] == pytest.approx(75.0)
    assert m["precision"]["neck"] == pytest.approx(100.0) and m["recall"]["neck"] == pytest.approx(100.0)
    # two videos: counts add up, and no identity carries over from one video into the next
    twice = pose_tracking_metrics([GROUND_TRUTH, GROUND_TRUTH], [PREDICTIONS, PREDICTIONS], joint_names=NAMES)
    assert twice["id_switches"] == 4 and twice["mota"] == pytest.approx(m["mota"])


def test_low_scored_joints_are_dropped_before_the_tracking_metrics():
    m = pose_tracking_metrics(GROUND_TRUTH, PREDICTIONS, joint_names=NAMES, score_threshold=0.5)
    assert m["mota"]["head"] == pytest.approx(50.0)          # track 9's head (score 0.3) no longer a false positive
    assert m["mota"]["neck"] == pytest.approx(100 * 2 / 3)


def test_a_prediction_for_an_unknown_frame_is_an_error():
    with pytest.raises(ValueError, match="prediction frame 'f3' is not in the ground truth: its 2 frames"):
        pose_tracking_metrics(GROUND_TRUTH, {**PREDICTIONS, "f3": []}, joint_names=NAMES)


def test_joint_ap_against_a_hand_worked_case():
    # three ground-truth heads; predictions by score: 0.9 a hit, 0.8 far from everyone, 0.7 a hit
    gt = {1: [_gt(1, (10, 10), (10, 50))], 2: [_gt(1, (10, 10), (10, 50)), _gt(2, (100, 10), (100, 50))]}
    pred = {1: [_pred(5, (11, 10), NAN2, head_score=0.9)],
            2: [_pred(6, (200, 200), NAN2, head_score=0.8), _pred(7, (101, 10), NAN2, head_score=0.7)]}
    precision, recall = precision_recall([0.9, 0.8, 0.7], [1, 0, 1], 3)
    np.testing.assert_allclose(precision, [1, 1 / 2, 2 / 3])
    np.testing.assert_allclose(recall, [1 / 3, 1 / 3, 2 / 3])
    # envelope 1 up to recall 1/3, 2/3 up to 2/3, 0 beyond: AP = 1/3 + 2/9
    assert voc_ap(recall, precision) == pytest.approx(5 / 9)
    m = pose_tracking_metrics(gt, pred, joint_names=NAMES)
    assert m["ap"]["head"] == pytest.approx(100 * 5 / 9)
    assert m["ap"]["neck"] == pytest.approx(0.0)             # three necks, none predicted


def test_ap_counts_a_second_prediction_of_an_assigned_person_as_false():
    # prediction 1 matches both joints of person 1, prediction 2 only the head (with a higher score): the person
    # goes to prediction 1, so prediction 2's head is a false positive although it lies within the threshold
    gt = {0: [_gt(1, (10, 10), (10, 50))]}
    pred = {0: [_pred(1, (11, 10), (10, 51), head_score=0.9), _pred(2, (12, 10), NAN2, head_score=0.95)]}
    m = pose_tracking_metrics(gt, pred, joint_names=NAMES)
    assert m["ap"]["head"] == pytest.approx(50.0)            # ranked false, true: precision 1/2 at recall 1
    assert m["ap"]["neck"] == pytest.approx(100.0)
    assert m["ap"]["total"] == pytest.approx(75.0)
