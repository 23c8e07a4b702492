"""Shared fixtures: a tiny open_clip architecture and small generated image folders."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import open_clip
import pytest
from PIL import Image

TINY_ARCH = "upa-tiny-test"

# A real open_clip ViT-CLIP config, shrunk so that encoding a few hundred 32x32 images takes
# seconds on two CPU cores. The text tower keeps CLIP's tokenizer (vocabulary 49408, context 77).
TINY_CONFIG = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "layers": 2, "width": 64, "patch_size": 16},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2},
}


@pytest.fixture(scope="session")
def tiny_arch(tmp_path_factory) -> str:
    """Register the tiny config with open_clip and return its name."""
    folder = tmp_path_factory.mktemp("model_configs")
    (folder / f"{TINY_ARCH}.json").write_text(json.dumps(TINY_CONFIG))
    open_clip.add_model_config(folder)
    return TINY_ARCH


COLOURS = {"red": (220, 30, 30), "green": (30, 200, 40), "blue": (30, 40, 220)}


def write_colour_folder(root: Path, per_class: dict[str, int] | None = None, size: int = 40) -> Path:
    """Write a bring-your-own "Folder" dataset: noisy solid-colour images, one class per colour.

    Layout: <root>/images/<class>/<n>.png, <root>/split.json (train, val, test lists of
    [relative path, label, class name]) and PROVENANCE.json marking the data as generated.
    """
    per_class = per_class or {"train": 12, "val": 3, "test": 6}
    rng = np.random.default_rng(0)
    split = {name: [] for name in per_class}
    for label, (name, colour) in enumerate(COLOURS.items()):
        (root / "images" / name).mkdir(parents=True, exist_ok=True)
        counter = 0
        for split_name, count in per_class.items():
            for _ in range(count):
                noise = rng.integers(-25, 25, size=(size, size, 3))
                pixels = np.clip(np.array(colour) + noise, 0, 255).astype(np.uint8)
                relative = f"{name}/{counter:03d}.png"
                Image.fromarray(pixels).save(root / "images" / relative)
                split[split_name].append([relative, label, name])
                counter += 1
    (root / "split.json").write_text(json.dumps(split))
    (root / "PROVENANCE.json").write_text(json.dumps({"generated": True, "by": "tests/conftest.py"}))
    return root


@pytest.fixture
def colour_folder(tmp_path) -> Path:
    return write_colour_folder(tmp_path / "colours")


@pytest.fixture
def make_colour_folder():
    """The writer itself, for tests that need other split sizes."""
    return write_colour_folder
