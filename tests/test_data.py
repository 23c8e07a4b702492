"""Tests for upa.data on tiny folders in the CoOp layout, written by each test."""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from upa.data import (
    DATASETS,
    IMAGENET_VAL_PER_CLASS,
    ImageDataset,
    ImageLoadError,
    ImageSplit,
    get_spec,
    load_split,
    open_rgb_image,
)

WNIDS = ("n01440764", "n01443537", "n01484850")
IMAGENET_NAMES = ("tench", "goldfish", "great white shark")


def _write_image(path: Path, color=(10, 20, 30), mode: str = "RGB", size=(6, 4)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, size, color).save(path)
    return path


def _to_tensor(image: Image.Image) -> torch.Tensor:
    """[3, H, W] uint8, without the resizing a model transform would add."""
    return torch.from_numpy(np.array(image)).permute(2, 0, 1)


def _write_pets(data_root: Path) -> Path:
    """An OxfordPets folder with three classes; val lacks two of them on purpose."""
    root = data_root / "oxford_pets"
    split = {
        "train": [["a_cat/1.jpg", 0, "a_cat"], ["b_dog/2.jpg", 1, "b_dog"]],
        "val": [["a_cat/3.jpg", 0, "a_cat"]],
        "test": [["c_bird/4.jpg", 2, "c_bird"], ["a_cat/5.jpg", 0, "a_cat"]],
    }
    for items in split.values():
        for relative, _, _ in items:
            _write_image(root / "images" / relative)
    (root / "split_zhou_OxfordPets.json").write_text(json.dumps(split))
    return root


def _write_imagenet_classnames(folder: Path, order=WNIDS) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    names = dict(zip(WNIDS, IMAGENET_NAMES))
    path = folder / "classnames.txt"
    path.write_text("".join(f"{wnid} {names[wnid]}\n" for wnid in order))
    return path


def _write_imagenet(data_root: Path, train_counts=(4, 4, 25), val_count=2) -> Path:
    root = data_root / "imagenet"
    _write_imagenet_classnames(root)
    for wnid, count in zip(WNIDS, train_counts):
        for index in range(count):
            _write_image(root / "images" / "train" / wnid / f"{wnid}_{index}.JPEG")
        for index in range(val_count):
            _write_image(root / "images" / "val" / wnid / f"ILSVRC2012_val_{wnid}_{index}.JPEG")
    return root


# --------------------------------------------------------------------------------------------
# Spec table


def test_datasets_table_names():
    expected = {
        "ImageNet", "Caltech101", "OxfordPets", "StanfordCars", "Flowers102", "Food101",
        "FGVCAircraft", "SUN397", "DTD", "EuroSAT", "UCF101", "ImageNetV2", "ImageNetSketch",
        "ImageNetA", "ImageNetR", "Digits", "DigitsShifted", "Folder",
    }
    assert set(DATASETS) == expected


def test_datasets_table_templates():
    assert DATASETS["DTD"].single_template == "{} texture."
    assert DATASETS["Digits"].single_template == "a photo of the digit {}."
    assert DATASETS["ImageNetR"].single_template == "a photo of a {}."
    for spec in DATASETS.values():
        assert len(spec.ensemble_templates) == 7
        assert all("{}" in template for template in spec.ensemble_templates)


def test_get_spec_ignores_case_and_hyphens():
    assert get_spec("imagenet-v2").name == "ImageNetV2"
    assert get_spec("OXFORDPETS").name == "OxfordPets"
    assert get_spec("fgvc_aircraft").name == "FGVCAircraft"


def test_get_spec_unknown_lists_names():
    with pytest.raises(ValueError) as info:
        get_spec("CIFAR10")
    assert "CIFAR10" in str(info.value)
    assert "Caltech101" in str(info.value)
    assert "Digits" in str(info.value)


def test_load_split_unknown_split_lists_available(tmp_path):
    with pytest.raises(ValueError) as info:
        load_split(tmp_path, "ImageNetA", "train")
    assert "'train'" in str(info.value)
    assert "available splits: test" in str(info.value)


# --------------------------------------------------------------------------------------------
# zhou split files


def test_load_split_zhou_values(tmp_path):
    root = _write_pets(tmp_path)

    test = load_split(tmp_path, "OxfordPets", "test")

    assert test.dataset == "OxfordPets"
    assert test.split == "test"
    assert test.root == root
    assert test.paths == (root / "images/c_bird/4.jpg", root / "images/a_cat/5.jpg")
    assert test.labels.tolist() == [2, 0]
    assert test.labels.dtype == torch.int64
    assert test.classnames == ("a cat", "b dog", "c bird")
    assert test.class_subset is None


def test_load_split_zhou_class_space_from_all_splits(tmp_path):
    _write_pets(tmp_path)

    val = load_split(tmp_path, "OxfordPets", "val")

    assert val.labels.tolist() == [0]
    assert val.classnames == ("a cat", "b dog", "c bird")


def test_load_split_relative_data_root(tmp_path, monkeypatch):
    _write_pets(tmp_path)
    monkeypatch.chdir(tmp_path)

    train = load_split(".", "OxfordPets", "train")

    assert all(path.is_absolute() for path in train.paths)
    assert train.paths[0] == tmp_path / "oxford_pets/images/a_cat/1.jpg"


def test_load_split_missing_folder_names_path(tmp_path):
    with pytest.raises(FileNotFoundError) as info:
        load_split(tmp_path, "Caltech101", "train")
    message = str(info.value)
    assert str(tmp_path / "caltech-101") in message
    assert "101_ObjectCategories" in message
    assert "split_zhou_Caltech101.json" in message


def test_load_split_missing_split_file_names_path(tmp_path):
    root = _write_pets(tmp_path)
    (root / "split_zhou_OxfordPets.json").unlink()

    with pytest.raises(FileNotFoundError) as info:
        load_split(tmp_path, "OxfordPets", "train")
    message = str(info.value)
    assert f"split file not found: {root / 'split_zhou_OxfordPets.json'}" in message
    assert "oxford_pets/images/" in message


def test_load_split_missing_listed_image_names_file(tmp_path):
    root = _write_pets(tmp_path)
    (root / "images/b_dog/2.jpg").unlink()

    with pytest.raises(FileNotFoundError) as info:
        load_split(tmp_path, "OxfordPets", "train")
    message = str(info.value)
    assert str(root / "images/b_dog/2.jpg") in message
    assert "1 of 2 images" in message


def test_load_split_conflicting_classnames_raises(tmp_path):
    root = _write_pets(tmp_path)
    split = json.loads((root / "split_zhou_OxfordPets.json").read_text())
    split["test"][1][2] = "not_a_cat"
    (root / "split_zhou_OxfordPets.json").write_text(json.dumps(split))

    with pytest.raises(ValueError, match="label 0 two class names"):
        load_split(tmp_path, "OxfordPets", "train")


def test_load_split_malformed_item_raises(tmp_path):
    root = _write_pets(tmp_path)
    split = json.loads((root / "split_zhou_OxfordPets.json").read_text())
    split["train"][1] = ["b_dog/2.jpg", "1", "b_dog"]
    (root / "split_zhou_OxfordPets.json").write_text(json.dumps(split))

    with pytest.raises(ValueError, match=r"train\[1\]"):
        load_split(tmp_path, "OxfordPets", "train")


def test_load_split_empty_split_raises(tmp_path):
    root = _write_pets(tmp_path)
    split = json.loads((root / "split_zhou_OxfordPets.json").read_text())
    split["val"] = []
    (root / "split_zhou_OxfordPets.json").write_text(json.dumps(split))

    with pytest.raises(ValueError, match="contains no images"):
        load_split(tmp_path, "OxfordPets", "val")


def test_load_split_folder_dataset_root_is_data_root(tmp_path):
    _write_image(tmp_path / "images" / "red_fox" / "a.png")
    split = {"train": [["red_fox/a.png", 0, "red_fox"]], "val": [], "test": []}
    (tmp_path / "split.json").write_text(json.dumps(split))

    train = load_split(tmp_path, "Folder", "train")

    assert train.root == tmp_path
    assert train.paths == (tmp_path / "images/red_fox/a.png",)
    assert train.classnames == ("red fox",)


# --------------------------------------------------------------------------------------------
# ImageNet and its variants


def test_load_split_imagenet_test_is_official_val(tmp_path):
    root = _write_imagenet(tmp_path)

    test = load_split(tmp_path, "ImageNet", "test")

    expected = tuple(
        root / "images" / "val" / wnid / f"ILSVRC2012_val_{wnid}_{index}.JPEG"
        for wnid in WNIDS for index in range(2)
    )
    assert test.paths == expected
    assert test.labels.tolist() == [0, 0, 1, 1, 2, 2]
    assert test.classnames == IMAGENET_NAMES


def test_load_split_imagenet_val_holdout(tmp_path):
    root = _write_imagenet(tmp_path, train_counts=(4, 4, 25))

    train = load_split(tmp_path, "ImageNet", "train")
    val = load_split(tmp_path, "ImageNet", "val")

    # Per class: min(IMAGENET_VAL_PER_CLASS, count // 2) -> 2, 2 and 10 images.
    assert IMAGENET_VAL_PER_CLASS == 10
    assert torch.bincount(val.labels).tolist() == [2, 2, 10]
    assert torch.bincount(train.labels).tolist() == [2, 2, 15]
    assert not set(train.paths) & set(val.paths)
    all_train_files = set((root / "images" / "train").rglob("*.JPEG"))
    assert set(train.paths) | set(val.paths) == all_train_files

    # The held-out files are those with the smallest SHA-256 of "<wnid>/<file name>".
    wnid = WNIDS[2]
    names = [f"{wnid}_{index}.JPEG" for index in range(25)]
    ranked = sorted(names, key=lambda name: hashlib.sha256(f"{wnid}/{name}".encode()).digest())
    held_out = {path.name for path, label in zip(val.paths, val.labels.tolist()) if label == 2}
    assert held_out == set(ranked[:10])


def test_load_split_imagenet_val_is_deterministic(tmp_path):
    _write_imagenet(tmp_path)

    first = load_split(tmp_path, "ImageNet", "val")
    second = load_split(tmp_path, "ImageNet", "val")

    assert first.paths == second.paths
    assert first.fingerprint() == second.fingerprint()


def test_load_split_imagenet_missing_classnames_names_path(tmp_path):
    root = _write_imagenet(tmp_path)
    (root / "classnames.txt").unlink()

    with pytest.raises(FileNotFoundError) as info:
        load_split(tmp_path, "ImageNet", "test")
    message = str(info.value)
    assert str(root / "classnames.txt") in message
    assert "images/train/<wnid>/" in message


def test_load_split_imagenet_unsorted_classnames_raises(tmp_path):
    root = _write_imagenet(tmp_path)
    _write_imagenet_classnames(root, order=(WNIDS[1], WNIDS[0], WNIDS[2]))

    with pytest.raises(ValueError, match="sorted order"):
        load_split(tmp_path, "ImageNet", "test")


def test_load_split_imagenet_unknown_folder_raises(tmp_path):
    root = _write_imagenet(tmp_path)
    _write_image(root / "images" / "val" / "n99999999" / "x.JPEG")

    with pytest.raises(ValueError, match="n99999999"):
        load_split(tmp_path, "ImageNet", "test")


def test_load_split_imagenet_a_wnid_folders(tmp_path, caplog):
    _write_imagenet_classnames(tmp_path / "imagenet")
    image_dir = tmp_path / "imagenet-adversarial" / "imagenet-a"
    _write_image(image_dir / WNIDS[2] / "0.jpg")
    _write_image(image_dir / WNIDS[0] / "1.jpg")
    _write_image(image_dir / WNIDS[0] / "2.jpg")
    (image_dir / "README.txt").write_text("not an image")
    (image_dir / WNIDS[0] / "notes.txt").write_text("not an image")

    with caplog.at_level(logging.INFO, logger="upa.data"):
        split = load_split(tmp_path, "ImageNetA", "test")

    assert split.paths == (
        image_dir / WNIDS[0] / "1.jpg",
        image_dir / WNIDS[0] / "2.jpg",
        image_dir / WNIDS[2] / "0.jpg",
    )
    assert split.labels.tolist() == [0, 0, 2]
    assert split.classnames == IMAGENET_NAMES
    assert split.class_subset.tolist() == [0, 2]
    assert split.class_subset.dtype == torch.int64
    assert "README.txt" in caplog.text
    assert "notes.txt" in caplog.text


def test_load_split_imagenet_v2_index_folders(tmp_path):
    _write_imagenet_classnames(tmp_path / "imagenet")
    image_dir = tmp_path / "imagenetv2" / "imagenetv2-matched-frequency-format-val"
    _write_image(image_dir / "2" / "a.jpeg")
    _write_image(image_dir / "0" / "b.jpeg")

    split = load_split(tmp_path, "ImageNetV2", "test")

    assert split.paths == (image_dir / "0" / "b.jpeg", image_dir / "2" / "a.jpeg")
    assert split.labels.tolist() == [0, 2]
    assert split.classnames == IMAGENET_NAMES
    assert split.class_subset is None


def test_load_split_v2_bad_index_raises(tmp_path):
    _write_imagenet_classnames(tmp_path / "imagenet")
    image_dir = tmp_path / "imagenetv2" / "imagenetv2-matched-frequency-format-val"
    _write_image(image_dir / "3" / "a.jpeg")

    with pytest.raises(ValueError, match="0..2"):
        load_split(tmp_path, "ImageNetV2", "test")


def test_load_split_variant_missing_classnames_names_path(tmp_path):
    _write_image(tmp_path / "imagenet-sketch" / "images" / WNIDS[0] / "a.JPEG")

    with pytest.raises(FileNotFoundError) as info:
        load_split(tmp_path, "ImageNetSketch", "test")
    assert str(tmp_path / "imagenet" / "classnames.txt") in str(info.value)


def test_load_split_variant_uses_own_classnames_copy(tmp_path):
    _write_imagenet_classnames(tmp_path / "imagenet-rendition")
    _write_image(tmp_path / "imagenet-rendition" / "imagenet-r" / WNIDS[1] / "a.jpg")

    split = load_split(tmp_path, "ImageNetR", "test")

    assert split.labels.tolist() == [1]
    assert split.class_subset.tolist() == [1]
    assert split.classnames == IMAGENET_NAMES


# --------------------------------------------------------------------------------------------
# FGVC-Aircraft


def _write_aircraft(data_root: Path) -> Path:
    root = data_root / "fgvc_aircraft"
    root.mkdir(parents=True)
    (root / "variants.txt").write_text("707-320\nCessna 172\nF-16A/B\n")
    (root / "images_variant_train.txt").write_text("0001 Cessna 172\n0002 707-320\n")
    (root / "images_variant_val.txt").write_text("0003 F-16A/B\n")
    (root / "images_variant_test.txt").write_text("0004 707-320\n")
    for image_id in ("0001", "0002", "0003", "0004"):
        _write_image(root / "images" / f"{image_id}.jpg")
    return root


def test_load_split_aircraft_values(tmp_path):
    root = _write_aircraft(tmp_path)

    train = load_split(tmp_path, "FGVCAircraft", "train")

    assert train.paths == (root / "images/0001.jpg", root / "images/0002.jpg")
    assert train.labels.tolist() == [1, 0]
    assert train.classnames == ("707-320", "Cessna 172", "F-16A/B")


def test_load_split_aircraft_unknown_variant_raises(tmp_path):
    root = _write_aircraft(tmp_path)
    (root / "images_variant_test.txt").write_text("0004 707-320\n0001 Concorde\n")

    with pytest.raises(ValueError, match="line 2: variant 'Concorde'"):
        load_split(tmp_path, "FGVCAircraft", "test")


def test_load_split_aircraft_missing_variants_names_path(tmp_path):
    root = _write_aircraft(tmp_path)
    (root / "variants.txt").unlink()

    with pytest.raises(FileNotFoundError) as info:
        load_split(tmp_path, "FGVCAircraft", "val")
    assert str(root / "variants.txt") in str(info.value)


# --------------------------------------------------------------------------------------------
# ImageSplit


def _tiny_split(tmp_path: Path, labels) -> ImageSplit:
    paths = tuple(_write_image(tmp_path / f"{index}.png") for index in range(len(labels)))
    return ImageSplit(
        dataset="Folder",
        split="train",
        root=tmp_path,
        paths=paths,
        labels=torch.tensor(labels, dtype=torch.int64),
        classnames=("a", "b"),
    )


def test_fingerprint_changes_with_label(tmp_path):
    original = _tiny_split(tmp_path, [0, 1, 1])
    relabeled = _tiny_split(tmp_path, [0, 1, 0])
    same = _tiny_split(tmp_path, [0, 1, 1])

    assert len(original.fingerprint()) == 64
    assert original.fingerprint() == same.fingerprint()
    assert original.fingerprint() != relabeled.fingerprint()


def test_fingerprint_changes_with_file_size(tmp_path):
    split = _tiny_split(tmp_path, [0, 1])
    before = split.fingerprint()

    split.paths[1].write_bytes(split.paths[1].read_bytes() + b"\0")

    assert split.fingerprint() != before


def test_fingerprint_independent_of_root_location(tmp_path):
    first = _tiny_split(tmp_path / "one", [0, 1])
    second = _tiny_split(tmp_path / "two", [0, 1])

    assert first.fingerprint() == second.fingerprint()


def test_image_split_label_out_of_range_raises(tmp_path):
    with pytest.raises(ValueError, match=r"\[0, 2\)"):
        _tiny_split(tmp_path, [0, 2])


# --------------------------------------------------------------------------------------------
# Images


@pytest.mark.parametrize(
    ("mode", "color", "file_name", "expected"),
    [
        ("L", 100, "gray.png", (100, 100, 100)),
        ("RGBA", (10, 20, 30, 0), "alpha.png", (10, 20, 30)),
        ("CMYK", (0, 0, 0, 0), "cmyk_white.jpg", (255, 255, 255)),
        ("CMYK", (255, 0, 0, 0), "cmyk_cyan.tiff", (0, 255, 255)),
        ("1", 1, "binary.png", (255, 255, 255)),
    ],
)
def test_open_rgb_image_converts_mode(tmp_path, mode, color, file_name, expected):
    path = _write_image(tmp_path / file_name, color=color, mode=mode)
    assert Image.open(path).mode == mode

    image = open_rgb_image(path)

    assert image.mode == "RGB"
    pixels = np.asarray(image).reshape(-1, 3)
    # JPEG may move a flat colour by a unit or two.
    assert np.abs(pixels.astype(int) - np.array(expected)).max() <= 2


def test_open_rgb_image_palette(tmp_path):
    image = Image.new("P", (4, 4), 1)
    image.putpalette([0, 0, 0, 10, 20, 30] + [0] * (256 * 3 - 6))
    image.info["transparency"] = 0
    path = tmp_path / "palette.png"
    image.save(path, transparency=0)
    assert Image.open(path).mode == "P"

    rgb = open_rgb_image(path)

    assert rgb.mode == "RGB"
    assert np.asarray(rgb)[0, 0].tolist() == [10, 20, 30]


def test_open_rgb_image_sixteen_bit_gray_rescaled(tmp_path):
    values = np.array([[0, 257 * 100], [257 * 200, 65535]], dtype=np.uint16)
    path = tmp_path / "deep.png"
    Image.fromarray(values).save(path)
    assert Image.open(path).mode.startswith("I")

    rgb = np.asarray(open_rgb_image(path))

    assert rgb[..., 0].tolist() == [[0, 100], [200, 255]]
    assert (rgb[..., 0] == rgb[..., 2]).all()


def test_open_rgb_image_garbage_raises(tmp_path):
    path = tmp_path / "broken.jpg"
    path.write_bytes(b"this is not an image" * 10)

    with pytest.raises(ImageLoadError) as info:
        open_rgb_image(path)
    assert str(path) in str(info.value)
    assert info.value.path == path
    assert isinstance(info.value, RuntimeError)


def test_open_rgb_image_truncated_raises(tmp_path):
    source = tmp_path / "full.jpg"
    noise = np.random.default_rng(0).integers(0, 256, size=(64, 64, 3), dtype=np.uint8)
    Image.fromarray(noise).save(source, quality=95)
    truncated = tmp_path / "truncated.jpg"
    truncated.write_bytes(source.read_bytes()[: source.stat().st_size // 2])

    with pytest.raises(ImageLoadError) as info:
        open_rgb_image(truncated)
    assert str(truncated) in str(info.value)


def test_image_dataset_items_and_indices(tmp_path):
    _write_pets(tmp_path)
    _write_image(tmp_path / "oxford_pets/images/c_bird/4.jpg", mode="L", color=50, size=(3, 5))
    split = load_split(tmp_path, "OxfordPets", "test")

    dataset = ImageDataset(split, _to_tensor, indices=torch.tensor([1, 0]))

    assert len(dataset) == 2
    image, position = dataset[1]
    assert position == 0
    assert image.shape == (3, 5, 3)
    assert image.dtype == torch.uint8
    assert dataset[0][1] == 1


def test_image_dataset_index_out_of_range_raises(tmp_path):
    _write_pets(tmp_path)
    split = load_split(tmp_path, "OxfordPets", "test")

    with pytest.raises(IndexError, match=r"\[0, 2\)"):
        ImageDataset(split, _to_tensor, indices=[0, 2])


def test_image_dataset_corrupt_file_in_worker_names_file(tmp_path):
    root = _write_pets(tmp_path)
    broken = root / "images/a_cat/5.jpg"
    broken.write_bytes(b"\x00" * 100)
    split = load_split(tmp_path, "OxfordPets", "test")
    loader = DataLoader(ImageDataset(split, _to_tensor), batch_size=2, num_workers=1)

    with pytest.raises(ImageLoadError) as info:
        next(iter(loader))
    assert str(info.value).startswith(f"cannot load image {broken}: ")
    assert "DataLoader worker" not in str(info.value)
    assert info.value.path == str(broken)


def test_cached_fingerprint_computed_once(tmp_path, monkeypatch):
    _write_pets(tmp_path)
    split = load_split(tmp_path, "OxfordPets", "test")
    calls = []
    original = ImageSplit.fingerprint
    monkeypatch.setattr(ImageSplit, "fingerprint", lambda self: calls.append(1) or original(self))
    first = split.cached_fingerprint()
    second = split.cached_fingerprint()
    assert first == second == original(split)
    assert len(calls) == 1
