"""The built-in crowd videos and the PoseTrack reader: layout, identities that persist, occlusion by depth,
textures that move with their person, and one-line errors for missing frames and unreadable videos."""

import json

import numpy as np
import pytest

from adaptation.pose import figures
from adaptation.tracking import crowds
from adaptation.tracking.data import DataError, load_video, load_videos

SMALL = {"n_train": 1, "n_test": 1, "n_val": 1, "frames": 12}


@pytest.fixture
def data_root(tmp_path, monkeypatch):
    monkeypatch.setenv("WORKBENCH_DATA", str(tmp_path / "data"))
    return tmp_path / "data"


def test_a_built_video_is_posetrack_json_whose_people_keep_their_ids_and_move_smoothly(data_root):
    root = crowds.build_domain("flat", **SMALL)
    files = crowds.video_files("flat", "test", **SMALL)
    assert [f.relative_to(root).as_posix() for f in files] == ["annotations/test/000001.json"]
    data = json.loads(files[0].read_text())
    assert [im["frame_id"] for im in data["images"]] == [crowds.image_id(0, f) for f in range(12)]
    assert data["categories"][0]["keypoints"] == list(figures.JOINTS)
    video = load_video(files[0])
    assert len(video.frames) == 12 and all(frame.path.is_file() for frame in video.frames)
    assert video.frames[0].image().shape == (figures.IMAGE_SIZE, figures.IMAGE_SIZE, 3)
    walkers, _ = crowds.video_people("flat", "test", 0)
    track = {}
    for index, frame in enumerate(video.frames):
        for person in frame.people:
            # the annotation is the walker's figure at that frame: ids name the same person throughout
            truth = walkers[person.track_id].figure(index).joints
            shown = person.keypoints[:, 2] > 0
            assert np.allclose(person.keypoints[shown, :2], truth[shown], atol=0.01)
            track.setdefault(person.track_id, []).append((index, truth[figures.NECK]))
    assert len(track) >= 2
    step = max(crowds.SPEED[1], 1) + crowds.DRIFT
    for points in track.values():
        for (f0, a), (f1, b) in zip(points, points[1:]):
            assert np.hypot(*(b - a)) <= step * (f1 - f0) + 1e-6   # the neck moves at the walker's speed


def test_the_nearer_person_hides_the_farther_one(data_root):
    rng = np.random.default_rng(0)
    far, near = crowds.sample_walker(rng), crowds.sample_walker(rng)
    # both necks at the canvas centre at frame 0; the near one stands 10 px lower, so it is drawn on top
    far = crowds.Walker(**{**far.__dict__, "start": np.array([64.0, 40.0]), "velocity": np.array([1.0, 0.0])})
    near = crowds.Walker(**{**near.__dict__, "start": np.array([64.0, 50.0]), "velocity": np.array([-1.0, 0.0]),
                            "height": far.height, "size": far.size, "radius": far.radius})
    scene = crowds.flat_scene(np.random.default_rng(1), 2)
    _, people = crowds.render_frame([far, near], scene, 0)
    flags = {p["track_id"]: np.array(p["keypoints"]).reshape(-1, 3)[:, 2] for p in people}
    assert (flags[0] == 1).sum() > (flags[1] == 1).sum()   # hidden joints: the far person has more
    # the same two swapped in depth: the other one loses the joints
    far_low = crowds.Walker(**{**far.__dict__, "start": np.array([64.0, 60.0])})
    _, people = crowds.render_frame([far_low, near], scene, 0)
    flags = {p["track_id"]: np.array(p["keypoints"]).reshape(-1, 3)[:, 2] for p in people}
    assert (flags[1] == 1).sum() > (flags[0] == 1).sum()


def test_a_texture_moves_with_its_person():
    fill = np.random.default_rng(0).uniform(0, 255, (figures.IMAGE_SIZE, figures.IMAGE_SIZE, 3))
    before = crowds.moved_fill(fill, np.array([60.0, 50.0]))
    after = crowds.moved_fill(fill, np.array([63.0, 48.0]))   # the neck moved 3 right and 2 up
    assert np.array_equal(after[20:100, 23:103], before[22:102, 20:100])
    colour = np.array([10.0, 20.0, 30.0])
    assert crowds.moved_fill(colour, np.array([5.0, 5.0])) is colour


def test_the_domains_share_motion_and_differ_in_appearance(data_root):
    flat, _ = crowds.video_people("flat", "train", 3)
    textured, _ = crowds.video_people("textured", "train", 3)
    assert crowds.render_video("flat", "train", 3, frames=2).__next__()[0].std() > 0
    # seeds differ per domain, but both draw from the same distributions: speeds and heights in range
    for walker in flat + textured:
        assert crowds.SPEED[0] <= abs(walker.velocity[0]) <= crowds.SPEED[1]
        assert crowds.HEIGHT[0] <= walker.height <= crowds.HEIGHT[1]
    images = [image for image, _ in crowds.render_video("textured", "train", 3, frames=2)]
    assert not np.array_equal(images[0], images[1])   # fresh noise, moving people


def test_a_missing_frame_is_one_line_naming_it(data_root, tmp_path):
    root = crowds.build_domain("flat", **SMALL)
    [path] = crowds.video_files("flat", "val", **SMALL)
    (root / "images" / "val" / "000001" / "000005.png").unlink()
    with pytest.raises(DataError, match=r"frame images/val/000001/000005.png does not exist under .*: restore it"):
        load_video(path)
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"images": []}))
    with pytest.raises(DataError, match="no annotations, categories in it"):
        load_video(bad)


def test_videos_and_frame_folders_load_and_an_unreadable_video_is_one_line(data_root, tmp_path):
    frames = [image for image, _ in crowds.render_video("flat", "test", 0, frames=4)]
    folder = tmp_path / "frames"
    folder.mkdir()
    from PIL import Image

    for index, image in enumerate(frames):
        Image.fromarray(image).save(folder / f"{index:03d}.png")
    Image.fromarray(frames[0]).save(tmp_path / "clip.gif", save_all=True,
                                    append_images=[Image.fromarray(f) for f in frames[1:]])
    [from_folder] = load_videos(str(folder))
    [from_gif] = load_videos(str(tmp_path / "clip.gif"))
    assert len(from_folder.frames) == len(from_gif.frames) == 4 and not from_gif.annotated
    assert np.array_equal(from_folder.frames[2].image(), frames[2])
    broken = tmp_path / "broken.mp4"
    broken.write_bytes(b"not a video")
    with pytest.raises(DataError, match="cannot read any frame of this video: convert it to MP4"):
        load_videos(str(broken))
    with pytest.raises(ValueError, match="unknown built-in crowds domain 'night'"):
        load_videos("builtin:crowds/night")


def test_the_crowds_people_are_pose_data(data_root, monkeypatch):
    from adaptation.pose.data import KeypointDataset

    monkeypatch.setenv("WORKBENCH_CROWDS_N", "1,1,1")
    monkeypatch.setenv("WORKBENCH_CROWDS_FRAMES", "8")
    dataset = KeypointDataset("builtin:crowds/flat:test", train=False, input_size=(96, 128))
    [path] = crowds.video_files("flat", "test")
    people = [a for a in json.loads(path.read_text())["annotations"] if a["num_keypoints"] > 0]
    assert len(dataset) == len(people) and dataset.flip_pairs == [tuple(p) for p in figures.FLIP_PAIRS]
    record = dataset.records[5]
    assert np.allclose(record["keypoints"].ravel(), people[5]["keypoints"]) and record["file"].is_file()
