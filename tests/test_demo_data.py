"""Tests for the Digits dataset built from scikit-learn's bundled images."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import sklearn
from PIL import Image
from sklearn.datasets import load_digits

from upa import demo_data
from upa.data import load_split
from upa.demo_data import COMPLETE_MARKER, build_digits, is_complete


@pytest.fixture(scope="module")
def digits_root(tmp_path_factory) -> Path:
    data_root = tmp_path_factory.mktemp("digits_data")
    build_digits(data_root)
    return data_root


@pytest.fixture(scope="module")
def split_file(digits_root) -> dict:
    return json.loads((digits_root / "digits" / "split_zhou_Digits.json").read_text())


def test_build_digits_writes_all_images(digits_root):
    images = sorted((digits_root / "digits" / "images").rglob("*.png"))

    assert len(images) == 1797
    assert {path.parent.name for path in images} == {str(digit) for digit in range(10)}


def test_build_digits_split_counts(split_file):
    counts = {name: len(items) for name, items in split_file.items()}

    # sklearn rounds test sizes up: ceil(0.25 * 1797) = 450, then ceil(0.2 * 1347) = 270.
    assert counts == {"train": 1077, "val": 270, "test": 450}
    assert sum(counts.values()) == 1797


def test_build_digits_splits_partition_rows(split_file):
    paths = [item[0] for items in split_file.values() for item in items]

    assert len(set(paths)) == 1797
    rows = sorted(int(Path(path).stem) for path in paths)
    assert rows == list(range(1797))


def test_build_digits_labels_match_source(split_file):
    targets = load_digits().target

    for items in split_file.values():
        for relative, label, classname in items:
            row = int(Path(relative).stem)
            assert label == targets[row], relative
            assert classname == str(targets[row])
            assert Path(relative).parent.name == classname


def test_build_digits_stratified(split_file):
    class_sizes = Counter(load_digits().target.tolist())
    fractions = {"train": 0.60, "val": 0.15, "test": 0.25}

    for name, items in split_file.items():
        per_class = Counter(label for _, label, _ in items)
        for label, size in class_sizes.items():
            # Stratified rounding keeps each class within about one image of its share.
            assert abs(per_class[label] - fractions[name] * size) <= 1.5, (name, label)


def test_build_digits_image_matches_source(digits_root, split_file):
    source = load_digits().images  # [1797, 8, 8], values 0..16
    relative = split_file["test"][0][0]
    row = int(Path(relative).stem)

    image = Image.open(digits_root / "digits" / "images" / relative)

    assert image.mode == "L"
    assert image.size == (demo_data.IMAGE_SIZE, demo_data.IMAGE_SIZE)
    block = demo_data.IMAGE_SIZE // 8
    pooled = np.asarray(image, dtype=float).reshape(8, block, 8, block).mean(axis=(1, 3))
    expected = source[row] * 255 / 16
    assert np.corrcoef(pooled.ravel(), expected.ravel())[0, 1] > 0.95


def test_build_digits_provenance(digits_root):
    provenance = json.loads((digits_root / "digits" / "PROVENANCE.json").read_text())

    assert "scikit-learn load_digits" in provenance["source"]
    assert sklearn.__version__ in provenance["source"]
    assert provenance["generated_by"].startswith("upa ")
    assert provenance["counts"]["total"] == 1797
    assert provenance["counts"]["test"] == 450
    assert sum(provenance["counts"]["per_class"].values()) == 1797
    assert provenance["split"]["seed"] == 0


def test_build_digits_loads_as_split(digits_root):
    train = load_split(digits_root, "Digits", "train")

    assert len(train) == 1077
    assert train.classnames == tuple(str(digit) for digit in range(10))
    assert train.labels.bincount().sum() == 1077


def test_build_digits_is_reproducible(digits_root, tmp_path):
    build_digits(tmp_path)

    for split in ("train", "val", "test"):
        original = load_split(digits_root, "Digits", split)
        rebuilt = load_split(tmp_path, "Digits", split)
        assert original.fingerprint() == rebuilt.fingerprint(), split


def test_build_digits_rerun_is_noop(tmp_path):
    folder = build_digits(tmp_path)
    marker_time = (folder / COMPLETE_MARKER).stat().st_mtime_ns
    (folder / "sentinel.txt").write_text("kept")

    again = build_digits(tmp_path)

    assert again == folder
    assert (folder / "sentinel.txt").exists()
    assert (folder / COMPLETE_MARKER).stat().st_mtime_ns == marker_time


def test_build_digits_overwrite_rebuilds(tmp_path):
    folder = build_digits(tmp_path)
    (folder / "sentinel.txt").write_text("stale")

    build_digits(tmp_path, overwrite=True)

    assert not (folder / "sentinel.txt").exists()
    assert is_complete(folder)
    assert len(list((folder / "images").rglob("*.png"))) == 1797
    assert [path.name for path in tmp_path.iterdir()] == ["digits"]


def test_build_digits_partial_build_recovered(tmp_path):
    partial = tmp_path / "digits" / "images" / "3"
    partial.mkdir(parents=True)
    (partial / "0003.png").write_bytes(b"half written")

    folder = build_digits(tmp_path)

    assert is_complete(folder)
    assert len(list((folder / "images").rglob("*.png"))) == 1797
    Image.open(folder / "images" / "3" / "0003.png").load()


def test_build_digits_outdated_marker_rebuilt(tmp_path):
    folder = build_digits(tmp_path)
    (folder / COMPLETE_MARKER).write_text(json.dumps({"format_version": 0}))
    (folder / "sentinel.txt").write_text("stale")

    build_digits(tmp_path)

    assert is_complete(folder)
    assert not (folder / "sentinel.txt").exists()


def test_build_digits_failure_leaves_no_files(tmp_path, monkeypatch):
    def write_then_fail(folder: Path) -> None:
        (folder / "images").mkdir()
        raise OSError("disk full")

    monkeypatch.setattr(demo_data, "_write_digits", write_then_fail)

    with pytest.raises(OSError, match="disk full"):
        build_digits(tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_build_digits_shifted_is_inverted_rotated_test_split(tmp_path):
    demo_data.build_digits_shifted(tmp_path)
    build_digits(tmp_path)
    shifted = load_split(tmp_path, "DigitsShifted", "test")
    original = load_split(tmp_path, "Digits", "test")
    assert [p.name for p in shifted.paths] == [p.name for p in original.paths]
    assert shifted.labels.tolist() == original.labels.tolist()
    # Strokes are white on black in Digits and black on white after the shift: the corner pixel,
    # always background, flips from 0 to 255.
    assert np.asarray(Image.open(original.paths[0]))[0, 0] == 0
    assert np.asarray(Image.open(shifted.paths[0]))[0, 0] == 255
    with pytest.raises(ValueError, match="train"):
        load_split(tmp_path, "DigitsShifted", "train")
