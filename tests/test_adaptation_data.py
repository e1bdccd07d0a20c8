import numpy as np
import pytest
from PIL import Image

from adaptation import digits
from adaptation.classification.data import image_transform, load_dataset, read_list_file, scan_class_folders
from adaptation.common import DataError
from workbench.backbones import create_backbone


@pytest.fixture(autouse=True)
def _data_cache(tmp_path_factory, monkeypatch):
    # one cache for the whole session, outside the user's home
    monkeypatch.setenv("WORKBENCH_DATA", str(tmp_path_factory.getbasetemp() / "wbdata"))


def write_images(folder, n, size=(12, 10)):
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(n):
        p = folder / f"img{i}.png"
        Image.fromarray(np.full((*size, 3), i * 20, np.uint8)).save(p)
        paths.append(p)
    return paths


def test_builtin_domains_are_deterministic_and_split(tmp_path):
    x, y = digits.load_domain("uci", "trainval")
    xt, yt = digits.load_domain("uci", "test")
    assert x.shape[1:] == (32, 32, 3) and x.dtype == np.uint8
    assert len(x) + len(xt) == 1797 and set(np.unique(y)) == set(range(10))
    # stratified: every class keeps close to 20% in test
    counts = np.bincount(yt, minlength=10) / (np.bincount(y, minlength=10) + np.bincount(yt, minlength=10))
    assert np.all(np.abs(counts - 0.2) < 0.02)
    # rebuilding from scratch gives identical arrays
    path = digits.build_domain("uci")
    first = np.load(path)["x_train"].copy()
    assert np.array_equal(np.load(digits.build_domain("uci", force=True))["x_train"], first)


def test_val_is_a_stratified_tenth_of_trainval_disjoint_from_train_and_test():
    images, labels = digits.load_domain("uci", "trainval")
    parts = {s: digits.load_domain("uci", s) for s in ("train", "val", "test")}
    assert len(parts["train"][0]) + len(parts["val"][0]) == len(images)
    # every trainval image lands in exactly one of train and val, and no test image is in either
    key = lambda x: {a.tobytes() for a in x}  # noqa: E731
    train, val, test = (key(parts[s][0]) for s in ("train", "val", "test"))
    assert not (train & val) and not (val & test) and not (train & test)
    assert train | val == key(images)
    per_class = np.bincount(parts["val"][1], minlength=10) / np.bincount(labels, minlength=10)
    assert np.all(np.abs(per_class - 0.1) < 0.03)
    assert np.array_equal(digits.load_domain("uci", "val")[0], parts["val"][0])  # fixed, not re-drawn


def test_a_split_less_builtin_spec_is_trainval_and_a_bad_split_is_one_line():
    from adaptation.common import DataError
    from adaptation.classification.data import parse_builtin

    assert parse_builtin("builtin:digits/uci") == ("uci", "trainval")
    assert parse_builtin("builtin:digits/photo:val") == ("photo", "val")
    with pytest.raises(DataError, match="unknown split 'valid'.*train, val, test"):
        parse_builtin("builtin:digits/uci:valid")


def test_a_digits_source_fits_train_and_selects_on_val_unless_told(tmp_path):
    from adaptation.classification.source import SourceConfig, selection_sets

    fit, selection, name = selection_sets(SourceConfig(data="builtin:digits/uci"), "digits")
    assert name == "builtin:digits/uci:val"
    assert len(fit) == len(digits.load_domain("uci", "train")[0])
    assert len(selection) == len(digits.load_domain("uci", "val")[0])
    _, _, name = selection_sets(SourceConfig(data="builtin:digits/uci", select_on="builtin:digits/uci:test"), "digits")
    assert name == "builtin:digits/uci:test"  # the digits benchmark's preset: SHOT's protocol
    with pytest.raises(ValueError, match="overlaps --data"):
        selection_sets(SourceConfig(data="builtin:digits/uci", select_on="builtin:digits/uci:val"), "digits")


def test_photo_is_the_mnist_m_blend_of_uci_digits():
    import skimage
    from pathlib import Path

    photo, labels = digits.build_photo(np.random.default_rng(0))
    grey, uci_labels = digits._uci_digits_32()
    assert np.array_equal(labels, uci_labels)
    # replay the crop draws and blend by hand: |crop - digit| in every channel
    rng = np.random.default_rng(0)
    pictures = [np.asarray(Image.open(Path(skimage.__file__).parent / "data" / n).convert("RGB"))
                for n in digits.PHOTOS]
    for i in range(3):
        pic = pictures[rng.integers(len(pictures))]
        top, left = rng.integers(pic.shape[0] - 32), rng.integers(pic.shape[1] - 32)
        crop = pic[top:top + 32, left:left + 32].astype(int)
        assert np.array_equal(photo[i], np.abs(crop - grey[i][..., None].astype(int)))


def test_fonts_domain_uses_only_digit_faces():
    names = {p.name for p in digits.digit_fonts()}
    assert "DejaVuSans.ttf" in names and "cmsy10.ttf" not in names and "cmex10.ttf" not in names
    x, y = digits.load_domain("fonts", "test")
    assert np.bincount(y).tolist() == [120] * 10


def test_list_file_and_class_folders(tmp_path):
    paths = write_images(tmp_path / "imgs", 3)
    lst = tmp_path / "list.txt"
    lst.write_text("".join(f"imgs/{p.name} {i}\n" for i, p in enumerate(paths)))
    ds = load_dataset(str(lst), image_transform("digits", train=False), num_classes=3)
    img, label, index = ds[2]
    assert img.shape == (3, 32, 32) and label == 2 and index == 2
    write_images(tmp_path / "tree" / "cat", 2)
    write_images(tmp_path / "tree" / "dog", 1)
    samples, classes = scan_class_folders(tmp_path / "tree")
    assert classes == ["cat", "dog"] and [s.label for s in samples] == [0, 0, 1]


@pytest.mark.parametrize("content,pattern", [
    ("", "holds no samples"),
    ("imgs/img0.png seven\n", "expected '<path> <int label>'"),
    ("imgs/missing.png 0\n", "does not exist"),
])
def test_bad_list_files(tmp_path, content, pattern):
    write_images(tmp_path / "imgs", 1)
    lst = tmp_path / "list.txt"
    lst.write_text(content)
    with pytest.raises(DataError, match=pattern) as err:
        read_list_file(lst)
    assert "\n" not in str(err.value)


def test_label_outside_class_range_and_corrupt_image(tmp_path):
    paths = write_images(tmp_path / "imgs", 2)
    lst = tmp_path / "list.txt"
    lst.write_text(f"imgs/{paths[0].name} 0\nimgs/{paths[1].name} 12\n")
    with pytest.raises(DataError, match="list.txt line 2: label 12 is outside 0..9 for a 10-class model"):
        load_dataset(str(lst), image_transform("digits", False), num_classes=10)
    paths[1].write_bytes(b"not a png at all")
    lst.write_text(f"imgs/{paths[0].name} 0\nimgs/{paths[1].name} 1\n")
    ds = load_dataset(str(lst), image_transform("digits", False), num_classes=10)
    with pytest.raises(DataError, match="corrupt"):
        ds[1]


def test_a_label_outside_the_model_classes_names_its_line_and_the_valid_range(tmp_path):
    paths = write_images(tmp_path / "imgs", 10)
    lines = ["# target domain, one image per class", ""] + [f"imgs/{p.name} {i}" for i, p in enumerate(paths)]
    lines[7] = f"imgs/{paths[5].name} 99"  # file line 8: the 6th sample, after a comment and a blank line
    lst = tmp_path / "targets.txt"
    lst.write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError) as err:
        load_dataset(str(lst), image_transform("digits", False), num_classes=10)
    assert str(err.value) == (f"{lst} line 8: label 99 is outside 0..9 for a 10-class model: "
                              f"fix the label or pass the right list file")
    for name in ("a", "b", "c"):
        write_images(tmp_path / "tree" / name, 1)
    with pytest.raises(DataError, match="has 3 class folders: folder 'c' gets label 2, outside 0..1 for a 2-class"):
        load_dataset(str(tmp_path / "tree"), image_transform("digits", False), num_classes=2)


def test_unknown_builtin_and_missing_path():
    with pytest.raises(ValueError, match="uci, fonts, photo"):
        load_dataset("builtin:digits/mnist", image_transform("digits", False))
    with pytest.raises(DataError, match="neither a list file"):
        load_dataset("/nonexistent/list.txt", image_transform("digits", False))


@pytest.mark.parametrize("name,dim", [("lenet", 1250), ("dtn", 4096)])
def test_digit_backbones(name, dim):
    import torch
    net = create_backbone(name)
    assert net.out_dim == dim and net(torch.rand(2, 3, 32, 32)).shape == (2, dim)


def test_resnet_pretrained_file_loads_and_mismatch_is_clear(tmp_path):
    import torch
    import torchvision
    weights = tmp_path / "r18.pth"
    reference = torchvision.models.resnet18().state_dict()
    torch.save(reference, weights)
    net = create_backbone("resnet18", pretrained=str(weights))
    assert torch.equal(net.stem[0].weight, reference["conv1.weight"])
    assert net(torch.rand(1, 3, 64, 64)).shape == (1, 512)
    with pytest.raises(ValueError, match="do not match"):
        create_backbone("resnet50", pretrained=str(weights))


def test_an_image_that_vanished_or_is_not_an_image_is_one_error_naming_the_list_and_the_fix(tmp_path):
    """Every task reads images through adaptation.common.read_image: the same message for the same fault."""
    from adaptation.classification.data import ImageFileDataset, Sample
    from adaptation.common import DataError, read_image

    (tmp_path / "notes.png").write_text("not a picture")
    with pytest.raises(DataError, match=r"^list.txt: image .*gone.png does not exist: restore it or fix its path$"):
        read_image(tmp_path / "gone.png", "list.txt")
    with pytest.raises(DataError, match=r"^list.txt: mask .*notes.png is corrupt or not an image "
                                        r"\(UnidentifiedImageError\): replace it or remove it$"):
        read_image(tmp_path / "notes.png", "list.txt", what="mask")
    data = ImageFileDataset([Sample(str(tmp_path / "notes.png"), 0)], lambda image: image, "train.txt")
    with pytest.raises(DataError, match=r"^train.txt: image .*notes.png is corrupt"):
        data[0]
