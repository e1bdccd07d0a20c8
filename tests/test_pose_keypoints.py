"""Keypoint geometry, heatmap encoding / decoding and pose metrics against hand computations."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from adaptation.pose.keypoints import (affine_matrix, box_to_center_scale, coco_results, decode_heatmaps,
                                        flip_heatmaps_back, flip_keypoints, flip_shift, gaussian_heatmaps,
                                        heatmap_sigma, oks,
                                        oks_ap, pck, transform_points)


@pytest.mark.parametrize("x, y", [(5.3, 7.8), (10.0, 3.0), (2.6, 12.1), (17.49, 20.51)])
def test_encode_then_decode_is_within_a_quarter_pixel(x, y):
    heatmaps, weights = gaussian_heatmaps(np.array([[x, y]]), np.array([True]), (24, 32), heatmap_sigma((24, 32)))
    coords, maxvals = decode_heatmaps(torch.from_numpy(heatmaps)[None])
    assert weights.tolist() == [1.0]
    assert abs(coords[0, 0, 0].item() - x) <= 0.25 + 1e-6 and abs(coords[0, 0, 1].item() - y) <= 0.25 + 1e-6
    assert 0.5 < maxvals[0, 0].item() <= 1.0


def test_decoding_moves_a_quarter_pixel_toward_the_higher_neighbour():
    h = torch.zeros(1, 1, 5, 6)
    h[0, 0, 2, 3] = 1.0
    h[0, 0, 2, 4] = 0.6   # right neighbour higher than the left (0)
    h[0, 0, 1, 3] = 0.3   # upper neighbour higher than the lower (0)
    coords, maxvals = decode_heatmaps(h)
    assert coords[0, 0].tolist() == [3.25, 1.75] and maxvals.item() == 1.0


def test_sigma_scales_with_the_heatmap():
    assert heatmap_sigma((48, 64)) == 2.0 and heatmap_sigma((24, 32)) == 1.0


def test_box_grows_to_the_aspect_ratio_and_padding_and_bad_boxes_are_refused():
    center, size = box_to_center_scale([20, 10, 30, 40], 0.75)
    assert center.tolist() == [35.0, 30.0] and np.allclose(size, [37.5, 50.0])   # 30 x 40 at 1.25
    center, size = box_to_center_scale([0, 0, 60, 40], 0.75)
    assert np.allclose(size, [75.0, 100.0])                                       # widened box: h = w / 0.75
    for bad in ([1, 2, 3], [0, 0, -1, 5], [0, 0, 4, 0], [0, 0, float("nan"), 3]):
        with pytest.raises(ValueError, match="malformed") as info:
            box_to_center_scale(bad, 0.75)
        assert "\n" not in str(info.value)


def test_affine_crop_centre_corners_inverse_and_rotation():
    m = affine_matrix([35, 30], [37.5, 50], 0, (12, 16))
    corners = transform_points([[35, 30], [35 - 18.75, 30 - 25], [35 + 18.75, 30 + 25]], m)
    assert np.allclose(corners, [[6, 8], [0, 0], [12, 16]])
    back = affine_matrix([35, 30], [37.5, 50], 0, (12, 16), inverse=True)
    assert np.allclose(transform_points(transform_points([[21.3, 47.9]], m), back), [[21.3, 47.9]])
    # turned 90 degrees: the window's "up" is the image's right, so a point right of the centre lands
    # above the output centre, and a point above it lands left of it
    r = affine_matrix([10, 10], [20, 20], 90, (20, 20))
    assert np.allclose(transform_points([[15, 10], [10, 5]], r), [[10, 5], [5, 10]])


def test_flip_keypoints_is_its_own_inverse_and_swaps_pairs():
    kps = np.array([[3.0, 4.0, 2], [10.0, 1.0, 1], [20.0, 7.0, 0]])
    flipped = flip_keypoints(kps, 32, [(1, 2)])
    assert flipped.tolist() == [[28.0, 4.0, 2], [11.0, 7.0, 0], [21.0, 1.0, 1]]
    assert np.array_equal(flip_keypoints(flipped, 32, [(1, 2)]), kps)


def centroids(heatmaps: torch.Tensor) -> np.ndarray:
    """(K, H, W) -> the weighted mean (x, y) of each map: a Gaussian's sub-pixel centre."""
    h, w = heatmaps.shape[-2:]
    mass = heatmaps.sum((-1, -2))
    x = (heatmaps.sum(-2) * torch.arange(w)).sum(-1) / mass
    y = (heatmaps.sum(-1) * torch.arange(h)).sum(-1) / mass
    return torch.stack([x, y], -1).double().numpy()


def test_flip_heatmaps_back_recovers_the_original_peaks():
    """Heatmaps mirrored in the heatmap's own grid (joints built independently with flip_keypoints) come back
    to the original joints with no shift; shift 1 is HRNet's whole pixel."""
    joints, pairs, size = np.array([[4.0, 5.0], [9.0, 2.0], [14.0, 11.0]]), [(1, 2)], (24, 32)
    mirrored = flip_keypoints(joints, size[0], pairs)
    maps, _ = gaussian_heatmaps(mirrored, np.ones(3, bool), size, 1.0)
    back = flip_heatmaps_back(torch.from_numpy(maps)[None], pairs)
    assert np.allclose(centroids(back[0])[:, 0], joints[:, 0], atol=1e-3)   # y = 2 cuts a Gaussian: x only
    shifted, _ = decode_heatmaps(flip_heatmaps_back(torch.from_numpy(maps)[None], pairs, shift=1.0))
    assert np.allclose(shifted[0].numpy() - [1.0, 0.0], joints, atol=0.25)


def test_flip_test_shift_brings_a_mirrored_input_back_onto_the_plain_heatmap():
    """Targets as input joints / stride (stride 4, input 96 wide, heatmap 24): the mirrored input holds a joint
    at 95 - x_in, its heatmap at (95 - x_in) / 4; flipped back and shifted by flip_shift = 0.75 (by hand:
    23 - (95 - x_in) / 4 + 0.75 = x_in / 4) it lands on the plain heatmap's x_in / 4, to the sub-pixel."""
    assert flip_shift(96, 24) == 0.75 and flip_shift(192, 48) == 0.75 and flip_shift(64, 64) == 0.0
    x_in, y_hm, pairs, size = np.array([30.0, 41.0, 70.2]), np.array([5.0, 9.5, 20.0]), [(1, 2)], (24, 32)
    plain, _ = gaussian_heatmaps(np.stack([x_in / 4, y_hm], 1), np.ones(3, bool), size, 1.0)
    order = [0, 2, 1]   # channel k of the mirrored input holds joint order[k]
    mirrored, _ = gaussian_heatmaps(np.stack([(95 - x_in[order]) / 4, y_hm[order]], 1), np.ones(3, bool), size, 1.0)
    back = flip_heatmaps_back(torch.from_numpy(mirrored)[None], pairs, flip_shift(96, 24))[0]
    assert np.allclose(centroids(back), centroids(torch.from_numpy(plain)), atol=1e-3)
    assert np.allclose(centroids(back)[:, 0], x_in / 4, atol=1e-3)
    unshifted = flip_heatmaps_back(torch.from_numpy(mirrored)[None], pairs)[0]
    assert np.allclose(centroids(unshifted)[:, 0], x_in / 4 - 0.75, atol=1e-3)   # what no shift leaves


def test_gaussian_weights_are_zero_for_unlabelled_and_far_outside_joints():
    _, weights = gaussian_heatmaps(np.array([[3.0, 3.0], [3.0, 3.0], [-10.0, 4.0], [25.0, 2.0]]),
                                   np.array([True, False, True, True]), (24, 32), 1.0)
    assert weights.tolist() == [1.0, 0.0, 0.0, 1.0]   # x = 25 is within 3 sigma of the last column (23)


def test_pck_by_hand():
    gt = np.zeros((2, 2, 2))
    pred = np.array([[[3.0, 4.0], [0.0, 1.0]], [[0.0, 12.0], [0.0, 0.0]]])   # errors 5, 1 / 12, 0
    visible = np.array([[True, True], [True, False]])
    out = pck(pred, gt, visible, np.array([100.0, 100.0]), thresholds=(0.05, 0.1))
    # joint 0: errors 0.05, 0.12 of the box -> 0/2 at 0.05, 1/2 at 0.1; joint 1: error 0.01 -> 1/1
    assert out["per_joint_pck@0.05"] == [0.0, 100.0] and out["pck@0.05"] == 50.0
    assert out["per_joint_pck@0.1"] == [50.0, 100.0] and out["pck@0.1"] == 75.0


def test_oks_by_hand():
    sigmas = np.array([0.1, 0.05])
    pred, gt = np.array([[[3.0, 4.0], [1.0, 0.0]]]), np.zeros((1, 2, 2))
    value = oks(pred, gt, np.array([[True, True]]), np.array([400.0]), sigmas)
    hand = (math.exp(-25 / (2 * 400 * 0.2**2)) + math.exp(-1 / (2 * 400 * 0.1**2))) / 2
    assert value[0] == pytest.approx(hand)
    assert oks(pred, gt, np.array([[False, True]]), np.array([400.0]), sigmas)[0] == pytest.approx(
        math.exp(-1 / (2 * 400 * 0.1**2)))


def _coco_gt(tmp_path):
    rng = np.random.default_rng(0)
    joints = rng.uniform(10, 90, (4, 3, 2))
    data = {"images": [{"id": i + 1, "width": 100, "height": 100, "file_name": f"{i}.png"} for i in range(4)],
            "annotations": [{"id": i + 1, "image_id": i + 1, "category_id": 1, "iscrowd": 0, "area": 2500.0,
                             "bbox": [10, 10, 80, 80], "num_keypoints": 3,
                             "keypoints": np.concatenate([joints[i], np.full((3, 1), 2)], 1).ravel().tolist()}
                            for i in range(4)],
            "categories": [{"id": 1, "name": "person", "keypoints": ["a", "b", "c"]}]}
    path = tmp_path / "gt.json"
    path.write_text(json.dumps(data))
    return path, joints


def test_oks_ap_is_perfect_for_exact_joints_and_lower_for_perturbed_ones(tmp_path):
    path, joints = _coco_gt(tmp_path)
    sigmas = np.array([0.05, 0.05, 0.05])
    perfect = oks_ap(path, coco_results([1, 2, 3, 4], joints, [1.0] * 4), sigmas)
    noisy = oks_ap(path, coco_results([1, 2, 3, 4], joints + 6.0, [1.0] * 4), sigmas)
    assert perfect["AP"] == pytest.approx(100.0) and noisy["AP"] < 50.0
    assert oks_ap(path, [], sigmas)["AP"] == 0.0


def test_coco_results_round_trip_through_json(tmp_path):
    kps = np.array([[[1.5, 2.25], [3.0, 4.0]]])
    entries = coco_results([7], kps, [0.8])
    (tmp_path / "r.json").write_text(json.dumps(entries))
    back = json.loads((tmp_path / "r.json").read_text())
    assert back == [{"image_id": 7, "category_id": 1, "keypoints": [1.5, 2.25, 1.0, 3.0, 4.0, 1.0], "score": 0.8}]
