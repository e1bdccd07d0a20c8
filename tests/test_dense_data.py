"""Segmentation data, the built-in digit scenes and the segmentation metrics."""

import numpy as np
import pytest
import torch
from PIL import Image

from adaptation.cli import datasets_main
from adaptation.common import IMAGENET_MEAN, IMAGENET_STD
from adaptation.segmentation import scenes
from adaptation.segmentation.data import (IGNORE_INDEX, DataError, builtin_scenes_test_split, builtin_scenes_val_split,
                                   load_segmentation, parse_builtin_scenes)
from adaptation.segmentation.metrics import ConfusionAccumulator, colorize, confusion_matrix, segmentation_scores


@pytest.fixture(autouse=True)
def _data_cache(tmp_path_factory, monkeypatch):
    # one cache for the whole session, outside the user's home; small scene sets
    monkeypatch.setenv("WORKBENCH_DATA", str(tmp_path_factory.getbasetemp() / "wbdata"))
    monkeypatch.setenv("WORKBENCH_SCENES_N", "60,20")


# ------------------------------------------------------------------ metrics
def brute_force_scores(pred, target, k):
    valid = target != IGNORE_INDEX
    ious, accs = [], []
    for c in range(k):
        tp = np.sum((pred == c) & (target == c) & valid)
        fp = np.sum((pred == c) & (target != c) & valid)
        fn = np.sum((pred != c) & (target == c) & valid)
        ious.append(None if tp + fp + fn == 0 else 100.0 * tp / (tp + fp + fn))
        if np.sum((target == c) & valid):
            accs.append(tp / np.sum((target == c) & valid))
    present = [v for v in ious if v is not None]
    return {"miou": sum(present) / len(present), "per_class_iou": ious,
            "pixel_accuracy": 100.0 * np.sum((pred == target) & valid) / valid.sum(),
            "mean_class_accuracy": 100.0 * np.mean(accs)}


def test_scores_match_a_per_class_loop_with_ignore_and_absent_classes():
    rng = np.random.default_rng(0)
    k = 6
    target = rng.integers(0, 4, (3, 17, 19))         # classes 4 and 5 never in the truth
    target[rng.random(target.shape) < 0.2] = IGNORE_INDEX
    pred = rng.integers(0, 5, target.shape)           # class 4 predicted only (IoU 0), class 5 absent everywhere
    right = rng.random(pred.shape) < 0.5
    pred[right] = np.where(target == IGNORE_INDEX, 0, target)[right]
    cm = confusion_matrix(pred, target, k)
    loop = np.zeros((k, k), np.int64)
    for t, p in zip(target.ravel(), pred.ravel()):
        if t != IGNORE_INDEX:
            loop[t, p] += 1
    assert np.array_equal(cm, loop)
    got, want = segmentation_scores(cm), brute_force_scores(pred, target, k)
    assert got["per_class_iou"][5] is None and want["per_class_iou"][5] is None
    assert got["per_class_iou"][4] == 0.0
    np.testing.assert_allclose([v for v in got["per_class_iou"] if v is not None],
                               [v for v in want["per_class_iou"] if v is not None])
    for key in ("miou", "pixel_accuracy", "mean_class_accuracy"):
        assert got[key] == pytest.approx(want[key]), key
    assert got["pixels"] == int((target != IGNORE_INDEX).sum())
    # tensors and batch-by-batch accumulation give the same matrix
    acc = ConfusionAccumulator(k)
    for i in range(3):
        acc.update(torch.from_numpy(pred[i]), torch.from_numpy(target[i]))
    assert np.array_equal(acc.confusion, cm) and acc.scores()["miou"] == pytest.approx(got["miou"])


def test_metrics_reject_out_of_range_labels_and_empty_sets():
    with pytest.raises(ValueError, match="truth label 7"):
        confusion_matrix(np.zeros(4), np.array([0, 1, 7, 255]), 3)
    with pytest.raises(ValueError, match="predicted label 3"):
        confusion_matrix(np.array([0, 3, 0, 0]), np.zeros(4), 3)
    with pytest.raises(ValueError, match="no labelled pixels"):
        segmentation_scores(confusion_matrix(np.zeros(4), np.full(4, IGNORE_INDEX), 3))


def test_colorize_keeps_labels_and_draws_ignore_white():
    mask = np.array([[0, 1, 10], [255, 3, 0]], np.uint8)
    image = colorize(mask)
    assert image.mode == "P" and np.array_equal(np.asarray(image), mask)
    rgb = np.asarray(image.convert("RGB"))
    assert tuple(rgb[0, 0]) == (0, 0, 0) and tuple(rgb[1, 0]) == (255, 255, 255)
    assert len({tuple(rgb[0, 1]), tuple(rgb[0, 2]), tuple(rgb[1, 1])}) == 3


# ------------------------------------------------------------------ joint transforms
COLOURS = np.array([(230, 25, 75), (60, 180, 75), (255, 225, 25), (0, 130, 200), (245, 130, 48),
                    (145, 30, 180), (70, 240, 240), (240, 50, 230)], np.float64)


def blocky_pair(folder, rng):
    """A 96 x 80 image of 16-pixel blocks whose colour encodes the block's label (one block ignored)."""
    labels = rng.integers(0, len(COLOURS), (6, 5))
    labels[2, 3] = IGNORE_INDEX
    mask = np.kron(labels, np.ones((16, 16), np.int64)).astype(np.uint8)
    image = np.where(mask[..., None] == IGNORE_INDEX, 128, COLOURS[np.minimum(mask, len(COLOURS) - 1)])
    (folder / "images").mkdir(parents=True)
    (folder / "masks").mkdir()
    Image.fromarray(image.astype(np.uint8)).save(folder / "images" / "a.png")
    Image.fromarray(mask).save(folder / "masks" / "a.png")
    return image, mask


def unnormalise(x):
    return (x.permute(1, 2, 0).numpy() * np.array(IMAGENET_STD) + np.array(IMAGENET_MEAN)) * 255


def test_training_transform_keeps_mask_aligned_with_image(tmp_path):
    image, mask = blocky_pair(tmp_path / "set", np.random.default_rng(1))
    dataset = load_segmentation(str(tmp_path / "set"), None, train=True, crop_size=48)
    assert dataset.num_classes == int(mask[mask != IGNORE_INDEX].max()) + 1
    sizes, padded, flipped_or_moved = set(), 0, 0
    for seed in range(25):
        torch.manual_seed(seed)
        x, m, index = dataset[0]
        assert x.shape == (3, 48, 48) and m.shape == (48, 48) and m.dtype == torch.int64 and index == 0
        rgb, m = unnormalise(x), m.numpy()
        # pixels whose 5x5 neighbourhood has one label lie away from block edges (bilinear image, nearest mask)
        pad = np.pad(m, 2, mode="edge")
        windows = np.lib.stride_tricks.sliding_window_view(pad, (5, 5))
        uniform = (windows == m[..., None, None]).all((-1, -2)) & (m != IGNORE_INDEX)
        assert uniform.sum() > 100
        decoded = np.argmin(((rgb[uniform][:, None, :] - COLOURS[None]) ** 2).sum(-1), axis=1)
        assert np.array_equal(decoded, m[uniform]), f"seed {seed}: image and mask disagree"
        assert np.median(np.abs(rgb[uniform] - COLOURS[m[uniform]]).max(-1)) < 1  # block interiors keep their colour
        black = (np.abs(rgb) < 1).all(-1)  # padding: image 0, mask 255 (no block colour is black)
        assert np.all(m[black] == IGNORE_INDEX)
        padded += int(black.any())
        flipped_or_moved += int(not np.array_equal(m, mask[:48, :48]))
        sizes.add(int((m != IGNORE_INDEX).sum()))
    assert padded > 0 and flipped_or_moved > 20 and len(sizes) > 5  # scales below 1 pad with 0 / 255
    # evaluation: no geometry, the exact pixels
    x, m, _ = load_segmentation(str(tmp_path / "set"), None, train=False)[0]
    assert np.array_equal(m.numpy(), mask) and np.abs(unnormalise(x) - image).max() < 1e-3


# ------------------------------------------------------------------ bad inputs
def write_pair(root, stem, size=(12, 10), mask_size=None, value=1, mode="L"):
    (root / "images").mkdir(parents=True, exist_ok=True)
    (root / "masks").mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((*size, 3), 90, np.uint8)).save(root / "images" / f"{stem}.jpg")
    mask = np.full(mask_size or size, value, np.uint8)
    mask[0, 0] = 0
    Image.fromarray(mask).convert(mode).save(root / "masks" / f"{stem}.png")


def data_error(spec, num_classes=None, match=""):
    with pytest.raises(DataError) as info:
        load_segmentation(str(spec), num_classes, train=False)
    message = str(info.value)
    assert "\n" not in message and match in message, message
    return message


def test_folder_errors_are_one_line_and_name_the_problem(tmp_path):
    write_pair(tmp_path / "ok", "a")
    assert len(load_segmentation(str(tmp_path / "ok"), 2)) == 1
    root = tmp_path / "missing"
    write_pair(root, "a")
    Image.fromarray(np.zeros((12, 10, 3), np.uint8)).save(root / "images" / "b.png")
    assert "b.png" in data_error(root, match="has no mask")
    root = tmp_path / "size"
    write_pair(root, "a", size=(12, 10), mask_size=(12, 11))
    assert "a.png" in data_error(root, match="is 10x12 but mask")
    root = tmp_path / "label"
    write_pair(root, "a", value=7)
    message = data_error(root, num_classes=3, match="label 7")
    assert "a.png" in message and "0..2" in message
    root = tmp_path / "rgb"
    write_pair(root, "a", mode="RGB")
    data_error(root, match="a label map is single-channel")
    (tmp_path / "empty" / "images").mkdir(parents=True)
    (tmp_path / "empty" / "masks").mkdir()
    data_error(tmp_path / "empty", match="holds no images")
    (tmp_path / "nomasks" / "images").mkdir(parents=True)
    data_error(tmp_path / "nomasks", match="has no masks/ folder")
    data_error(tmp_path / "nowhere", match="does not exist")


def test_list_file_errors_name_the_line(tmp_path):
    write_pair(tmp_path, "a")
    write_pair(tmp_path, "big", value=9)
    write_pair(tmp_path, "wide", mask_size=(13, 10))
    listing = tmp_path / "list.txt"

    def check(lines, num_classes=None, match=""):
        listing.write_text("\n".join(lines) + "\n")
        return data_error(listing, num_classes, match)

    listing.write_text("# image mask\n\nimages/a.jpg masks/a.png\n")
    dataset = load_segmentation(str(listing), None)
    assert dataset.num_classes == 2 and dataset.names == ["a"] and len(dataset) == 1
    assert "line 2" in check(["images/a.jpg masks/a.png", "images/a.jpg"], match="expected '<image path> <mask path>'")
    assert "line 1" in check(["images/a.jpg masks/a.png extra"], match="expected")
    assert "masks/none.png" in check(["images/a.jpg masks/a.png", "images/a.jpg masks/none.png"], match="line 2")
    message = check(["images/a.jpg masks/a.png", "images/big.jpg masks/big.png"], 5, match="label 9")
    assert "line 2" in message and "big.png" in message
    assert "line 1" in check(["images/wide.jpg masks/wide.png"], match="is 10x12 but mask")
    check(["# nothing here"], match="holds no pairs")


def test_builtin_spec_errors_and_test_split():
    assert parse_builtin_scenes("builtin:scenes/printed") == ("printed", "train")
    assert parse_builtin_scenes("builtin:scenes/printed:val") == ("printed", "val")
    assert builtin_scenes_test_split("builtin:scenes/textured") == "builtin:scenes/textured:test"
    assert builtin_scenes_test_split("builtin:scenes/textured:train") == "builtin:scenes/textured:test"
    assert builtin_scenes_test_split("builtin:scenes/textured:test") is None
    assert builtin_scenes_test_split("some/folder") is None
    # checkpoints and settings are chosen on val, never on the test split that is reported
    assert builtin_scenes_val_split("builtin:scenes/textured") == "builtin:scenes/textured:val"
    assert builtin_scenes_val_split("builtin:scenes/textured:train") == "builtin:scenes/textured:val"
    for other in ("builtin:scenes/textured:val", "builtin:scenes/textured:test", "builtin:scenes/textured:all",
                  "some/folder"):
        assert builtin_scenes_val_split(other) is None
    data_error("builtin:scenes/nope", match="unknown built-in scenes domain")
    assert "train, val, test or all" in data_error("builtin:scenes/printed:valid", match="unknown split")
    with pytest.raises(ValueError, match="train, val, test or all"):
        scenes.load_split("printed", "valid")
    data_error("builtin:digits/uci", match="builtin:scenes/<domain>")
    data_error("builtin:scenes/printed", num_classes=5, match="has 11 classes")


# ------------------------------------------------------------------ the built-in scenes
def test_scenes_build_is_deterministic_labelled_and_complete(tmp_path, monkeypatch):
    built = []
    for cache in ("one", "two"):
        monkeypatch.setenv("WORKBENCH_DATA", str(tmp_path / cache))
        built.append({d: scenes.load_domain(d, n_train=40, n_test=10) for d in scenes.DOMAINS})
    for domain in scenes.DOMAINS:
        a, b = built[0][domain], built[1][domain]
        assert a["x_train"].shape == (40, scenes.SIZE, scenes.SIZE, 3) and a["m_test"].shape == (10, 64, 64)
        assert a["x_val"].shape == (10, 64, 64, 3) and a["m_val"].shape == (10, 64, 64)  # val: as many as test
        for key in a:
            assert a[key].dtype == np.uint8 and np.array_equal(a[key], b[key]), (domain, key)
        masks = np.concatenate([a["m_train"], a["m_val"], a["m_test"]])
        assert set(np.unique(masks)) <= set(range(scenes.NUM_CLASSES)) | {IGNORE_INDEX}
        assert set(np.unique(a["m_train"])) >= set(range(scenes.NUM_CLASSES))  # background and all ten digits
        assert not np.array_equal(a["x_train"][:10], a["x_test"])
        # val is its own draw: no val scene equals a train or test scene
        for other in (a["x_train"], a["x_test"]):
            assert not (a["x_val"][:, None] == other[None]).all((2, 3, 4)).any(), domain
        # a scene does not depend on the set size: small sets are prefixes of the full ones
        image, mask = scenes.render_scene(domain, "train", 7)
        assert np.array_equal(image, a["x_train"][7]) and np.array_equal(mask, a["m_train"][7])
    # printed: one paper and one ink colour per scene; the labels are the digits' regions, checked
    # against brute-force distances to the ink read back from the image (pixel = paper + coverage * (ink - paper))
    radius = scenes.REGION_RADIUS
    rows, cols = np.mgrid[:scenes.SIZE, :scenes.SIZE]
    for image, mask in zip(built[0]["printed"]["x_train"], built[0]["printed"]["m_train"]):
        near = np.lib.stride_tricks.sliding_window_view(np.pad(mask, 2), (5, 5)).any((-1, -2))
        paper = np.median(image[~near].astype(float), axis=0)
        assert np.mean(np.all(image[~near] == paper, -1)) > 0.97  # plain paper away from the digits
        distance = np.linalg.norm(image.astype(float) - paper, axis=-1)
        cover = distance / distance.max()
        ink = cover >= scenes.INK + 0.05  # surely ink: a margin for the 8-bit rounding
        maybe_ink = cover >= scenes.INK - 0.05
        def dist_to(points):
            pts = np.argwhere(points)
            return np.sqrt(((rows[..., None] - pts[:, 0]) ** 2 + (cols[..., None] - pts[:, 1]) ** 2).min(-1))
        d_ink, d_maybe = dist_to(ink), dist_to(maybe_ink)
        digit = (mask > 0) & (mask != IGNORE_INDEX)
        assert np.all(mask[d_ink <= radius - 0.5] != 0)          # ink and its surroundings are never background
        assert np.all(d_ink[mask == 0] > radius + 1)              # background keeps its distance from the ink
        assert np.mean(digit[d_ink <= radius - 0.5]) > 0.97      # and is labelled as a digit (ignore only where two meet)
        # digit pixels farther from any ink are enclosed holes: the border cannot reach them without
        # crossing the ink grown by the radius
        far = digit & (d_maybe > radius)
        open_ = d_maybe > radius
        reached = np.zeros_like(open_)
        reached[0, :] = reached[-1, :] = reached[:, 0] = reached[:, -1] = True
        reached &= open_
        while True:
            grown = reached.copy()
            grown[1:] |= reached[:-1]; grown[:-1] |= reached[1:]; grown[:, 1:] |= reached[:, :-1]; grown[:, :-1] |= reached[:, 1:]
            grown &= open_
            if np.array_equal(grown, reached):
                break
            reached = grown
        assert not np.any(reached & far)
    # textured: the background away from the digits is no longer plain
    spreads = []
    for image, mask in zip(built[0]["textured"]["x_train"], built[0]["textured"]["m_train"]):
        near = np.lib.stride_tricks.sliding_window_view(np.pad(mask, 2), (5, 5)).any((-1, -2))
        spreads.append(np.ptp(image[~near].astype(int) @ np.ones(3, int)))
    assert np.median(spreads) > 150


def test_val_scenes_keep_the_splits_streams_and_draw_train_glyphs(monkeypatch):
    """Adding val left the train and test streams (0 and 1) as they were, so their scenes are byte-identical
    to those of the code before val; val scenes take their handwritten digits from the UCI train glyphs,
    test scenes alone from the UCI test glyphs."""
    assert (scenes.SPLIT_STREAM["train"], scenes.SPLIT_STREAM["test"]) == (0, 1)
    assert len(set(scenes.SPLIT_STREAM.values())) == len(scenes.SPLIT_STREAM) == 3
    for domain in scenes.DOMAINS:
        images = {split: scenes.render_scene(domain, split, 3)[0] for split in scenes.SPLITS}
        assert not np.array_equal(images["val"], images["train"]) and not np.array_equal(images["val"], images["test"])
    alpha = np.ones((2, 64, 64), np.float32)
    # glyph 0 is "train" with label 3, glyph 1 "test" with label 7; every digit handwritten
    monkeypatch.setattr(scenes, "_handwritten", lambda: (alpha, np.array([3, 7]), np.array([0]), np.array([1])))
    monkeypatch.setattr(scenes, "HANDWRITTEN_FRACTION", 1.0)
    drawn = {split: {scenes._sample_digit(np.random.default_rng(i), split)[0] for i in range(20)}
             for split in scenes.SPLITS}
    assert drawn == {"train": {3}, "val": {3}, "test": {7}}


def test_scene_counts_and_a_cache_without_val(tmp_path, monkeypatch):
    monkeypatch.setenv("WORKBENCH_DATA", str(tmp_path))
    assert scenes.scene_counts() == (60, 20, 20)          # WORKBENCH_SCENES_N=60,20: val as many as test
    monkeypatch.setenv("WORKBENCH_SCENES_N", "12,4,6")
    assert scenes.scene_counts() == (12, 6, 4)            # (train, val, test)
    assert scenes.cache_path("printed").name == "printed-v3-n12-4-val6.npz"
    for bad in ("12", "12,4,6,1", "a,b"):
        monkeypatch.setenv("WORKBENCH_SCENES_N", bad)
        with pytest.raises(ValueError, match=r"<train>,<test>\[,<val>\]"):
            scenes.scene_counts()
    monkeypatch.setenv("WORKBENCH_SCENES_N", "12,4")
    with pytest.raises(ValueError, match="positive"):
        scenes.scene_counts(n_val=0)
    # a cache written before val existed (train and test only) is completed, not served without val
    path = scenes.cache_path("textured")
    path.parent.mkdir(parents=True)
    train = [scenes.render_scene("textured", "train", i) for i in range(12)]
    test = [scenes.render_scene("textured", "test", i) for i in range(4)]
    np.savez_compressed(path, x_train=np.stack([t[0] for t in train]), m_train=np.stack([t[1] for t in train]),
                        x_test=np.stack([t[0] for t in test]), m_test=np.stack([t[1] for t in test]))
    images, masks = scenes.load_split("textured", "val")
    assert images.shape == (4, 64, 64, 3) and np.array_equal(images[2], scenes.render_scene("textured", "val", 2)[0])
    with np.load(path) as data:
        assert {"x_val", "m_val", "x_train", "x_test"} <= set(data.files)
        assert np.array_equal(data["x_train"][5], train[5][0])


def test_builtin_scenes_load_as_segmentation_data():
    train = load_segmentation("builtin:scenes/textured", 11, train=True)
    val = load_segmentation("builtin:scenes/textured:val", None)
    test = load_segmentation("builtin:scenes/textured:test", None)
    both = load_segmentation("builtin:scenes/textured:all", None)
    assert (len(train), len(val), len(test), len(both)) == (60, 20, 20, 100)  # WORKBENCH_SCENES_N=60,20
    assert np.array_equal(both.images[60:80], val.images) and np.array_equal(both.images[80:], test.images)
    assert test.num_classes == 11 and test.class_names[0] == "background" and len(test.class_names) == 11
    x, m, i = train[3]
    assert x.shape == (3, 64, 64) and x.dtype == torch.float32 and m.shape == (64, 64) and i == 3
    image, mask = test.raw(2)
    xt, mt, _ = test[2]
    assert np.array_equal(mt.numpy(), mask) and np.abs(unnormalise(xt) - np.asarray(image)).max() < 1e-3
    assert len(set(test.names)) == len(test) and test.paths[0] == "builtin:scenes/textured:test#0"


def test_datasets_list_and_build_include_the_scenes(capsys):
    assert datasets_main(["build", "scenes/printed"]) == 0
    assert "builtin:scenes/printed: 60 train / 20 val / 20 test" in capsys.readouterr().out
    assert datasets_main(["list"]) == 0
    out = capsys.readouterr().out
    for domain in scenes.DOMAINS:
        assert f"builtin:scenes/{domain}" in out
    assert "builtin:digits/uci" in out
    assert [line.split()[1] for line in out.splitlines() if "scenes/printed" in line] == ["built"]
    assert datasets_main(["build", "scenes/nope"]) == 2
    assert "unknown built-in domain 'scenes/nope'" in capsys.readouterr().err
