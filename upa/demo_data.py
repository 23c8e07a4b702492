"""The embedded Digits dataset: scikit-learn's bundled handwritten digits in the CoOp layout.

``build_digits`` writes the 1797 8x8 images of ``sklearn.datasets.load_digits`` (the test part
of the UCI optical recognition of handwritten digits data, shipped inside scikit-learn, so
nothing is downloaded) as PNG files and a zhou-style split file:

    <data_root>/digits/images/<digit>/<row>.png     row = index in load_digits, zero-padded
    <data_root>/digits/split_zhou_Digits.json       train / val / test lists
    <data_root>/digits/PROVENANCE.json              source, versions, counts
    <data_root>/digits/BUILD_COMPLETE               written last; marks a finished build

``build_digits_shifted`` writes a test-only copy of the Digits test images under a distribution
shift (strokes inverted to black on white and rotated by 20 degrees) to
``<data_root>/digits-shifted/`` in the same layout. It replaces ImageNet's shifted test
sets in the demo of the domain-generalisation notebook: adapt on Digits, evaluate on both.

Pixel values 0..16 are scaled to 0..255, giving white strokes on black as in the source data.
The 8x8 images are upscaled to ``IMAGE_SIZE`` with bicubic interpolation, because smooth strokes
resemble pen strokes more than 8-pixel blocks do. The model's own preprocessing resizes further.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
import sklearn
from PIL import Image
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split

from upa import __version__

logger = logging.getLogger(__name__)

DIGITS_FOLDER = "digits"
SHIFTED_FOLDER = "digits-shifted"
SHIFTED_SPLIT_FILE = "split_zhou_DigitsShifted.json"
SHIFT_ROTATION_DEGREES = 20
SPLIT_FILE = "split_zhou_Digits.json"
PROVENANCE_FILE = "PROVENANCE.json"
COMPLETE_MARKER = "BUILD_COMPLETE"
CLASSNAMES = tuple(str(digit) for digit in range(10))

IMAGE_SIZE = 64
# Split fractions of all images, stratified by digit with a fixed seed. With sklearn's rounding
# (test and val sizes are rounded up) this gives 1077 / 270 / 450 images.
TEST_FRACTION = 0.25
VAL_FRACTION = 0.15
SPLIT_SEED = 0
# Raised when the files or the split change, so that older builds are rebuilt.
FORMAT_VERSION = 1

_MAX_PIXEL_VALUE = 16  # load_digits pixels count set bits in a 4x4 block of a 32x32 bitmap


def build_digits(data_root: str | Path, overwrite: bool = False) -> Path:
    """Write the Digits dataset under ``data_root`` and return ``<data_root>/digits``."""
    return _build(data_root, DIGITS_FOLDER, _write_digits, overwrite)


def build_digits_shifted(data_root: str | Path, overwrite: bool = False) -> Path:
    """Write the shifted Digits test set under ``data_root`` and return ``<data_root>/digits-shifted``."""
    return _build(data_root, SHIFTED_FOLDER, _write_shifted, overwrite)


def _build(data_root: str | Path, folder_name: str, writer, overwrite: bool) -> Path:
    """Write one dataset folder with ``writer`` and return it.

    A complete build of the current format is reused unless ``overwrite`` is True. An
    incomplete or outdated folder is rebuilt. The files are written to a temporary folder next
    to the target and renamed into place, so readers never see a half-written dataset.
    """
    data_root = Path(data_root).expanduser().absolute()
    target = data_root / folder_name
    if not overwrite and is_complete(target):
        logger.info("%s already built at %s", folder_name, target)
        return target
    if target.exists() and not overwrite:
        logger.warning("rebuilding incomplete or outdated %s at %s", folder_name, target)

    data_root.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{folder_name}-build-", dir=data_root))
    try:
        writer(staging)
        _move_into_place(staging, target)
    finally:
        if staging.exists():
            shutil.rmtree(staging)
    logger.info("built %s at %s", folder_name, target)
    return target


def is_complete(folder: str | Path) -> bool:
    """Return whether ``folder`` contains a finished Digits build of the current format."""
    marker = Path(folder) / COMPLETE_MARKER
    try:
        content = json.loads(marker.read_text())
    except (OSError, json.JSONDecodeError):
        return False
    return isinstance(content, dict) and content.get("format_version") == FORMAT_VERSION


def _write_digits(folder: Path) -> None:
    digits = load_digits()
    images = np.round(digits.images * (255 / _MAX_PIXEL_VALUE)).astype(np.uint8)  # [N, 8, 8]
    labels = digits.target.astype(int)
    rows = np.arange(len(labels))

    relative_paths = [f"{CLASSNAMES[label]}/{row:04d}.png" for row, label in zip(rows, labels)]
    for row, relative in enumerate(relative_paths):
        path = folder / "images" / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        image = Image.fromarray(images[row])
        image.resize((IMAGE_SIZE, IMAGE_SIZE), Image.Resampling.BICUBIC).save(path)

    split_rows = _split_rows(labels)
    split = {
        name: [[relative_paths[row], int(labels[row]), CLASSNAMES[labels[row]]] for row in members]
        for name, members in split_rows.items()
    }
    (folder / SPLIT_FILE).write_text(json.dumps(split, indent=1))
    (folder / PROVENANCE_FILE).write_text(json.dumps(_provenance(labels, split_rows), indent=2))

    # The marker goes last: its presence means every file above was written.
    marker = {"format_version": FORMAT_VERSION, "num_images": len(labels)}
    (folder / COMPLETE_MARKER).write_text(json.dumps(marker))


def _write_shifted(folder: Path) -> None:
    digits = load_digits()
    images = np.round(digits.images * (255 / _MAX_PIXEL_VALUE)).astype(np.uint8)
    labels = digits.target.astype(int)
    test_rows = _split_rows(labels)["test"]

    items = []
    for row in test_rows:
        relative = f"{CLASSNAMES[labels[row]]}/{row:04d}.png"
        path = folder / "images" / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        image = Image.fromarray(images[row]).resize((IMAGE_SIZE, IMAGE_SIZE), Image.Resampling.BICUBIC)
        # Rotate white-on-black first so the corners fill with background, then invert.
        image = image.rotate(SHIFT_ROTATION_DEGREES, resample=Image.Resampling.BICUBIC, fillcolor=0)
        Image.fromarray(255 - np.asarray(image)).save(path)
        items.append([relative, int(labels[row]), CLASSNAMES[labels[row]]])

    (folder / SHIFTED_SPLIT_FILE).write_text(json.dumps({"train": [], "val": [], "test": items}, indent=1))
    provenance = _provenance(labels, {"test": test_rows})
    provenance.update(
        dataset="DigitsShifted",
        shift=f"test images of Digits, rotated {SHIFT_ROTATION_DEGREES} degrees and inverted (black on white)",
    )
    (folder / PROVENANCE_FILE).write_text(json.dumps(provenance, indent=2))
    marker = {"format_version": FORMAT_VERSION, "num_images": len(items)}
    (folder / COMPLETE_MARKER).write_text(json.dumps(marker))


def _split_rows(labels: np.ndarray) -> dict[str, list[int]]:
    """Split row indices into train / val / test, stratified by label, seeded by SPLIT_SEED."""
    rows = np.arange(len(labels))
    rest, test = train_test_split(
        rows, test_size=TEST_FRACTION, stratify=labels, random_state=SPLIT_SEED
    )
    train, val = train_test_split(
        rest,
        test_size=VAL_FRACTION / (1 - TEST_FRACTION),
        stratify=labels[rest],
        random_state=SPLIT_SEED,
    )
    return {name: sorted(int(row) for row in members)
            for name, members in (("train", train), ("val", val), ("test", test))}


def _provenance(labels: np.ndarray, split_rows: dict[str, list[int]]) -> dict:
    return {
        "dataset": "Digits",
        "source": (
            "scikit-learn load_digits (UCI optical recognition of handwritten digits), bundled "
            f"with scikit-learn {sklearn.__version__}"
        ),
        "generated_by": f"upa {__version__} (upa.demo_data.build_digits)",
        "format_version": FORMAT_VERSION,
        "image_size": [IMAGE_SIZE, IMAGE_SIZE],
        "pixel_mapping": f"value * 255 / {_MAX_PIXEL_VALUE}, rounded; bicubic upscaling from 8x8",
        "file_naming": "images/<digit>/<row>.png, row = index in load_digits()",
        "split": {
            "method": "sklearn.model_selection.train_test_split, stratified by digit, twice",
            "seed": SPLIT_SEED,
            "fractions": {"train": 1 - TEST_FRACTION - VAL_FRACTION, "val": VAL_FRACTION,
                          "test": TEST_FRACTION},
        },
        "counts": {
            "total": len(labels),
            **{name: len(members) for name, members in split_rows.items()},
            "per_class": {CLASSNAMES[label]: int(count)
                          for label, count in enumerate(np.bincount(labels, minlength=10))},
        },
    }


def _move_into_place(staging: Path, target: Path) -> None:
    """Replace ``target`` with ``staging``; a concurrent finished build is kept instead."""
    if target.exists():
        discarded = Path(tempfile.mkdtemp(prefix=f".{target.name}-old-", dir=target.parent))
        os.replace(target, discarded / target.name)
        shutil.rmtree(discarded)
    try:
        os.rename(staging, target)
    except OSError:
        # Another process renamed its own build into place between our two steps.
        if not is_complete(target):
            raise
        logger.info("kept the build that another process finished at %s", target)
