"""The built-in keypoint benchmark (adaptation.pose.figures): cache, COCO annotations, visibility, domains."""

import json
import numpy as np
import pytest
from PIL import Image

from adaptation.pose import figures as F

SMALL = {"n_train": 6, "n_test": 3}   # val: as many as test


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    """Every test builds into its own cache, never the user's."""
    monkeypatch.setenv("WORKBENCH_DATA", str(tmp_path / "cache"))
    monkeypatch.delenv("WORKBENCH_FIGURES_N", raising=False)


def read_split(folder, split):
    data = json.loads((folder / f"annotations_{split}.json").read_text())
    pixels = {im["id"]: np.asarray(Image.open(folder / "images" / split / im["file_name"])) for im in data["images"]}
    return data, pixels


def standing_figure(arms_behind=(False, False)):
    """A hand-posed upright figure, 78 pixels tall, arms and legs apart."""
    joints = np.array([[64, 30], [64, 42], [75, 42], [53, 42], [80, 58], [48, 58], [84, 72], [44, 72],
                       [71, 72], [57, 72], [73, 90], [55, 90], [74, 108], [54, 108]], dtype=np.float64)
    return F.Figure(joints, {"head": 5.0, "neck": 2.0, "arm": 2.0, "leg": 2.5}, arms_behind, True)


def visibility(figures):
    return F.joint_visibility(figures, F.stroke_layers(figures))


# ------------------------------------------------------------------ the constants
def test_skeleton_flip_pairs_and_sigmas_fit_the_joints():
    assert len(F.JOINTS) == 14 and len(F.SIGMAS) == 14
    assert all(0 <= a < 14 and 0 <= b < 14 and a != b for a, b in F.SKELETON)
    for left, right in F.FLIP_PAIRS:
        assert F.JOINTS[left].replace("left_", "") == F.JOINTS[right].replace("right_", "")
    assert F.SIGMAS[0] == pytest.approx(0.0292) and F.SIGMAS[1] == F.SIGMAS[2] == 0.079
    assert F.SIGMAS[12] == F.SIGMAS[13] == 0.089


# ------------------------------------------------------------------ cache
def test_build_is_deterministic_cached_and_atomic(tmp_path, monkeypatch):
    builds = []
    for root in ("a", "b"):
        monkeypatch.setenv("WORKBENCH_DATA", str(tmp_path / root))
        builds.append({d: F.build_domain(d, **SMALL) for d in F.DOMAINS})
    for domain in F.DOMAINS:
        a, b = builds[0][domain], builds[1][domain]
        assert a != b and a.name == b.name == f"{domain}-v{F.VERSION}-n6-3"
        for split in F.SPLITS:
            assert (a / f"annotations_{split}.json").read_bytes() == (b / f"annotations_{split}.json").read_bytes()
            pixels_a, pixels_b = read_split(a, split)[1], read_split(b, split)[1]
            assert len(pixels_a) == SMALL.get(f"n_{split}", SMALL["n_test"])
            assert all(np.array_equal(pixels_a[i], pixels_b[i]) for i in pixels_a)
    # cached: a second call reuses the folder; force rebuilds it identically; no temporary folder is left
    folder = builds[1]["flat"]
    stamp = (folder / "annotations_train.json").stat().st_mtime_ns
    assert F.build_domain("flat", **SMALL) == folder
    assert (folder / "annotations_train.json").stat().st_mtime_ns == stamp
    before = (folder / "annotations_test.json").read_bytes()
    assert F.build_domain("flat", force=True, **SMALL) == folder
    assert (folder / "annotations_test.json").read_bytes() == before
    assert sorted(p.name for p in F.cache_dir().iterdir()) == ["flat-v1-n6-3", "textured-v1-n6-3"]


def test_a_half_built_folder_is_not_taken_as_built():
    folder = F.domain_dir("flat", **SMALL)
    (folder / "images" / "train").mkdir(parents=True)   # as if a build had died half-way
    assert F.build_domain("flat", **SMALL) == folder
    assert (folder / "annotations_train.json").is_file() and (folder / "annotations_test.json").is_file()
    assert len(list((folder / "images" / "train").iterdir())) == 6


def test_counts_come_from_arguments_then_the_environment(monkeypatch):
    # (train, val, test); val defaults to the test count
    assert F.figure_counts() == (F.TRAIN_IMAGES, F.TEST_IMAGES, F.TEST_IMAGES) == (1500, 300, 300)
    assert F.domain_dir("flat").name == "flat-v1" and F.domain_dir("flat", n_val=50).name == "flat-v1-val50"
    monkeypatch.setenv("WORKBENCH_FIGURES_N", "4,2")
    assert F.figure_counts() == (4, 2, 2) and F.figure_counts(n_test=5) == (4, 5, 5)
    assert F.domain_dir("flat").name == "flat-v1-n4-2"
    monkeypatch.setenv("WORKBENCH_FIGURES_N", "4,2,3")
    assert F.figure_counts() == (4, 3, 2) and F.domain_dir("flat").name == "flat-v1-n4-2-val3"
    for bad in ("4", "4,2,3,1", "4,x"):
        monkeypatch.setenv("WORKBENCH_FIGURES_N", bad)
        with pytest.raises(ValueError, match="WORKBENCH_FIGURES_N"):
            F.figure_counts()
    monkeypatch.delenv("WORKBENCH_FIGURES_N")
    with pytest.raises(ValueError, match="positive"):
        F.figure_counts(0, 1)
    with pytest.raises(ValueError, match="positive"):
        F.figure_counts(1, 1, 0)
    with pytest.raises(ValueError, match="unknown built-in figures domain"):
        F.build_domain("photo")
    with pytest.raises(ValueError, match="unknown split 'dev': use train, val, test"):
        F.annotation_file("flat", "dev")


def test_the_environment_gives_prefixes_of_larger_sets(monkeypatch):
    monkeypatch.setenv("WORKBENCH_FIGURES_N", "4,2")
    small = F.annotation_file("textured", "train").parent
    assert small.name == "textured-v1-n4-2" and F.image_root("textured", "test") == small / "images" / "test"
    large = F.build_domain("textured", **SMALL)
    for split, count in (("train", 4), ("test", 2)):
        (data_small, pixels_small), (data_large, pixels_large) = read_split(small, split), read_split(large, split)
        assert len(data_small["images"]) == count
        assert data_small["images"] == data_large["images"][:count]
        kept = [a for a in data_large["annotations"] if a["image_id"] <= count]
        assert data_small["annotations"] == kept
        assert all(np.array_equal(pixels_small[i], pixels_large[i]) for i in pixels_small)


def test_train_val_and_test_images_differ():
    folder = F.build_domain("flat", **SMALL)
    splits = {split: read_split(folder, split)[1] for split in F.SPLITS}
    assert {split: len(images) for split, images in splits.items()} == {"train": 6, "val": 3, "test": 3}
    for a, b in (("train", "val"), ("val", "test"), ("train", "test")):
        assert not any(np.array_equal(x, y) for x in splits[a].values() for y in splits[b].values())
    assert len({a.tobytes() for a in splits["train"].values()}) == len(splits["train"])


def test_adding_val_kept_every_train_and_test_image():
    """Train and test keep their streams (0 and 1), val draws from its own (2): the train / test images and
    annotations are those that the seeds gave before val existed."""
    assert F.SPLIT_STREAM == {"train": 0, "test": 1, "val": 2}
    image, fields, _ = F.render_image("flat", "test", 0)
    rng = np.random.default_rng([F.SEEDS["flat"], 1, 0])   # the stream by hand
    figures = F.place_figures(rng, 1 + int(rng.choice(2, p=F.FIGURES_PER_IMAGE["flat"])))
    assert np.array_equal(F.paint_flat(rng, figures, F.stroke_layers(figures)), image)
    assert not np.array_equal(F.render_image("flat", "val", 0)[0], image)
    # the first joint of image 1's first figure, as the code before val rendered it
    assert F.render_image("flat", "train", 1)[1][0]["keypoints"][:3] == [46.38, 9.96, 2]
    assert F.render_image("flat", "test", 1)[1][0]["keypoints"][:3] == [47.52, 37.85, 2]


def test_a_cache_built_before_val_gets_its_val_split_added(monkeypatch):
    """A folder holding only train and test (as built before val existed) is completed, not served as is and
    not rebuilt: its train / test files stay untouched and its val split equals a fresh build's."""
    folder = F.build_domain("flat", **SMALL)
    fresh_val = (folder / "annotations_val.json").read_bytes()
    import shutil
    shutil.rmtree(folder / "images" / "val")
    (folder / "annotations_val.json").unlink()
    stamps = {split: (folder / f"annotations_{split}.json").stat().st_mtime_ns for split in ("train", "test")}
    assert F.annotation_file("flat", "val", **SMALL) == folder / "annotations_val.json"
    assert (folder / "annotations_val.json").read_bytes() == fresh_val
    assert len(list((folder / "images" / "val").iterdir())) == 3
    assert {split: (folder / f"annotations_{split}.json").stat().st_mtime_ns for split in stamps} == stamps
    assert sorted(p.name for p in folder.iterdir()) == ["annotations_test.json", "annotations_train.json",
                                                        "annotations_val.json", "images"]


# ------------------------------------------------------------------ annotations
def test_annotations_are_coco_keypoints_consistent_with_the_figures():
    from pycocotools.coco import COCO

    for domain in F.DOMAINS:
        folder = F.build_domain(domain, **SMALL)
        for split in F.SPLITS:
            coco = COCO(str(F.annotation_file(domain, split, **SMALL)))
            category = coco.loadCats([1])[0]
            assert category["keypoints"] == list(F.JOINTS)
            assert category["skeleton"] == [[a + 1, b + 1] for a, b in F.SKELETON]
            images = coco.loadImgs(coco.getImgIds())
            assert [im["id"] for im in images] == list(range(1, SMALL.get(f"n_{split}", SMALL["n_test"]) + 1))
            for image in images:
                assert (F.image_root(domain, split, **SMALL) / image["file_name"]).is_file()
                anns = coco.loadAnns(coco.getAnnIds(imgIds=[image["id"]]))
                figures = F.render_image(domain, split, image["id"] - 1)[2]
                assert 1 <= len(anns) == len(figures) <= len(F.FIGURES_PER_IMAGE[domain])
                for ann, figure in zip(anns, figures):
                    check_annotation(ann, figure)
        assert folder.is_dir()


def test_ground_truth_scores_full_oks_ap_with_the_figure_sigmas():
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    truth = COCO(str(F.annotation_file("textured", "test", **SMALL)))
    found = truth.loadRes([{"image_id": a["image_id"], "category_id": 1, "keypoints": a["keypoints"], "score": 1.0}
                           for a in truth.dataset["annotations"]])
    evaluation = COCOeval(truth, found, "keypoints")
    evaluation.params.kpt_oks_sigmas = F.SIGMAS
    evaluation.evaluate()
    evaluation.accumulate()
    evaluation.summarize()
    assert evaluation.stats[0] == pytest.approx(1.0)


def check_annotation(ann, figure):
    size = F.IMAGE_SIZE
    assert ann["category_id"] == 1 and ann["iscrowd"] == 0
    kps = np.asarray(ann["keypoints"], dtype=np.float64).reshape(14, 3)
    v = kps[:, 2]
    assert set(v) <= {0, 1, 2} and ann["num_keypoints"] == int((v > 0).sum()) >= F.MIN_JOINTS_IN_FRAME
    outside = ~((figure.joints >= 0) & (figure.joints <= size - 1)).all(1)
    assert np.array_equal(v == 0, outside)                        # v = 0 exactly for joints outside the image
    assert (kps[v == 0, :2] == 0).all()
    assert np.allclose(kps[v > 0, :2], figure.joints[v > 0])
    x, y, w, h = ann["bbox"]
    assert 0 <= x and 0 <= y and w > 0 and h > 0 and x + w <= size and y + h <= size
    labelled = kps[v > 0, :2]
    assert ((labelled >= (x, y)) & (labelled <= (x + w, y + h))).all()
    assert 0 < ann["area"] <= w * h


# ------------------------------------------------------------------ visibility
def test_visible_joints_show_their_own_limbs_in_the_flat_domain():
    exact = total = 0
    for index in range(40):
        image, anns, figures = F.render_image("flat", "train", index)
        codes = image.reshape(-1, 3).astype(np.int64) @ (1 << 16, 1 << 8, 1)
        values, counts = np.unique(codes, return_counts=True)
        background = values[counts.argmax()]        # the plain background fills most of a flat image
        # the same layout drawn with a known colour per (figure, part): the joint pixel shows its own limb
        layers = F.stroke_layers(figures)
        colours = [{part: np.array([30.0 + 60 * f, 35.0 * k, 250.0]) for k, part in enumerate(F.PARTS)}
                   for f in range(len(figures))]
        known = F.composite(np.zeros((F.IMAGE_SIZE, F.IMAGE_SIZE, 3)), layers, colours)
        for f, (ann, figure) in enumerate(zip(anns, figures)):
            strokes = F.figure_strokes(figure)
            kps = np.asarray(ann["keypoints"]).reshape(14, 3)
            for joint, (x, y, v) in enumerate(kps):
                if v != 2:
                    continue
                col, row = int(np.floor(x + 0.5)), int(np.floor(y + 0.5))
                assert codes[row * F.IMAGE_SIZE + col] != background
                own = {s.part for s in strokes if joint in s.joints}
                exact += any(np.abs(known[row, col] - colours[f][part]).max() < 1e-9 for part in own)
                total += 1
    # the rest are blends where another stroke's anti-aliased edge touches the pixel (under half of it)
    assert total > 500 and exact / total > 0.98


def test_a_figure_drawn_over_another_hides_the_joints_it_covers():
    front = standing_figure()
    assert (visibility([front]) == 2).all()
    above = front.shifted(0, -12)                # its neck (and torso) lands on the first figure's head (and neck)
    flags = visibility([front, above])
    assert flags[0, F.HEAD] == 1 and flags[0, F.NECK] == 1
    assert (flags[0, [F.L_ANKLE, F.R_ANKLE, F.L_WRIST, F.R_WRIST]] == 2).all()   # out of its reach
    assert flags[0, F.L_KNEE] == 1              # under its shin
    assert (flags[1] == 2).all()                 # drawn last, nothing hides it
    flags = visibility([above, front])           # the other order: now the first figure's head hides the neck above
    assert (flags[1] == 2).all() and flags[0, F.NECK] == 1
    # and the image agrees: the covered head pixel shows the later figure's neck colour
    layers = F.stroke_layers([front, above])
    colours = [{part: np.full(3, 100.0) for part in F.PARTS}, {part: np.full(3, 200.0) for part in F.PARTS}]
    image = F.composite(np.zeros((F.IMAGE_SIZE, F.IMAGE_SIZE, 3)), layers, colours)
    assert np.allclose(image[30, 64], 200.0) and np.allclose(image[108, 74], 100.0)
    # an exact copy drawn later hides every joint
    assert (visibility([front, front.shifted(0, 0)])[0] == 1).all()


def test_an_arm_behind_the_torso_hides_its_wrist():
    arm_across = standing_figure().joints.copy()
    arm_across[F.L_ELBOW], arm_across[F.L_WRIST] = (78, 56), (66, 60)   # the left hand on the belly
    for behind, expected in ((False, 2), (True, 1)):
        figure = F.Figure(arm_across, standing_figure().radius, (behind, False), True)
        flags = visibility([figure])
        assert flags[0, F.L_WRIST] == expected and flags[0, F.R_WRIST] == 2


def test_joints_outside_the_frame_are_unlabelled():
    figure = standing_figure().shifted(-70, 0)   # the right side leaves the frame on the left
    flags = visibility([figure])[0]
    assert np.array_equal(flags == 0, figure.joints[:, 0] < 0)
    assert flags[F.R_WRIST] == 0 and flags[F.L_WRIST] == 2


# ------------------------------------------------------------------ the two domains
def local_variance(grey):
    """Variance over each 3 x 3 neighbourhood (valid part only)."""
    windows = np.lib.stride_tricks.sliding_window_view(grey, (3, 3))
    return windows.var(axis=(-1, -2))


def domain_statistics(domain, count=60):
    backgrounds, joints, heights, torsos = [], [], [], []
    for index in range(count):
        image, anns, figures = F.render_image(domain, "train", index)
        away = np.ones((F.IMAGE_SIZE, F.IMAGE_SIZE), bool)
        for ann, figure in zip(anns, figures):
            x, y, w, h = ann["bbox"]
            away[max(y - 3, 0):y + h + 3, max(x - 3, 0):x + w + 3] = False
            kps = np.asarray(ann["keypoints"]).reshape(14, 3)
            joints.append(kps[kps[:, 2] > 0, :2])
            heights.append(h)
            hips = (figure.joints[F.L_HIP] + figure.joints[F.R_HIP]) / 2
            torsos.append(np.hypot(*(hips - figure.joints[F.NECK])))
        variance = local_variance(image.astype(np.float64).mean(-1))
        backgrounds.append(variance[away[1:-1, 1:-1]])
    joints = np.concatenate(joints)
    return {"background variance": np.concatenate(backgrounds).mean(), "mean": joints.mean(0),
            "sd": joints.std(0), "height": np.mean(heights), "torso": np.mean(torsos), "figures": len(heights) / count}


def test_domains_differ_in_appearance_but_share_poses():
    flat, textured = domain_statistics("flat"), domain_statistics("textured")
    assert flat["background variance"] < 1.0 < 20.0 < textured["background variance"]
    assert 1.0 <= flat["figures"] < textured["figures"] <= 3.0
    assert np.abs(flat["mean"] - textured["mean"]).max() < 8.0          # pixels, of a 128 canvas
    assert np.abs(flat["sd"] - textured["sd"]).max() < 5.0
    assert abs(flat["height"] - textured["height"]) < 0.15 * flat["height"]
    assert abs(flat["torso"] - textured["torso"]) < 0.1 * flat["torso"]
