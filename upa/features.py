"""Load CLIP offline and turn images and prompts into L2-normalised features, with a disk cache.

Dimension letters: N images, M selected images, C classes, D embedding width, V augmented views.

Weights come from one of three sources, each recorded in ``LoadedCLIP.provenance``:

* a pretrained open_clip tag, resolved only from the local Hugging Face cache (no network);
* a checkpoint file (safetensors, or a torch file read with ``weights_only=True``);
* an explicit random initialisation, seeded so that cached features stay valid between runs.

Cached features live in safetensors files whose metadata contains the full cache key. A file is
served only when its metadata matches the request, and every write is atomic.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import os
import pickle
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import open_clip
import safetensors
import safetensors.torch
import torch
import torch.nn.functional as F
import torchvision.transforms.functional as TF
from huggingface_hub import try_to_load_from_cache
from open_clip.convert import convert_state_dict
from open_clip.model import (
    convert_to_custom_text_state_dict,
    get_input_dtype,
    resize_pos_embed,
    resize_text_pos_embed,
)
from PIL import Image
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

import upa
from upa.data import ImageDataset, ImageSplit

log = logging.getLogger(__name__)

WEIGHT_KINDS = ("pretrained", "checkpoint", "random")
PRECISIONS = ("fp32", "fp16", "bf16", "pure_fp16", "pure_bf16")

# Random initialisation runs under this seed in a forked RNG, so "random" names one fixed model
# and features cached for it stay valid.
RANDOM_INIT_SEED = 0

# Tip-Adapter's augmentation for cache keys: RandomResizedCrop(scale=(0.5, 1), bicubic) and a
# horizontal flip; the aspect-ratio range is torchvision's default.
AUGMENT_SCALE = (0.5, 1.0)
AUGMENT_RATIO = (3.0 / 4.0, 4.0 / 3.0)
CROP_ATTEMPTS = 10
FLIP_PROBABILITY = 0.5

# open_clip's default weight file name in a Hugging Face repository and its safetensors twin.
HF_WEIGHTS_NAME = "open_clip_pytorch_model.bin"
HF_SAFE_WEIGHTS_NAME = "open_clip_model.safetensors"

CACHE_FORMAT = "upa-feature-cache-1"
RESERVED_METADATA = frozenset({"key", "format", "written_by_upa"})
HASH_CHUNK_BYTES = 1 << 20
CHECKPOINT_SUFFIXES = (".safetensors", ".pt", ".pth", ".bin", ".ckpt")


class StaleCacheError(RuntimeError):
    """A cache file exists at the request's path but was written for a different request."""


class UnsafeCheckpointError(RuntimeError):
    """A checkpoint needs a full pickle load, which can run arbitrary code, and was not allowed."""


# --------------------------------------------------------------------------------------------
# Weights


@dataclass(frozen=True)
class Weights:
    """The source of the model weights: a pretrained tag, a checkpoint file, or random init."""

    kind: str
    value: str | None = None

    def __post_init__(self) -> None:
        if self.kind not in WEIGHT_KINDS:
            raise ValueError(f"weights kind must be one of {WEIGHT_KINDS}, got {self.kind!r}")
        if self.kind == "random" and self.value is not None:
            raise ValueError(f"random weights take no value, got {self.value!r}")
        if self.kind != "random" and not self.value:
            raise ValueError(f"{self.kind} weights need a value (a tag or a file path), got {self.value!r}")

    def describe(self) -> str:
        """Format the weights as parse_weights reads them: random, pretrained:<tag> or file:<path>."""
        if self.kind == "random":
            return "random"
        if self.kind == "pretrained":
            return f"pretrained:{self.value}"
        return f"file:{self.value}"


def parse_weights(text: str) -> Weights:
    """Parse "random", "pretrained:<tag>", "file:<path>", an existing file path or a bare tag."""
    text = text.strip()
    if not text:
        raise ValueError("weights must not be empty: use random, pretrained:<tag> or file:<path>")
    if text == "random":
        return Weights("random")
    if text.startswith("pretrained:"):
        return Weights("pretrained", text[len("pretrained:"):])
    if text.startswith("file:"):
        return Weights("checkpoint", str(Path(text[len("file:"):]).expanduser()))
    path = Path(text).expanduser()
    if path.is_file():
        return Weights("checkpoint", str(path))
    if os.sep in text or path.suffix in CHECKPOINT_SUFFIXES:
        raise FileNotFoundError(
            f"checkpoint file not found: {path}. Give an existing file, or write "
            f"pretrained:<tag> for an open_clip pretrained tag."
        )
    return Weights("pretrained", text)


# --------------------------------------------------------------------------------------------
# Offline resolution of pretrained tags


def hf_cache_dir(cache_dir: str | Path | None = None) -> Path:
    """Return the Hugging Face hub cache folder: ``cache_dir``, else the one the environment names.

    The environment is read at call time (HF_HUB_CACHE, HUGGINGFACE_HUB_CACHE, HF_HOME,
    XDG_CACHE_HOME), with huggingface_hub's precedence and its default ~/.cache/huggingface/hub.
    """
    if cache_dir is not None:
        return Path(cache_dir).expanduser()
    for variable in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE"):
        if os.environ.get(variable):
            return Path(os.environ[variable]).expanduser()
    if os.environ.get("HF_HOME"):
        return Path(os.environ["HF_HOME"]).expanduser() / "hub"
    xdg_cache = os.environ.get("XDG_CACHE_HOME") or "~/.cache"
    return Path(xdg_cache).expanduser() / "huggingface" / "hub"


def _candidate_filenames(filename: str) -> list[str]:
    """List the file names to look for, the safetensors variant first as open_clip does."""
    if filename == HF_WEIGHTS_NAME:
        return [HF_SAFE_WEIGHTS_NAME, filename]
    if filename.endswith((".bin", ".pth")):
        return [filename[:-4] + ".safetensors", filename]
    return [filename]


def resolve_pretrained_cfg(cfg: Mapping[str, Any], cache_dir: str | Path | None = None,
                           label: str = "pretrained weights") -> Path:
    """Find the weight file of an open_clip pretrained config in the local cache, offline.

    ``cfg`` is what ``open_clip.get_pretrained_cfg`` returns. Its ``hf_hub`` entry has the form
    ``org/name/filename`` (or ``org/name/`` for open_clip's default file name). The lookup only
    reads the cache folder, so it never contacts the network, whatever the environment sets.
    Raises FileNotFoundError naming the searched folder and the download command when missing.
    """
    if cfg.get("file"):
        path = Path(cfg["file"]).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"{label}: the registered weight file {path} does not exist")
        return path
    hub_path = cfg.get("hf_hub", "")
    if not hub_path:
        raise FileNotFoundError(
            f"{label}: the config has no Hugging Face repository (hf_hub) to look up offline; "
            f"download the weights yourself and pass the file as file:<path>"
        )
    # "org/name/file.bin" names a file; "org/name/" means open_clip's default file name.
    repo_id, filename = os.path.split(hub_path)
    filename = filename or HF_WEIGHTS_NAME
    folder = hf_cache_dir(cache_dir)
    candidates = _candidate_filenames(filename)
    for candidate in candidates:
        found = try_to_load_from_cache(repo_id, candidate, cache_dir=str(folder))
        if isinstance(found, str):
            return Path(found)
    raise FileNotFoundError(
        f"{label}: none of {candidates} from the Hugging Face repository {repo_id} is in the local "
        f"cache {folder / ('models--' + repo_id.replace('/', '--'))}. This program never downloads. "
        f"On a machine with network access run `hf download {repo_id} {candidates[-1]}` "
        f"and copy the cache folder here, or point HF_HUB_CACHE, the --hf-cache-dir option of "
        f"upa run or the hf_cache_dir notebook parameter at an existing cache."
    )


def resolve_pretrained(arch: str, tag: str, cache_dir: str | Path | None = None) -> Path:
    """Find the weight file of open_clip's pretrained tag ``tag`` for ``arch`` offline."""
    cfg = open_clip.get_pretrained_cfg(arch, tag)
    if not cfg:
        tags = open_clip.list_pretrained_tags_by_model(arch)
        raise ValueError(
            f"unknown pretrained tag {tag!r} for {arch}; valid tags: {', '.join(tags) or 'none'}. "
            f"Use file:<path> for a checkpoint file or random for random initialisation."
        )
    return resolve_pretrained_cfg(cfg, cache_dir, label=f"{arch} pretrained:{tag}")


# --------------------------------------------------------------------------------------------
# Checkpoint files


def sha256_file(path: str | Path) -> str:
    """Hash a file with SHA-256, reading it in 1 MiB chunks so large checkpoints fit in memory."""
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        for chunk in iter(lambda: file.read(HASH_CHUNK_BYTES), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _torch_load(path: Path, allow_pickle: bool) -> Any:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        if not allow_pickle:
            raise UnsafeCheckpointError(
                f"checkpoint {path} cannot be read with torch.load(weights_only=True) and needs a "
                f"full pickle load, which can run arbitrary code. If you trust the file, opt in with "
                f"allow_pickle=True (CLI flag --allow-pickle), or convert it to safetensors. "
                f"torch said: {error}"
            ) from error
    log.warning("Loading %s with a full pickle load because allow_pickle=True", path)
    return torch.load(path, map_location="cpu", weights_only=False)


def read_state_dict(path: str | Path, allow_pickle: bool = False) -> dict[str, torch.Tensor]:
    """Read a model state dict from a safetensors or torch checkpoint file onto the CPU.

    A dict wrapped as ``{"state_dict": ...}`` is unwrapped and a ``module.`` prefix (left by
    DistributedDataParallel) is removed. Torch files are read with ``weights_only=True``; a file
    that needs a full pickle load raises UnsafeCheckpointError unless ``allow_pickle`` is set.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint file not found: {path}")
    if path.suffix == ".safetensors":
        checkpoint: Any = safetensors.torch.load_file(path, device="cpu")
    else:
        checkpoint = _torch_load(path, allow_pickle)

    if isinstance(checkpoint, torch.jit.ScriptModule):
        checkpoint = checkpoint.state_dict()
    if isinstance(checkpoint, Mapping) and isinstance(checkpoint.get("state_dict"), Mapping):
        checkpoint = checkpoint["state_dict"]
    if not isinstance(checkpoint, Mapping) or not checkpoint:
        raise ValueError(f"checkpoint {path} contains no state dict (found {type(checkpoint).__name__})")
    if not all(isinstance(value, torch.Tensor) for value in checkpoint.values()):
        raise ValueError(f"checkpoint {path} is not a state dict: some values are not tensors")

    state_dict = dict(checkpoint)
    if all(name.startswith("module.") for name in state_dict):
        state_dict = {name[len("module."):]: value for name, value in state_dict.items()}
    # The OpenAI JIT archives carry these non-parameter entries.
    for name in ("input_resolution", "context_length", "vocab_size"):
        state_dict.pop(name, None)
    return state_dict


def _load_state_dict_into(model: torch.nn.Module, state_dict: dict[str, torch.Tensor], source: Path) -> None:
    """Load ``state_dict`` with the same format fixes open_clip's own checkpoint loader applies."""
    state_dict = convert_state_dict(model, state_dict)
    if "positional_embedding" in state_dict and not hasattr(model, "positional_embedding"):
        state_dict = convert_to_custom_text_state_dict(state_dict)
    for name in ("logit_scale", "logit_bias"):
        parameter = getattr(model, name, None)
        if name in state_dict and parameter is not None and parameter.ndim != state_dict[name].ndim:
            state_dict[name] = state_dict[name].reshape(parameter.shape)
    if getattr(model, "logit_bias", None) is not None and "logit_bias" not in state_dict:
        state_dict["logit_bias"] = torch.zeros_like(state_dict["logit_scale"])
    resize_pos_embed(state_dict, model)
    resize_text_pos_embed(state_dict, model)
    try:
        model.load_state_dict(state_dict, strict=True)
    except RuntimeError as error:
        raise ValueError(
            f"checkpoint {source} does not fit the architecture: {error}. "
            f"Check that the arch option names the model the checkpoint was trained as."
        ) from error


# --------------------------------------------------------------------------------------------
# Loading CLIP


@dataclass
class LoadedCLIP:
    """A CLIP model in eval mode with its transforms, tokenizer and a record of its weights.

    ``logit_scale`` is the model's exp(logit_scale): 100 for OpenAI's weights, 1/0.07 at random
    initialisation. ``embed_dim`` is D.
    """

    model: torch.nn.Module
    preprocess: Any
    tokenizer: Any
    arch: str
    weights: Weights
    logit_scale: float
    embed_dim: int
    provenance: dict = field(default_factory=dict)
    precision: str = "fp32"


def _hash_parameters(model: torch.nn.Module) -> str:
    """Hash the model's state dict, for weights that have no file."""
    digest = hashlib.sha256()
    for name, tensor in model.state_dict().items():
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def _resolve_weights(arch: str, weights: Weights, cache_dir: str | Path | None) -> tuple[Path | None, dict]:
    """Return the weight file to load (None for random init) and the pretrained config, if any."""
    if weights.kind == "random":
        return None, {}
    if weights.kind == "checkpoint":
        path = Path(weights.value).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"checkpoint file not found: {path}")
        return path, {}
    return resolve_pretrained(arch, weights.value, cache_dir), open_clip.get_pretrained_cfg(arch, weights.value)


def _create_model(arch: str, precision: str, device: str | torch.device, pretrained_cfg: Mapping[str, Any]):
    """Create ``arch`` without weights, seeded, with the tag's preprocessing and activation."""
    # Pretrained tower weights are disabled because they would be downloaded; load_clip loads
    # the full checkpoint afterwards with this module's own reader.
    create_kwargs = dict(
        pretrained=None, precision=precision, device=device, pretrained_image=False, pretrained_text=False,
        force_quick_gelu=bool(pretrained_cfg.get("quick_gelu", False)),
        image_mean=pretrained_cfg.get("mean"), image_std=pretrained_cfg.get("std"),
        image_interpolation=pretrained_cfg.get("interpolation"),
        image_resize_mode=pretrained_cfg.get("resize_mode"),
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(RANDOM_INIT_SEED)
        model, _, preprocess = open_clip.create_model_and_transforms(arch, **create_kwargs)
    return model, preprocess


def load_clip(arch: str, weights: Weights, device: str | torch.device, precision: str = "fp32",
              cache_dir: str | Path | None = None, allow_pickle: bool = False) -> LoadedCLIP:
    """Build the open_clip model ``arch``, load ``weights`` without network access, and return it in eval mode.

    ``cache_dir`` is the Hugging Face hub cache to resolve pretrained tags from (default: the
    environment's). A pretrained tag brings its preprocessing (mean, std, interpolation, resize
    mode), as open_clip applies it when it loads a tag. The tag's QuickGELU flag is applied
    too, where open_clip 3.3 only warns when the architecture name does not match it.
    """
    if arch not in open_clip.list_models():
        raise ValueError(
            f"unknown architecture {arch!r}: not an open_clip model config; "
            f"see open_clip.list_models() for the {len(open_clip.list_models())} valid names"
        )
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    checkpoint_path, pretrained_cfg = _resolve_weights(arch, weights, cache_dir)
    model, preprocess = _create_model(arch, precision, device, pretrained_cfg)

    provenance: dict[str, Any] = {
        "arch": arch, "kind": weights.kind, "value": weights.value, "weights": weights.describe(),
        "random_init": checkpoint_path is None, "precision": precision,
        "quick_gelu": bool(pretrained_cfg.get("quick_gelu", False)), "open_clip_version": open_clip.__version__,
    }
    if checkpoint_path is None:
        provenance["random_init_seed"] = RANDOM_INIT_SEED
        provenance["parameters_sha256"] = _hash_parameters(model)
    else:
        log.info("Loading %s weights from %s", arch, checkpoint_path)
        _load_state_dict_into(model, read_state_dict(checkpoint_path, allow_pickle), checkpoint_path)
        provenance["checkpoint_path"] = str(checkpoint_path.resolve())
        provenance["checkpoint_sha256"] = sha256_file(checkpoint_path)
        if pretrained_cfg:
            provenance["hf_hub"] = pretrained_cfg.get("hf_hub")
    model.eval()

    logit_scale = float(model.logit_scale.exp().item())
    embed_dim = int(open_clip.get_model_config(arch)["embed_dim"])
    provenance.update(logit_scale=logit_scale, embed_dim=embed_dim,
                      preprocess=_jsonable(model.visual.preprocess_cfg))
    return LoadedCLIP(
        model=model, preprocess=preprocess, tokenizer=open_clip.get_tokenizer(arch), arch=arch,
        weights=weights, logit_scale=logit_scale, embed_dim=embed_dim, provenance=provenance,
        precision=precision,
    )


def _stable_repr(transform: Any) -> str:
    """Return repr(transform) without memory addresses, which change between runs."""
    return re.sub(r" at 0x[0-9a-fA-F]+", "", repr(transform))


def _jsonable(value: Any) -> Any:
    return json.loads(json.dumps(value, default=str))


def weights_id(loaded: LoadedCLIP) -> str:
    """Return the SHA-256 that identifies the loaded weights: of the checkpoint file, or of the parameters."""
    return loaded.provenance.get("checkpoint_sha256") or loaded.provenance["parameters_sha256"]


# --------------------------------------------------------------------------------------------
# Encoding images


def default_num_workers() -> int:
    return min(4, os.cpu_count() or 1)


def autocast_dtype(device: torch.device, amp: bool | None) -> torch.dtype | None:
    """Return the autocast dtype for ``amp`` on ``device``: None means no autocast.

    amp=None enables it on CUDA only, with bf16 where the GPU supports it and fp16 elsewhere.
    """
    if device.type != "cuda":
        if amp:
            raise ValueError(f"amp=True needs a CUDA device, got {device}; pass amp=None or False on this device")
        return None
    if amp is False:
        return None
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


def _encode_loader(loaded: LoadedCLIP, loader: DataLoader, out: torch.Tensor, device: torch.device,
                   amp: bool | None, desc: str, unit: str, progress: bool = True) -> torch.Tensor:
    """Encode every batch of ``loader`` into the rows of ``out`` [R, D], in loader order.

    A batch is [B, 3, H, W] or [B, V, 3, H, W]; views are flattened into consecutive rows.
    """
    dtype = autocast_dtype(device, amp)
    autocast = torch.autocast(device.type, dtype=dtype) if dtype else contextlib.nullcontext()
    input_dtype = get_input_dtype(loaded.precision)
    offset = 0
    with torch.inference_mode(), autocast, tqdm(total=len(out), desc=desc, unit=unit, leave=False,
                                                disable=not progress) as bar:
        for images, _ in loader:
            images = images.flatten(0, images.ndim - 4).to(device, dtype=input_dtype, non_blocking=True)
            features = loaded.model.encode_image(images)
            rows = slice(offset, offset + len(features))
            out[rows] = F.normalize(features.float(), dim=-1).cpu()
            offset += len(features)
            bar.update(len(features))
    if offset != len(out):
        raise RuntimeError(f"encoded {offset} rows but expected {len(out)}")
    return out


def _loader(dataset: Dataset, batch_size: int, num_workers: int | None, device: torch.device) -> DataLoader:
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    num_workers = default_num_workers() if num_workers is None else num_workers
    if num_workers < 0:
        raise ValueError(f"num_workers must be >= 0 (0 loads images in the main process), got {num_workers}")
    # A private generator, because the loader otherwise draws its worker base seed from the
    # global RNG and would change the caller's random stream.
    return DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=num_workers,
                      pin_memory=device.type == "cuda", generator=torch.Generator().manual_seed(0))


def encode_images(loaded: LoadedCLIP, dataset: ImageDataset, device: str | torch.device, batch_size: int = 128,
                  num_workers: int | None = None, amp: bool | None = None, progress: bool = True) -> torch.Tensor:
    """Encode every image of ``dataset`` and return float32 L2-normalised features [N, D] on the CPU.

    Row i belongs to ``dataset[i]``. Features stream into one preallocated tensor, so memory
    beyond the model stays at N·D floats plus the batches in flight. ``num_workers`` defaults to
    min(4, CPU count); AMP (see :func:`autocast_dtype`) runs on CUDA only.
    """
    device = torch.device(device)
    if len(dataset) == 0:
        raise ValueError("dataset is empty: nothing to encode")
    out = torch.empty(len(dataset), loaded.embed_dim, dtype=torch.float32)
    loader = _loader(dataset, batch_size, num_workers, device)
    return _encode_loader(loaded, loader, out, device, amp, desc="encode images", unit="img", progress=progress)


# --------------------------------------------------------------------------------------------
# Seeded augmentation


def view_seed(seed: int, index: int, view: int) -> int:
    """Derive the 63-bit seed of one augmented view from (seed, image index in the split, view)."""
    digest = hashlib.sha256(f"upa-view:{seed}:{index}:{view}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def _crop_box(width: int, height: int, generator: torch.Generator | None) -> tuple[int, int, int, int]:
    """Sample (top, left, height, width) of a random crop as RandomResizedCrop defines it.

    A crop covers a uniform fraction of the area in AUGMENT_SCALE with a log-uniform aspect
    ratio in AUGMENT_RATIO. After CROP_ATTEMPTS crops that do not fit the image, the largest
    central crop with a valid ratio is taken.
    """
    area = width * height
    log_low, log_high = math.log(AUGMENT_RATIO[0]), math.log(AUGMENT_RATIO[1])
    for _ in range(CROP_ATTEMPTS):
        area_draw, ratio_draw = torch.rand(2, generator=generator).tolist()
        target_area = area * (AUGMENT_SCALE[0] + (AUGMENT_SCALE[1] - AUGMENT_SCALE[0]) * area_draw)
        ratio = math.exp(log_low + (log_high - log_low) * ratio_draw)
        crop_width = round(math.sqrt(target_area * ratio))
        crop_height = round(math.sqrt(target_area / ratio))
        if 0 < crop_width <= width and 0 < crop_height <= height:
            top = int(torch.randint(0, height - crop_height + 1, (1,), generator=generator))
            left = int(torch.randint(0, width - crop_width + 1, (1,), generator=generator))
            return top, left, crop_height, crop_width

    image_ratio = width / height
    crop_width, crop_height = width, height
    if image_ratio < AUGMENT_RATIO[0]:
        crop_height = round(width / AUGMENT_RATIO[0])
    elif image_ratio > AUGMENT_RATIO[1]:
        crop_width = round(height * AUGMENT_RATIO[1])
    return (height - crop_height) // 2, (width - crop_width) // 2, crop_height, crop_width


class AugmentTransform:
    """RandomResizedCrop(size, scale=(0.5, 1), bicubic), RandomHorizontalFlip and normalisation.

    Random draws come from the ``generator`` passed to each call, so a view is reproducible
    from its seed and the global RNG state stays untouched. Without a generator, torch's
    default generator is used, as torchvision's transforms do.
    """

    def __init__(self, size: int | Sequence[int], mean: Sequence[float], std: Sequence[float]):
        self.size = (size, size) if isinstance(size, int) else tuple(size)
        self.mean = tuple(mean)
        self.std = tuple(std)

    def __call__(self, image: Image.Image, generator: torch.Generator | None = None) -> torch.Tensor:
        top, left, height, width = _crop_box(image.width, image.height, generator)
        image = TF.resized_crop(image, top, left, height, width, list(self.size),
                                interpolation=TF.InterpolationMode.BICUBIC, antialias=True)
        if torch.rand(1, generator=generator).item() < FLIP_PROBABILITY:
            image = TF.hflip(image)
        return TF.normalize(TF.to_tensor(image), self.mean, self.std)

    def __repr__(self) -> str:
        return (f"AugmentTransform(RandomResizedCrop(size={self.size}, scale={AUGMENT_SCALE}, "
                f"ratio=({AUGMENT_RATIO[0]:.4f}, {AUGMENT_RATIO[1]:.4f}), bicubic), "
                f"RandomHorizontalFlip(p={FLIP_PROBABILITY}), Normalize(mean={self.mean}, std={self.std}))")


def augment_transform(loaded: LoadedCLIP) -> AugmentTransform:
    """Build the training augmentation at the model's input size and normalisation."""
    cfg = loaded.model.visual.preprocess_cfg
    return AugmentTransform(cfg["size"], cfg["mean"], cfg["std"])


def _keep_image(image: Image.Image) -> Image.Image:
    return image


class _AugmentedViews(Dataset):
    """Item i: the V augmented views [V, 3, H, W] of split image ``indices[i]``, decoded once."""

    def __init__(self, split: ImageSplit, indices: Sequence[int], augment: AugmentTransform,
                 n_views: int, seed: int):
        self.images = ImageDataset(split, _keep_image, indices)
        self.indices = list(indices)
        self.augment = augment
        self.n_views = n_views
        self.seed = seed

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, item: int) -> tuple[torch.Tensor, int]:
        image, index = self.images[item]
        views = []
        for view in range(self.n_views):
            generator = torch.Generator().manual_seed(view_seed(self.seed, index, view))
            views.append(self.augment(image, generator))
        return torch.stack(views), index


def encode_augmented(loaded: LoadedCLIP, split: ImageSplit, indices: Sequence[int], n_views: int, seed: int,
                     device: str | torch.device, batch_size: int = 128, num_workers: int | None = None,
                     amp: bool | None = None, progress: bool = True) -> torch.Tensor:
    """Encode V seeded augmented views of the split images ``indices`` without a cache: [M, V, D].

    ``batch_size`` counts views, so a batch contains batch_size // V images, at least one.
    """
    device = torch.device(device)
    dataset = _AugmentedViews(split, indices, augment_transform(loaded), n_views, seed)
    out = torch.empty(len(indices), n_views, loaded.embed_dim, dtype=torch.float32)
    loader = _loader(dataset, max(1, batch_size // n_views), num_workers, device)
    _encode_loader(loaded, loader, out.view(-1, loaded.embed_dim), device, amp, desc="encode views", unit="view",
                   progress=progress)
    return out


# --------------------------------------------------------------------------------------------
# Feature cache


def _normalise_key(key: Mapping[str, Any]) -> dict[str, str]:
    if not key:
        raise ValueError("cache key must not be empty")
    reserved = RESERVED_METADATA & set(key)
    if reserved:
        raise ValueError(f"cache key fields {sorted(reserved)} are reserved for the cache's own metadata")
    return {str(name): str(value) for name, value in sorted(key.items())}


def _key_json(key: dict[str, str]) -> str:
    return json.dumps(key, sort_keys=True, ensure_ascii=True)


class FeatureCache:
    """Safetensors files of features under ``root``, one file per cache key.

    The file name joins a readable prefix (kind, dataset, split, arch, weights) with the first
    16 hex digits of the key's SHA-256. The metadata stores the full key as JSON, every key
    field as its own string, and the upa version that wrote it.
    """

    PREFIX_FIELDS = ("kind", "dataset", "split", "arch", "weights")

    def __init__(self, root: str | Path):
        self.root = Path(root)

    def path_for(self, key: Mapping[str, Any]) -> Path:
        key = _normalise_key(key)
        digest = hashlib.sha256(_key_json(key).encode()).hexdigest()[:16]
        readable = "_".join(key[name] for name in self.PREFIX_FIELDS if name in key)
        readable = re.sub(r"[^A-Za-z0-9.\-]+", "_", readable).strip("_")[:80] or "features"
        return self.root / f"{readable}-{digest}.safetensors"

    def load(self, key: Mapping[str, Any]) -> dict[str, torch.Tensor] | None:
        """Return the tensors stored for ``key``, or None when no file exists.

        Raises StaleCacheError when the file at the key's path was written for another key or
        cannot be read.
        """
        path = self.path_for(key)
        if not path.is_file():
            return None
        try:
            with safetensors.safe_open(str(path), framework="pt") as file:
                metadata = file.metadata() or {}
                self._check_metadata(path, _normalise_key(key), metadata)
                return {name: file.get_tensor(name) for name in file.keys()}
        except safetensors.SafetensorError as error:
            raise StaleCacheError(
                f"cache file {path} is not a readable safetensors file ({error}). "
                f"Delete the file or use a different cache dir."
            ) from error

    @staticmethod
    def _check_metadata(path: Path, key: dict[str, str], metadata: dict[str, str]) -> None:
        try:
            cached = json.loads(metadata.get("key", ""))
        except json.JSONDecodeError:
            cached = None
        if metadata.get("format") != CACHE_FORMAT or not isinstance(cached, dict):
            differing = ["format"]
        else:
            names = sorted(set(cached) | set(key))
            differing = [f"{name} (cached {cached.get(name)!r}, requested {key.get(name)!r})"
                         for name in names if cached.get(name) != key.get(name)]
        if differing:
            raise StaleCacheError(
                f"cache file {path} was written for a different request; differing fields: "
                f"{'; '.join(differing)}. Delete the file or use a different cache dir."
            )

    def save(self, key: Mapping[str, Any], tensors: Mapping[str, torch.Tensor]) -> Path:
        """Write ``tensors`` under ``key`` atomically and return the file path.

        The file is written as ``<name>.tmp-<pid>`` in the same folder and renamed over the
        target, so readers see either the old file or the complete new one. On any error the
        temporary file is removed.
        """
        key = _normalise_key(key)
        path = self.path_for(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        metadata = {**key, "key": _key_json(key), "format": CACHE_FORMAT, "written_by_upa": upa.__version__}
        contiguous = {name: tensor.detach().cpu().contiguous() for name, tensor in tensors.items()}
        temporary = path.with_name(f"{path.name}.tmp-{os.getpid()}")
        try:
            safetensors.torch.save_file(contiguous, str(temporary), metadata=metadata)
            os.replace(temporary, path)
        except BaseException:
            temporary.unlink(missing_ok=True)
            raise
        log.info("Cached %s in %s", ", ".join(contiguous), path)
        return path


# --------------------------------------------------------------------------------------------
# Cached features


def _model_key(loaded: LoadedCLIP) -> dict[str, str]:
    return {
        "arch": loaded.arch,
        "weights": loaded.weights.describe(),
        "weights_sha256": weights_id(loaded),
        "precision": loaded.precision,
        "open_clip_version": open_clip.__version__,
        "upa_version": upa.__version__,
    }


def _split_key(loaded: LoadedCLIP, split: ImageSplit, device: torch.device, amp: bool | None) -> dict[str, str]:
    dtype = autocast_dtype(device, amp)
    return {
        **_model_key(loaded),
        "dataset": split.dataset,
        "split": split.split,
        "split_fingerprint": split.cached_fingerprint(),
        "n_images": str(len(split)),
        "autocast": str(dtype).replace("torch.", "") if dtype else "off",
    }


def image_features(loaded: LoadedCLIP, split: ImageSplit, cache: FeatureCache | None, device: str | torch.device,
                   batch_size: int = 128, num_workers: int | None = None, amp: bool | None = None,
                   progress: bool = True) -> torch.Tensor:
    """Return the center-view features [N, D] of every image in ``split``, from ``cache`` when present."""
    device = torch.device(device)
    key = {**_split_key(loaded, split, device, amp), "kind": "image", "view": "center",
           "transform": _stable_repr(loaded.preprocess)}
    if cache is not None:
        cached = cache.load(key)
        if cached is not None:
            log.info("Loaded %s %s features from the cache", split.dataset, split.split)
            return cached["features"]
    features = encode_images(loaded, ImageDataset(split, loaded.preprocess), device, batch_size, num_workers, amp,
                             progress)
    if cache is not None:
        cache.save(key, {"features": features})
    return features


def _check_indices(indices: torch.Tensor, num_images: int) -> torch.Tensor:
    indices = torch.as_tensor(indices)
    if indices.ndim != 1 or indices.dtype.is_floating_point or indices.dtype.is_complex or indices.dtype == torch.bool:
        raise ValueError(f"indices must be an integer tensor of shape [M], got {indices.dtype} {tuple(indices.shape)}")
    if len(indices) and (int(indices.min()) < 0 or int(indices.max()) >= num_images):
        raise ValueError(
            f"indices must lie in [0, {num_images}), got min {int(indices.min())} max {int(indices.max())}"
        )
    return indices.long()


def augmented_features(loaded: LoadedCLIP, split: ImageSplit, indices: torch.Tensor, n_views: int, seed: int,
                       cache: FeatureCache | None, device: str | torch.device, batch_size: int = 128,
                       num_workers: int | None = None, amp: bool | None = None,
                       progress: bool = True) -> torch.Tensor:
    """Return V seeded augmented views of the split images ``indices`` [M]: features [M, V, D].

    View v of image i is drawn from a generator seeded by (seed, i, v), so it does not depend on
    which other images are requested. The cache keeps one file per (model, split, V, seed) that
    stores the encoded split indices with their views. Only images missing from it are encoded,
    then merged into that file.
    """
    device = torch.device(device)
    indices = _check_indices(indices, len(split))
    if n_views < 1:
        raise ValueError(f"n_views must be >= 1, got {n_views}")
    augment = augment_transform(loaded)
    key = {**_split_key(loaded, split, device, amp), "kind": "augmented", "transform": _stable_repr(augment),
           "n_views": n_views, "seed": seed}

    cached = cache.load(key) if cache is not None else None
    known = cached["indices"] if cached is not None else torch.empty(0, dtype=torch.int64)
    stored = cached["features"] if cached is not None else torch.empty(0, n_views, loaded.embed_dim)
    missing = sorted(set(indices.tolist()) - set(known.tolist()))
    if missing:
        log.info("Encoding %d views of %d images (%d already cached)", n_views, len(missing), len(known))
        fresh = encode_augmented(loaded, split, missing, n_views, seed, device, batch_size, num_workers, amp,
                                 progress)
        known = torch.cat([known, torch.tensor(missing, dtype=torch.int64)])
        stored = torch.cat([stored, fresh])
        order = torch.argsort(known)
        known, stored = known[order], stored[order]
        if cache is not None:
            cache.save(key, {"indices": known, "features": stored})

    rows = torch.searchsorted(known, indices)
    return stored[rows]


# --------------------------------------------------------------------------------------------
# Text classifier


def _check_templates(classnames: Sequence[str], templates: Sequence[str]) -> None:
    if isinstance(templates, str):
        raise TypeError("templates must be a sequence of strings; wrap a single template as (template,)")
    if not classnames:
        raise ValueError("classnames must not be empty")
    if not templates:
        raise ValueError("templates must not be empty")
    for template in templates:
        if template.count("{}") != 1:
            raise ValueError(f"each template must contain exactly one '{{}}' for the class name, got {template!r}")


def text_classifier(loaded: LoadedCLIP, classnames: Sequence[str], templates: Sequence[str],
                    device: str | torch.device, cache: FeatureCache | None = None,
                    batch_size: int = 256, progress: bool = True) -> torch.Tensor:
    """Build the zero-shot text classifier T [C, D] (float32, CPU).

    Every template is filled with the class name and encoded. Each class's L2-normalised
    prompt embeddings are averaged and the mean is normalised again. ``batch_size`` counts
    prompts.
    """
    _check_templates(classnames, templates)
    device = torch.device(device)
    names_digest = hashlib.sha256(json.dumps(list(classnames)).encode()).hexdigest()
    key = {**_model_key(loaded), "kind": "text", "classnames_sha256": names_digest,
           "n_classes": len(classnames), "templates": json.dumps(list(templates))}
    if cache is not None:
        cached = cache.load(key)
        if cached is not None:
            return cached["text_weights"]

    prompts = [template.format(name) for name in classnames for template in templates]
    embeddings = torch.empty(len(prompts), loaded.embed_dim, dtype=torch.float32)
    with torch.inference_mode():
        for start in tqdm(range(0, len(prompts), batch_size), desc="encode prompts", unit="batch", leave=False,
                           disable=not progress):
            tokens = loaded.tokenizer(prompts[start:start + batch_size]).to(device)
            features = loaded.model.encode_text(tokens).float()
            embeddings[start:start + len(tokens)] = F.normalize(features, dim=-1).cpu()
    # [C·T, D] -> [C, T, D]: prompts were listed class by class.
    per_class = embeddings.view(len(classnames), len(templates), loaded.embed_dim)
    text_weights = F.normalize(per_class.mean(dim=1), dim=-1)

    if cache is not None:
        cache.save(key, {"text_weights": text_weights})
    return text_weights
