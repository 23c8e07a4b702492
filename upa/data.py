"""Datasets in the CoOp folder layout: one spec table, one split loader, one image dataset.

Every dataset lives in its own folder under a shared data root, as KaiyangZhou/CoOp's
DATASETS.md lays them out. ``DATASETS`` describes each folder. ``load_split`` turns a
(data root, dataset, split) triple into an ``ImageSplit`` with absolute paths, labels and class
names, and ``ImageDataset`` reads the images of a split for a DataLoader.

Splits are read in one of four ways (``DatasetSpec.split_source``):

- ``zhou_json``: a ``split_zhou_*.json`` file with keys train, val and test, each a list of
  ``[path relative to the image folder, 0-based label, class name]``. The class space is the
  union over all three lists, so a split that misses a class keeps the same label indices.
- ``imagenet``: ``classnames.txt`` plus ``images/train/<wnid>/`` and ``images/val/<wnid>/``.
  The official val set serves as test. Our val split is a holdout of train, described at
  ``IMAGENET_VAL_PER_CLASS``, and those images are removed from our train split.
- ``aircraft_txt``: FGVC-Aircraft's ``variants.txt`` and ``images_variant_<split>.txt``.
- ``class_folders``: the ImageNet variants, one folder per class, named by wnid
  (Sketch, A, R) or by ImageNet class index (V2). Labels are ImageNet indices 0..999 and the
  class names are the 1000 ImageNet names.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, NamedTuple, Sequence

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch.utils.data import Dataset

from upa.templates import ENSEMBLE_TEMPLATES, SINGLE_TEMPLATES

logger = logging.getLogger(__name__)

SPLIT_NAMES = ("train", "val", "test")

IMAGE_EXTENSIONS = frozenset(
    {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm", ".pbm"}
)

# ImageNet has no labeled split besides train and the official val (our test). Per class, the
# IMAGENET_VAL_PER_CLASS train images whose relative path "<wnid>/<file>" has the smallest
# SHA-256 digest form our val split, which gives 10,000 val images on the full dataset. The choice
# depends only on file names, not on listing order or on other files. A class with fewer than
# twice that many images gives half of them (rounded down), which only happens on toy data.
IMAGENET_VAL_PER_CLASS = 10

IMAGENET_CLASSNAMES_FILE = "classnames.txt"
AIRCRAFT_VARIANTS_FILE = "variants.txt"


_WORKER_PREFIX = "Caught ImageLoadError in DataLoader worker"


class ImageLoadError(RuntimeError):
    """Error for an image file that PIL cannot open or decode, stored in ``path``."""

    def __init__(self, path: str | Path, reason: str | None = None):
        text = str(path)
        if reason is None and text.startswith(_WORKER_PREFIX):
            # A DataLoader worker re-raises as ImageLoadError(<worker traceback>). Its last line
            # contains the original message; keep that, so the error reads as in the main process.
            message = text.rstrip().splitlines()[-1].split("ImageLoadError: ", 1)[-1]
            self.path = message.removeprefix("cannot load image ").split(": ", 1)[0]
            super().__init__(message)
            return
        self.path = path
        message = f"cannot load image {path}"
        if reason is not None:
            message += (
                f": {reason}. Replace the file with a valid image, or remove it together with "
                "its entry in the split file."
            )
        super().__init__(message)


# --------------------------------------------------------------------------------------------
# Spec table


@dataclass(frozen=True)
class DatasetSpec:
    """Location of a dataset under the data root and the way its splits are read.

    ``image_root`` is relative to ``folder``; ``split_file`` is relative to ``folder`` and, for
    FGVC-Aircraft, contains a ``{split}`` placeholder. ``classname_style`` is
    "underscore_to_space" (CoOp's prompt code applies this to every dataset) or "verbatim".
    """

    name: str
    folder: str
    image_root: str
    split_source: str
    split_file: str | None
    classname_style: str
    single_template: str
    ensemble_templates: tuple[str, ...]
    splits: tuple[str, ...]
    imagenet_subset: str | None
    description: str


def _spec(name: str, folder: str, image_root: str, split_source: str, split_file: str | None,
          splits: tuple[str, ...], description: str, imagenet_subset: str | None = None
          ) -> DatasetSpec:
    return DatasetSpec(
        name=name,
        folder=folder,
        image_root=image_root,
        split_source=split_source,
        split_file=split_file,
        classname_style="underscore_to_space",
        single_template=SINGLE_TEMPLATES[name],
        ensemble_templates=ENSEMBLE_TEMPLATES[name],
        splits=splits,
        imagenet_subset=imagenet_subset,
        description=description,
    )


def _zhou_spec(name: str, folder: str, image_root: str, split_file: str) -> DatasetSpec:
    image_dir = f"{folder}/{image_root}/" if image_root else f"{folder}/"
    description = (
        f"images under {image_dir} and the split file {folder}/{split_file} (CoOp layout), "
        "a JSON object whose keys train, val and test each list "
        f"[path relative to {image_dir}, 0-based label, class name]"
    )
    return _spec(name, folder, image_root, "zhou_json", split_file, SPLIT_NAMES, description)


def _variant_spec(name: str, folder: str, image_root: str, folder_naming: str,
                  imagenet_subset: str | None = None) -> DatasetSpec:
    description = (
        f"{folder}/{image_root}/<{folder_naming}>/<image> with one folder per class, plus the "
        f"ImageNet class list imagenet/{IMAGENET_CLASSNAMES_FILE} (or a copy at "
        f"{folder}/{IMAGENET_CLASSNAMES_FILE}) with one '<wnid> <class name>' line per class "
        "in sorted wnid order"
    )
    return _spec(name, folder, image_root, "class_folders", None, ("test",), description,
                 imagenet_subset)


_IMAGENET_DESCRIPTION = (
    f"imagenet/{IMAGENET_CLASSNAMES_FILE} with one '<wnid> <class name>' line per class in sorted "
    "wnid order, training images in imagenet/images/train/<wnid>/ and the official validation "
    "images in imagenet/images/val/<wnid>/ (CoOp layout, the validation images serve as test)"
)
_AIRCRAFT_DESCRIPTION = (
    f"fgvc_aircraft/{AIRCRAFT_VARIANTS_FILE} with one variant name per line, "
    "fgvc_aircraft/images_variant_{train,val,test}.txt with '<image id> <variant name>' per line, "
    "and the images as fgvc_aircraft/images/<image id>.jpg (the data/ folder of "
    "fgvc-aircraft-2013b, as CoOp uses it)"
)
_DIGITS_DESCRIPTION = (
    "digits/images/<digit>/<id>.png and digits/split_zhou_Digits.json; "
    "build it with upa.demo_data.build_digits(data_root)"
)
_SHIFTED_DESCRIPTION = (
    "digits-shifted/images/<digit>/<id>.png and digits-shifted/split_zhou_DigitsShifted.json "
    "(test only); build it with upa.demo_data.build_digits_shifted(data_root)"
)
_FOLDER_DESCRIPTION = (
    "the data root is the dataset folder itself: images under <data root>/images/ and "
    "<data root>/split.json, a JSON object whose keys train, val and test each list "
    "[path relative to images/, 0-based label, class name]"
)

_SPEC_LIST = (
    _spec("ImageNet", "imagenet", "images", "imagenet", None, SPLIT_NAMES, _IMAGENET_DESCRIPTION),
    _zhou_spec("Caltech101", "caltech-101", "101_ObjectCategories", "split_zhou_Caltech101.json"),
    _zhou_spec("OxfordPets", "oxford_pets", "images", "split_zhou_OxfordPets.json"),
    _zhou_spec("StanfordCars", "stanford_cars", "", "split_zhou_StanfordCars.json"),
    _zhou_spec("Flowers102", "oxford_flowers", "jpg", "split_zhou_OxfordFlowers.json"),
    _zhou_spec("Food101", "food-101", "images", "split_zhou_Food101.json"),
    _spec("FGVCAircraft", "fgvc_aircraft", "images", "aircraft_txt",
          "images_variant_{split}.txt", SPLIT_NAMES, _AIRCRAFT_DESCRIPTION),
    _zhou_spec("SUN397", "sun397", "SUN397", "split_zhou_SUN397.json"),
    _zhou_spec("DTD", "dtd", "images", "split_zhou_DescribableTextures.json"),
    _zhou_spec("EuroSAT", "eurosat", "2750", "split_zhou_EuroSAT.json"),
    _zhou_spec("UCF101", "ucf101", "UCF-101-midframes", "split_zhou_UCF101.json"),
    _variant_spec("ImageNetV2", "imagenetv2", "imagenetv2-matched-frequency-format-val",
                  "ImageNet class index 0..999"),
    _variant_spec("ImageNetSketch", "imagenet-sketch", "images", "wnid"),
    _variant_spec("ImageNetA", "imagenet-adversarial", "imagenet-a", "wnid", "imagenet-a"),
    _variant_spec("ImageNetR", "imagenet-rendition", "imagenet-r", "wnid", "imagenet-r"),
    _spec("Digits", "digits", "images", "zhou_json", "split_zhou_Digits.json", SPLIT_NAMES,
          _DIGITS_DESCRIPTION),
    _spec("DigitsShifted", "digits-shifted", "images", "zhou_json", "split_zhou_DigitsShifted.json",
          ("test",), _SHIFTED_DESCRIPTION),
    _spec("Folder", ".", "images", "zhou_json", "split.json", SPLIT_NAMES, _FOLDER_DESCRIPTION),
)

DATASETS: dict[str, DatasetSpec] = {spec.name: spec for spec in _SPEC_LIST}


def _normalise_name(name: str) -> str:
    return "".join(character for character in name.lower() if character.isalnum())


def get_spec(name: str) -> DatasetSpec:
    """Look up a dataset by name, ignoring case, hyphens and underscores ("imagenet-v2")."""
    wanted = _normalise_name(name)
    for spec in DATASETS.values():
        if _normalise_name(spec.name) == wanted:
            return spec
    raise ValueError(f"unknown dataset {name!r}; valid names: {', '.join(DATASETS)}")


# --------------------------------------------------------------------------------------------
# Splits


@dataclass(frozen=True, eq=False)
class ImageSplit:
    """The N images of one split with labels in the class space of ``classnames``.

    ``paths`` are absolute and lie under ``root`` (the dataset folder). ``labels`` is int64 [N].
    ``class_subset`` is int64 [C_eval] for ImageNet-A and -R: the ImageNet indices to evaluate
    over, while ``classnames`` keeps all 1000 ImageNet names. It is None for other datasets.
    """

    dataset: str
    split: str
    root: Path
    paths: tuple[Path, ...]
    labels: torch.Tensor
    classnames: tuple[str, ...]
    class_subset: torch.Tensor | None = None
    _memo: dict = field(default_factory=dict, init=False, repr=False)

    def __post_init__(self) -> None:
        if self.labels.dtype != torch.int64 or self.labels.ndim != 1:
            raise ValueError(
                f"labels must be an int64 tensor of shape [N], got {self.labels.dtype} "
                f"{tuple(self.labels.shape)}"
            )
        if len(self.paths) != len(self.labels):
            raise ValueError(f"{len(self.paths)} paths but {len(self.labels)} labels")
        num_classes = len(self.classnames)
        if len(self.labels) and (self.labels.min() < 0 or self.labels.max() >= num_classes):
            raise ValueError(f"labels must lie in [0, {num_classes}) for {num_classes} classes")
        if self.class_subset is not None and (
            self.class_subset.dtype != torch.int64
            or self.class_subset.ndim != 1
            or self.class_subset.min() < 0
            or self.class_subset.max() >= num_classes
        ):
            raise ValueError(
                f"class_subset must be int64 [C_eval] with values in [0, {num_classes})"
            )

    def __len__(self) -> int:
        return len(self.paths)

    @property
    def num_classes(self) -> int:
        return len(self.classnames)

    def fingerprint(self) -> str:
        """Hash the relative paths, labels and file sizes, in split order, with SHA-256.

        The order is part of the hash because cached features are stored row by row in split
        order. Each call stats every file again, so an edited image changes the result.
        """
        digest = hashlib.sha256()
        for path, label in zip(self.paths, self.labels.tolist()):
            relative = path.relative_to(self.root).as_posix()
            size = os.stat(path).st_size
            digest.update(f"{relative}\t{label}\t{size}\n".encode())
        return digest.hexdigest()

    def cached_fingerprint(self) -> str:
        """Return the first ``fingerprint()`` of this instance.

        One run looks its splits up in the feature cache many times, and on ImageNet's train
        split each ``fingerprint()`` stats 1.28 million files, so the run computes it once.
        """
        if "fingerprint" not in self._memo:
            self._memo["fingerprint"] = self.fingerprint()
        return self._memo["fingerprint"]


class _RawSplit(NamedTuple):
    paths: list[Path]
    labels: list[int]
    classnames: list[str]
    class_subset: list[int] | None


def load_split(data_root: str | Path, dataset: str, split: str) -> ImageSplit:
    """Read one split of a dataset stored in the CoOp layout under ``data_root``.

    Raises FileNotFoundError naming the missing folder or file and the expected layout,
    ValueError for an unknown dataset or split, a malformed split file, or an empty split.
    """
    spec = get_spec(dataset)
    if split not in spec.splits:
        raise ValueError(
            f"{spec.name} has no split {split!r}; available splits: {', '.join(spec.splits)}"
        )

    data_root = Path(data_root).expanduser().absolute()
    root = data_root / spec.folder
    if not root.is_dir():
        raise _not_found(spec, "dataset folder", root)

    reader = _SPLIT_READERS[spec.split_source]
    raw = reader(spec, root, split, data_root)
    if not raw.paths:
        raise ValueError(
            f"{spec.name} split {split!r} under {root} contains no images; "
            f"expected layout: {spec.description}"
        )

    class_subset = None
    if raw.class_subset is not None:
        class_subset = torch.tensor(raw.class_subset, dtype=torch.int64)
    return ImageSplit(
        dataset=spec.name,
        split=split,
        root=root,
        paths=tuple(raw.paths),
        labels=torch.tensor(raw.labels, dtype=torch.int64),
        classnames=tuple(_clean_classname(name, spec.classname_style) for name in raw.classnames),
        class_subset=class_subset,
    )


def _clean_classname(name: str, style: str) -> str:
    if style == "underscore_to_space":
        return name.replace("_", " ")
    if style == "verbatim":
        return name
    raise ValueError(f"unknown classname_style {style!r}; use 'underscore_to_space' or 'verbatim'")


def _not_found(spec: DatasetSpec, what: str, path: Path) -> FileNotFoundError:
    return FileNotFoundError(
        f"{spec.name}: {what} not found: {path}. Expected layout under the data root: "
        f"{spec.description}."
    )


def _require_files_exist(paths: Sequence[Path], listed_in: Path) -> None:
    """Raise FileNotFoundError if any listed image is missing; files are not opened."""
    missing = [path for path in paths if not os.path.exists(path)]
    if missing:
        examples = ", ".join(str(path) for path in missing[:5])
        raise FileNotFoundError(
            f"{len(missing)} of {len(paths)} images listed in {listed_in} do not exist, "
            f"for example: {examples}. Restore the files or regenerate the split file."
        )


# --------------------------------------------------------------------------------------------
# Split readers, one per split_source


def _read_zhou_json(spec: DatasetSpec, root: Path, split: str, data_root: Path) -> _RawSplit:
    split_path = root / spec.split_file
    if not split_path.is_file():
        raise _not_found(spec, "split file", split_path)
    image_dir = root / spec.image_root
    if not image_dir.is_dir():
        raise _not_found(spec, "image folder", image_dir)

    try:
        content = json.loads(split_path.read_text())
    except json.JSONDecodeError as error:
        raise ValueError(f"split file {split_path} is not valid JSON: {error}") from error
    if not isinstance(content, dict) or split not in content:
        keys = sorted(content) if isinstance(content, dict) else type(content).__name__
        raise ValueError(
            f"split file {split_path} must be a JSON object with a {split!r} key; found {keys}"
        )

    classnames = _zhou_classnames(content, split_path)
    paths, labels = [], []
    for position, item in enumerate(content[split]):
        relative, label = _parse_zhou_item(item, split_path, split, position)
        paths.append(image_dir / relative)
        labels.append(label)
    _require_files_exist(paths, split_path)
    return _RawSplit(paths, labels, classnames, None)


def _parse_zhou_item(item: object, split_path: Path, split: str, position: int) -> tuple[str, int]:
    valid = (
        isinstance(item, (list, tuple))
        and len(item) == 3
        and isinstance(item[0], str)
        and isinstance(item[1], int)
        and not isinstance(item[1], bool)
        and item[1] >= 0
        and isinstance(item[2], str)
    )
    if not valid:
        raise ValueError(
            f"split file {split_path}, {split}[{position}] = {item!r} is invalid; each item must "
            "be [relative image path, 0-based label, class name]"
        )
    return item[0], item[1]


def _zhou_classnames(content: dict, split_path: Path) -> list[str]:
    """Collect the class names of all splits in a zhou split file, indexed by label."""
    name_of: dict[int, str] = {}
    for split in SPLIT_NAMES:
        for position, item in enumerate(content.get(split, [])):
            _, label = _parse_zhou_item(item, split_path, split, position)
            name = item[2]
            if name_of.setdefault(label, name) != name:
                raise ValueError(
                    f"split file {split_path} gives label {label} two class names: "
                    f"{name_of[label]!r} and {name!r}"
                )

    num_classes = max(name_of, default=-1) + 1
    absent = [label for label in range(num_classes) if label not in name_of]
    if absent:
        raise ValueError(
            f"split file {split_path} has no item with labels {absent[:10]}, so their class "
            f"names are unknown; labels must cover 0..{num_classes - 1}"
        )
    return [name_of[label] for label in range(num_classes)]


def _read_imagenet(spec: DatasetSpec, root: Path, split: str, data_root: Path) -> _RawSplit:
    classnames_path = root / IMAGENET_CLASSNAMES_FILE
    if not classnames_path.is_file():
        raise _not_found(spec, "class name file", classnames_path)
    wnids, classnames = _read_imagenet_classnames(classnames_path)
    label_of = {wnid: label for label, wnid in enumerate(wnids)}

    image_dir = root / spec.image_root / ("val" if split == "test" else "train")
    if not image_dir.is_dir():
        raise _not_found(spec, "image folder", image_dir)

    paths, labels = [], []
    for wnid, files in _list_class_folders(image_dir).items():
        if wnid not in label_of:
            raise ValueError(
                f"class folder {image_dir / wnid} is not a wnid listed in {classnames_path}"
            )
        if split != "test":
            held_out = _imagenet_holdout(wnid, files)
            files = [path for path in files if (path in held_out) == (split == "val")]
        paths.extend(files)
        labels.extend([label_of[wnid]] * len(files))

    _warn_missing_classes(set(labels), classnames, image_dir)
    return _RawSplit(paths, labels, classnames, None)


def _imagenet_holdout(wnid: str, files: list[Path]) -> set[Path]:
    """Return the train images of one class that form the ImageNet val split."""
    count = min(IMAGENET_VAL_PER_CLASS, len(files) // 2)
    ranked = sorted(files, key=lambda path: hashlib.sha256(f"{wnid}/{path.name}".encode()).digest())
    return set(ranked[:count])


def _read_aircraft(spec: DatasetSpec, root: Path, split: str, data_root: Path) -> _RawSplit:
    variants_path = root / AIRCRAFT_VARIANTS_FILE
    split_path = root / spec.split_file.format(split=split)
    image_dir = root / spec.image_root
    for what, path, exists in (
        ("class name file", variants_path, variants_path.is_file()),
        ("split file", split_path, split_path.is_file()),
        ("image folder", image_dir, image_dir.is_dir()),
    ):
        if not exists:
            raise _not_found(spec, what, path)

    classnames = [line.strip() for line in variants_path.read_text().splitlines() if line.strip()]
    label_of = {name: label for label, name in enumerate(classnames)}

    paths, labels = [], []
    for line_number, line in enumerate(split_path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        image_id, _, variant = line.strip().partition(" ")
        if variant not in label_of:
            raise ValueError(
                f"{split_path} line {line_number}: variant {variant!r} is not listed in "
                f"{variants_path}"
            )
        paths.append(image_dir / f"{image_id}.jpg")
        labels.append(label_of[variant])
    _require_files_exist(paths, split_path)
    return _RawSplit(paths, labels, classnames, None)


def _read_imagenet_variant(spec: DatasetSpec, root: Path, split: str, data_root: Path
                           ) -> _RawSplit:
    classnames_path = _find_imagenet_classnames(spec, root, data_root)
    wnids, classnames = _read_imagenet_classnames(classnames_path)
    label_of = {wnid: label for label, wnid in enumerate(wnids)}
    image_dir = root / spec.image_root
    if not image_dir.is_dir():
        raise _not_found(spec, "image folder", image_dir)

    labeled_folders = []
    for folder_name, files in _list_class_folders(image_dir).items():
        if folder_name.isdigit() and int(folder_name) < len(wnids):
            label = int(folder_name)
        elif folder_name in label_of:
            label = label_of[folder_name]
        else:
            raise ValueError(
                f"class folder {image_dir / folder_name} is neither an ImageNet class index "
                f"0..{len(wnids) - 1} nor a wnid listed in {classnames_path}"
            )
        labeled_folders.append((label, files))
    labeled_folders.sort(key=lambda pair: pair[0])

    paths = [path for _, files in labeled_folders for path in files]
    labels = [label for label, files in labeled_folders for _ in files]
    class_subset = sorted(set(labels)) if spec.imagenet_subset is not None else None
    if class_subset is None:
        _warn_missing_classes(set(labels), classnames, image_dir)
    return _RawSplit(paths, labels, classnames, class_subset)


def _find_imagenet_classnames(spec: DatasetSpec, root: Path, data_root: Path) -> Path:
    """Prefer the ImageNet copy of classnames.txt, then the copy CoOp puts in each variant."""
    candidates = (
        data_root / "imagenet" / IMAGENET_CLASSNAMES_FILE,
        root / IMAGENET_CLASSNAMES_FILE,
    )
    for path in candidates:
        if path.is_file():
            return path
    raise FileNotFoundError(
        f"{spec.name}: ImageNet class name file not found at {candidates[0]} (nor at "
        f"{candidates[1]}); the variant's labels are ImageNet class indices, so it needs that "
        f"list. Expected layout under the data root: {spec.description}."
    )


_SPLIT_READERS: dict[str, Callable[[DatasetSpec, Path, str, Path], _RawSplit]] = {
    "zhou_json": _read_zhou_json,
    "imagenet": _read_imagenet,
    "aircraft_txt": _read_aircraft,
    "class_folders": _read_imagenet_variant,
}


# --------------------------------------------------------------------------------------------
# Folder helpers


def _read_imagenet_classnames(path: Path) -> tuple[list[str], list[str]]:
    """Parse '<wnid> <class name>' lines; the line order defines the ImageNet class index."""
    wnids, classnames = [], []
    for line_number, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        wnid, _, name = line.strip().partition(" ")
        if not name:
            raise ValueError(
                f"{path} line {line_number}: expected '<wnid> <class name>', got {line!r}"
            )
        wnids.append(wnid)
        classnames.append(name.strip())

    # ImageNet-V2 numbers its folders by the standard class index, which is sorted wnid order.
    if wnids != sorted(set(wnids)):
        raise ValueError(
            f"{path} must list each wnid once, in sorted order (the standard ImageNet class "
            "index order); sort the lines by wnid"
        )
    return wnids, classnames


def _list_class_folders(image_dir: Path) -> dict[str, list[Path]]:
    """Map each class folder name to its image files, both sorted by name.

    Hidden entries are ignored. Files that are not images are skipped with a warning, and loose
    files next to the class folders (ImageNet-A ships a README.txt) are logged.
    """
    class_files: dict[str, list[Path]] = {}
    loose, skipped = [], []
    for entry in sorted(os.scandir(image_dir), key=lambda entry: entry.name):
        if entry.name.startswith("."):
            continue
        if not entry.is_dir():
            loose.append(entry.name)
            continue
        images = []
        for file_entry in sorted(os.scandir(entry.path), key=lambda file_entry: file_entry.name):
            if file_entry.name.startswith("."):
                continue
            if file_entry.is_file() and Path(file_entry.name).suffix.lower() in IMAGE_EXTENSIONS:
                images.append(Path(file_entry.path))
            else:
                skipped.append(file_entry.path)
        class_files[entry.name] = images

    if loose:
        logger.info("ignored %d files next to the class folders in %s: %s",
                    len(loose), image_dir, ", ".join(loose[:5]))
    if skipped:
        logger.warning("skipped %d entries that are not image files under %s, for example %s",
                       len(skipped), image_dir, ", ".join(skipped[:5]))
    return class_files


def _warn_missing_classes(present: set[int], classnames: Sequence[str], image_dir: Path) -> None:
    absent = [name for label, name in enumerate(classnames) if label not in present]
    if absent:
        logger.warning("%d of %d classes have no images under %s, for example %s",
                       len(absent), len(classnames), image_dir, ", ".join(absent[:5]))


# --------------------------------------------------------------------------------------------
# Images


# Pillow clips 16-bit values to 255 when converting to 8-bit modes, which turns most of a
# 16-bit grayscale image white, so these modes are rescaled by hand.
_SIXTEEN_BIT_MODES = frozenset({"I", "I;16", "I;16L", "I;16B", "I;16N"})


def _convert_to_rgb(image: Image.Image) -> Image.Image:
    """Convert any Pillow mode to RGB; an alpha channel is dropped, not blended.

    Dropping alpha matches CoOp/Dassl's reader (``Image.open(path).convert("RGB")``), which keeps
    pixel values comparable with the published results.
    """
    if image.mode == "RGB":
        return image
    if image.mode in _SIXTEEN_BIT_MODES:
        # NOTE: mode "I" is assumed to hold 16-bit values, as Pillow gives for 16-bit PNGs;
        # 32-bit integer images with a wider range are clipped.
        values = np.clip(np.asarray(image, dtype=np.int64), 0, 65535)
        image = Image.fromarray(np.round(values / 257).astype(np.uint8))
    elif image.mode == "P" and "transparency" in image.info:
        # Going through RGBA avoids Pillow's warning about palette transparency.
        image = image.convert("RGBA")
    return image.convert("RGB")


def open_rgb_image(path: str | Path) -> Image.Image:
    """Open and decode one image as RGB; raise ImageLoadError naming the file on failure."""
    try:
        # Opening the file ourselves keeps the decoded image usable after the file is closed,
        # which Image.open's own context manager does not.
        with open(path, "rb") as file:
            image = Image.open(file)
            image.load()
        return _convert_to_rgb(image)
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as error:
        # UnidentifiedImageError and truncated-file errors are OSErrors; some plugins raise
        # SyntaxError on broken headers, and convert raises ValueError for unsupported modes.
        reason = "unrecognised format" if isinstance(error, UnidentifiedImageError) else str(error)
        raise ImageLoadError(path, reason) from error


class ImageDataset(Dataset):
    """The images of a split, or of the positions ``indices`` in it, for a DataLoader.

    Item i is ``(transform(image), position)`` where ``position`` is the image's index in
    ``split.paths``, so batches can be written back to rows of an [N, D] feature matrix.
    """

    def __init__(self, split: ImageSplit, transform: Callable[[Image.Image], torch.Tensor],
                 indices: Sequence[int] | torch.Tensor | None = None):
        if not callable(transform):
            raise TypeError(f"transform must be callable (PIL image -> tensor), got {transform!r}")
        if indices is None:
            positions = list(range(len(split)))
        else:
            positions = torch.as_tensor(indices, dtype=torch.int64).reshape(-1).tolist()
            invalid = [position for position in positions if not 0 <= position < len(split)]
            if invalid:
                raise IndexError(
                    f"indices must lie in [0, {len(split)}) for {split.dataset} {split.split}; "
                    f"got {invalid[:5]}"
                )
        self.split = split
        self.transform = transform
        self.positions = positions

    def __len__(self) -> int:
        return len(self.positions)

    def __getitem__(self, item: int) -> tuple[torch.Tensor, int]:
        position = self.positions[item]
        image = open_rgb_image(self.split.paths[position])
        return self.transform(image), position
