"""Feature extraction against direct open_clip forwards, checkpoint loading, and the feature cache.

Every model here is the tiny ViT config from conftest.py, randomly initialised or perturbed
with seeded noise; every image is generated.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os

import numpy as np
import open_clip
import open_clip.pretrained
import pytest
import safetensors.torch
import torch
import torch.nn.functional as F
from PIL import Image

from upa import features
from upa.data import ImageDataset, ImageSplit, open_rgb_image
from upa.features import (
    FeatureCache,
    StaleCacheError,
    UnsafeCheckpointError,
    Weights,
    augmented_features,
    encode_images,
    image_features,
    load_clip,
    parse_weights,
    text_classifier,
)

FAKE_REPO = "upa-test/tiny-clip"
FAKE_REVISION = "0123456789abcdef0123456789abcdef01234567"


# --------------------------------------------------------------------------------------------
# Fixtures


@pytest.fixture(scope="module")
def image_split(tmp_path_factory) -> ImageSplit:
    """Ten generated images of different sizes, aspect ratios and Pillow modes, two classes."""
    root = tmp_path_factory.mktemp("generated")
    rng = np.random.default_rng(0)
    sizes = [(40, 40), (64, 30), (30, 64), (33, 47), (200, 20), (20, 200), (48, 48), (35, 41), (80, 60), (17, 23)]
    paths = []
    for number, (width, height) in enumerate(sizes):
        pixels = rng.integers(0, 256, size=(height, width, 3), dtype=np.uint8)
        image = Image.fromarray(pixels)
        if number % 3 == 1:
            image = image.convert("L")
        path = root / "images" / f"{number:02d}.png"
        path.parent.mkdir(exist_ok=True)
        image.save(path)
        paths.append(path)
    labels = torch.tensor([number % 2 for number in range(len(paths))], dtype=torch.int64)
    return ImageSplit("Generated", "train", root, tuple(paths), labels, ("circle", "square"))


@pytest.fixture(scope="module")
def loaded(tiny_arch):
    return load_clip(tiny_arch, Weights("random"), "cpu")


def _perturbed_state_dict(loaded, seed: int = 1) -> dict[str, torch.Tensor]:
    """State dict of the tiny model plus seeded noise, so it differs from the seeded random init."""
    generator = torch.Generator().manual_seed(seed)
    state = {}
    for name, tensor in loaded.model.state_dict().items():
        noise = 0.05 * torch.randn(tensor.shape, generator=generator)
        state[name] = (tensor + noise).contiguous()
    state["logit_scale"] = torch.tensor(math.log(100.0))
    return state


def _model_with_state(tiny_arch, state):
    model = open_clip.create_model(tiny_arch, pretrained=None)
    model.load_state_dict(state)
    return model.eval()


def _probe_images(seed: int = 0) -> torch.Tensor:
    return torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


def _write_fake_hf_cache(root, filename: str, state) -> str:
    """Lay out a Hugging Face hub cache: blobs/, snapshots/<revision>/<file> -> blob, refs/main."""
    repo_folder = root / ("models--" + FAKE_REPO.replace("/", "--"))
    (repo_folder / "blobs").mkdir(parents=True)
    (repo_folder / "refs").mkdir()
    (repo_folder / "refs" / "main").write_text(FAKE_REVISION)
    blob = repo_folder / "blobs" / "weights-blob"
    if filename.endswith(".safetensors"):
        safetensors.torch.save_file(state, str(blob))
    else:
        torch.save(state, blob)
    snapshot = repo_folder / "snapshots" / FAKE_REVISION
    snapshot.mkdir(parents=True)
    os.symlink(os.path.relpath(blob, snapshot), snapshot / filename)
    return str(snapshot / filename)


@pytest.fixture
def fake_tag(tiny_arch, monkeypatch):
    """Register pretrained tags for the tiny arch in open_clip's registry, in its entry format."""
    tags = {
        "fake": {"url": "", "hf_hub": f"{FAKE_REPO}/", "mean": (0.5, 0.5, 0.5), "std": (0.25, 0.25, 0.25),
                 "interpolation": "bicubic", "resize_mode": "shortest"},
        "fake_quickgelu": {"url": "", "hf_hub": f"{FAKE_REPO}/", "quick_gelu": True},
    }
    monkeypatch.setitem(open_clip.pretrained._PRETRAINED, tiny_arch, tags)
    return "fake"


# --------------------------------------------------------------------------------------------
# Weights


def test_parse_weights_forms(tmp_path):
    checkpoint = tmp_path / "model.safetensors"
    checkpoint.write_bytes(b"")
    assert parse_weights("random") == Weights("random")
    assert parse_weights("pretrained:openai") == Weights("pretrained", "openai")
    assert parse_weights("laion2b_s34b_b79k") == Weights("pretrained", "laion2b_s34b_b79k")
    assert parse_weights(f"file:{checkpoint}") == Weights("checkpoint", str(checkpoint))
    assert parse_weights(str(checkpoint)) == Weights("checkpoint", str(checkpoint))


def test_parse_weights_describe_round_trip(tmp_path):
    for weights in (Weights("random"), Weights("pretrained", "openai"), Weights("checkpoint", str(tmp_path / "w.pt"))):
        assert parse_weights(weights.describe()) == weights


def test_parse_weights_invalid():
    with pytest.raises(ValueError, match="must not be empty"):
        parse_weights("  ")
    with pytest.raises(FileNotFoundError, match="pretrained:<tag>"):
        parse_weights("/no/such/folder/model.pt")
    with pytest.raises(FileNotFoundError, match="checkpoint file not found"):
        parse_weights("missing.safetensors")
    with pytest.raises(ValueError, match="weights kind"):
        Weights("downloaded", "x")
    with pytest.raises(ValueError, match="need a value"):
        Weights("pretrained")


# --------------------------------------------------------------------------------------------
# Loading


def test_load_clip_random_provenance(tiny_arch, loaded):
    rng_before = torch.get_rng_state()
    again = load_clip(tiny_arch, Weights("random"), "cpu")
    assert torch.equal(torch.get_rng_state(), rng_before)
    assert again.provenance["random_init"] is True
    assert again.provenance["kind"] == "random"
    assert again.provenance["parameters_sha256"] == loaded.provenance["parameters_sha256"]
    assert again.logit_scale == pytest.approx(1 / 0.07, rel=1e-6)
    assert again.embed_dim == 32
    assert again.provenance["open_clip_version"] == open_clip.__version__


def test_load_clip_unknown_arch():
    with pytest.raises(ValueError, match="open_clip.list_models"):
        load_clip("ViT-Nonexistent-1", Weights("random"), "cpu")


def test_load_clip_invalid_precision(tiny_arch):
    with pytest.raises(ValueError, match="precision must be one of"):
        load_clip(tiny_arch, Weights("random"), "cpu", precision="fp8")


@pytest.mark.slow
@pytest.mark.parametrize("suffix", [".safetensors", ".pt"])
def test_checkpoint_identical_features(tiny_arch, loaded, tmp_path, suffix):
    state = _perturbed_state_dict(loaded)
    path = tmp_path / f"weights{suffix}"
    if suffix == ".safetensors":
        safetensors.torch.save_file(state, str(path))
    else:
        torch.save(state, path)

    clip = load_clip(tiny_arch, Weights("checkpoint", str(path)), "cpu")

    source = _model_with_state(tiny_arch, state)
    with torch.inference_mode():
        assert torch.equal(clip.model.encode_image(_probe_images()), source.encode_image(_probe_images()))
    assert clip.logit_scale == pytest.approx(100.0, rel=1e-6)
    assert clip.provenance["random_init"] is False
    assert clip.provenance["checkpoint_sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
    assert clip.provenance["checkpoint_path"] == str(path.resolve())


def test_checkpoint_wrapped_and_prefixed(tiny_arch, loaded, tmp_path):
    state = _perturbed_state_dict(loaded)
    path = tmp_path / "ddp.pt"
    torch.save({"state_dict": {f"module.{name}": tensor for name, tensor in state.items()}, "epoch": 3}, path)

    clip = load_clip(tiny_arch, Weights("checkpoint", str(path)), "cpu")

    for name, tensor in clip.model.state_dict().items():
        assert torch.equal(tensor, state[name]), name


def test_checkpoint_pickle_rejected_without_opt_in(tiny_arch, loaded, tmp_path):
    path = tmp_path / "trainer.pt"
    torch.save({"state_dict": _perturbed_state_dict(loaded), "args": argparse.Namespace(lr=0.1)}, path)

    with pytest.raises(UnsafeCheckpointError) as error:
        load_clip(tiny_arch, Weights("checkpoint", str(path)), "cpu")
    assert "allow_pickle=True" in str(error.value)
    assert "--allow-pickle" in str(error.value)
    assert str(path) in str(error.value)

    clip = load_clip(tiny_arch, Weights("checkpoint", str(path)), "cpu", allow_pickle=True)
    assert clip.logit_scale == pytest.approx(100.0, rel=1e-6)


def test_checkpoint_wrong_architecture(tiny_arch, tmp_path):
    path = tmp_path / "other.safetensors"
    safetensors.torch.save_file({"visual.unrelated": torch.zeros(2)}, str(path))
    with pytest.raises(ValueError, match="does not fit the architecture"):
        load_clip(tiny_arch, Weights("checkpoint", str(path)), "cpu")


# --------------------------------------------------------------------------------------------
# Pretrained tags from the local Hugging Face cache


@pytest.mark.slow
def test_pretrained_tag_from_fake_hf_cache(tiny_arch, loaded, fake_tag, tmp_path):
    state = _perturbed_state_dict(loaded)
    expected_path = _write_fake_hf_cache(tmp_path / "hub", features.HF_SAFE_WEIGHTS_NAME, state)

    clip = load_clip(tiny_arch, Weights("pretrained", fake_tag), "cpu", cache_dir=tmp_path / "hub")

    source = _model_with_state(tiny_arch, state)
    with torch.inference_mode():
        assert torch.equal(clip.model.encode_image(_probe_images()), source.encode_image(_probe_images()))
    assert clip.provenance["checkpoint_path"] == os.path.realpath(expected_path)
    assert clip.provenance["hf_hub"] == f"{FAKE_REPO}/"
    # The tag's preprocessing replaces the architecture's defaults.
    assert tuple(clip.model.visual.preprocess_cfg["mean"]) == (0.5, 0.5, 0.5)
    assert "std=(0.25, 0.25, 0.25)" in repr(clip.preprocess)


def test_pretrained_tag_applies_quick_gelu(tiny_arch, loaded, fake_tag, tmp_path):
    _write_fake_hf_cache(tmp_path / "hub", features.HF_WEIGHTS_NAME, _perturbed_state_dict(loaded))
    clip = load_clip(tiny_arch, Weights("pretrained", "fake_quickgelu"), "cpu", cache_dir=tmp_path / "hub")
    assert clip.provenance["quick_gelu"] is True
    assert any(isinstance(module, open_clip.transformer.QuickGELU) for module in clip.model.modules())


def test_resolve_pretrained_reads_environment(tiny_arch, loaded, fake_tag, tmp_path, monkeypatch):
    expected = _write_fake_hf_cache(tmp_path / "home" / "hub", features.HF_WEIGHTS_NAME, _perturbed_state_dict(loaded))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.delenv("HUGGINGFACE_HUB_CACHE", raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "home"))
    assert str(features.resolve_pretrained(tiny_arch, fake_tag)) == expected


def test_resolve_pretrained_missing_cache(tiny_arch, fake_tag, tmp_path):
    with pytest.raises(FileNotFoundError) as error:
        features.resolve_pretrained(tiny_arch, fake_tag, cache_dir=tmp_path / "empty")
    message = str(error.value)
    assert str(tmp_path / "empty" / "models--upa-test--tiny-clip") in message
    assert f"hf download {FAKE_REPO}" in message
    assert features.HF_SAFE_WEIGHTS_NAME in message


def test_resolve_pretrained_unknown_tag(tiny_arch, fake_tag):
    with pytest.raises(ValueError, match="valid tags: fake, fake_quickgelu"):
        features.resolve_pretrained(tiny_arch, "laion400m")


def test_resolve_pretrained_cfg_named_file(tmp_path):
    cfg = {"hf_hub": "org/name/weights.bin"}
    with pytest.raises(FileNotFoundError, match=r"\['weights.safetensors', 'weights.bin'\]"):
        features.resolve_pretrained_cfg(cfg, tmp_path)


def test_hf_cache_dir_precedence(tmp_path, monkeypatch):
    for variable in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE", "HF_HOME", "XDG_CACHE_HOME"):
        monkeypatch.delenv(variable, raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert features.hf_cache_dir() == tmp_path / "xdg" / "huggingface" / "hub"
    monkeypatch.setenv("HF_HOME", str(tmp_path / "home"))
    assert features.hf_cache_dir() == tmp_path / "home" / "hub"
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    assert features.hf_cache_dir() == tmp_path / "hub"
    assert features.hf_cache_dir(tmp_path / "explicit") == tmp_path / "explicit"


# --------------------------------------------------------------------------------------------
# Encoding images


def _manual_features(clip, split: ImageSplit) -> torch.Tensor:
    rows = []
    with torch.inference_mode():
        for path in split.paths:
            image = clip.preprocess(open_rgb_image(path)).unsqueeze(0)
            rows.append(F.normalize(clip.model.encode_image(image), dim=-1)[0])
    return torch.stack(rows)


@pytest.mark.slow
def test_encode_images_matches_manual_forward(loaded, image_split):
    encoded = encode_images(loaded, ImageDataset(image_split, loaded.preprocess), "cpu", batch_size=4, num_workers=0)
    expected = _manual_features(loaded, image_split)
    assert encoded.shape == (len(image_split), loaded.embed_dim)
    assert encoded.dtype == torch.float32
    assert encoded.device.type == "cpu"
    torch.testing.assert_close(encoded, expected, atol=1e-5, rtol=0)
    torch.testing.assert_close(encoded.norm(dim=1), torch.ones(len(image_split)), atol=1e-6, rtol=0)


@pytest.mark.slow
def test_encode_images_subset_and_workers(loaded, image_split):
    dataset = ImageDataset(image_split, loaded.preprocess, indices=[7, 2, 5])
    encoded = encode_images(loaded, dataset, "cpu", batch_size=2, num_workers=2)
    expected = _manual_features(loaded, image_split)[[7, 2, 5]]
    torch.testing.assert_close(encoded, expected, atol=1e-5, rtol=0)


@pytest.mark.slow
def test_encode_images_preallocates_output(loaded, image_split, monkeypatch):
    """The returned tensor is allocated before the first forward pass and filled batch by batch."""
    allocations = []
    forward_calls = []
    real_empty = torch.empty
    real_encode_image = loaded.model.encode_image

    def recording_empty(*args, **kwargs):
        tensor = real_empty(*args, **kwargs)
        allocations.append((tensor, len(forward_calls)))
        return tensor

    def counting_encode_image(images):
        forward_calls.append(len(images))
        return real_encode_image(images)

    monkeypatch.setattr(torch, "empty", recording_empty)
    monkeypatch.setattr(loaded.model, "encode_image", counting_encode_image)
    encoded = encode_images(loaded, ImageDataset(image_split, loaded.preprocess), "cpu", batch_size=3, num_workers=0)
    monkeypatch.undo()

    assert forward_calls == [3, 3, 3, 1]
    # A freed temporary may have used the same address earlier, but no allocation made after a
    # forward pass can, because the output stays alive from its allocation on.
    owners = [calls_before for tensor, calls_before in allocations if tensor.data_ptr() == encoded.data_ptr()]
    assert owners
    assert set(owners) == {0}
    assert encoded.shape == (len(image_split), loaded.embed_dim)


def test_encode_images_invalid_arguments(loaded, image_split):
    dataset = ImageDataset(image_split, loaded.preprocess)
    with pytest.raises(ValueError, match="batch_size"):
        encode_images(loaded, dataset, "cpu", batch_size=0)
    with pytest.raises(ValueError, match="num_workers"):
        encode_images(loaded, dataset, "cpu", num_workers=-1)
    with pytest.raises(ValueError, match="CUDA"):
        encode_images(loaded, dataset, "cpu", amp=True)


def test_autocast_dtype_cpu_is_off():
    assert features.autocast_dtype(torch.device("cpu"), None) is None
    assert features.autocast_dtype(torch.device("cpu"), False) is None


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_encode_images_cuda_autocast_close_to_cpu(tiny_arch, image_split):
    clip = load_clip(tiny_arch, Weights("random"), "cuda")
    on_gpu = encode_images(clip, ImageDataset(image_split, clip.preprocess), "cuda", batch_size=4, num_workers=0)
    clip_cpu = load_clip(tiny_arch, Weights("random"), "cpu")
    expected = encode_images(clip_cpu, ImageDataset(image_split, clip_cpu.preprocess), "cpu", num_workers=0)
    assert on_gpu.device.type == "cpu"
    torch.testing.assert_close(on_gpu, expected, atol=2e-2, rtol=0)


# --------------------------------------------------------------------------------------------
# Feature cache


def test_feature_cache_round_trip(tmp_path):
    cache = FeatureCache(tmp_path)
    key = {"kind": "image", "dataset": "Generated", "split": "train", "arch": "ViT-B-32", "seed": 3}
    tensors = {"features": torch.randn(4, 8), "indices": torch.arange(4)}
    path = cache.save(key, tensors)

    assert path.name.startswith("image_Generated_train_ViT-B-32-")
    loaded_tensors = cache.load(key)
    assert torch.equal(loaded_tensors["features"], tensors["features"])
    assert torch.equal(loaded_tensors["indices"], tensors["indices"])
    metadata = safetensors.safe_open(str(path), framework="pt").metadata()
    assert json.loads(metadata["key"]) == {name: str(value) for name, value in key.items()}
    assert metadata["seed"] == "3"
    assert cache.load({**key, "seed": 4}) is None


def test_feature_cache_stale_rejected(tmp_path):
    cache = FeatureCache(tmp_path)
    written = {"kind": "image", "split_fingerprint": "aaa"}
    requested = {"kind": "image", "split_fingerprint": "bbb"}
    source = cache.save(written, {"features": torch.zeros(2, 2)})
    target = cache.path_for(requested)
    os.replace(source, target)

    with pytest.raises(StaleCacheError) as error:
        cache.load(requested)
    message = str(error.value)
    assert str(target) in message
    assert "split_fingerprint (cached 'aaa', requested 'bbb')" in message
    assert "Delete the file or use a different cache dir" in message


def test_feature_cache_foreign_file_rejected(tmp_path):
    cache = FeatureCache(tmp_path)
    key = {"kind": "image"}
    cache.root.mkdir(exist_ok=True)
    safetensors.torch.save_file({"features": torch.zeros(1)}, str(cache.path_for(key)))
    with pytest.raises(StaleCacheError, match="differing fields: format"):
        cache.load(key)


def test_feature_cache_unreadable_file_rejected(tmp_path):
    cache = FeatureCache(tmp_path)
    key = {"kind": "image"}
    cache.path_for(key).write_bytes(b"not a safetensors file")
    with pytest.raises(StaleCacheError, match="not a readable safetensors file"):
        cache.load(key)


@pytest.mark.parametrize("interruption", [OSError("disk full"), KeyboardInterrupt()])
def test_feature_cache_interrupted_write_leaves_nothing(tmp_path, monkeypatch, interruption):
    cache = FeatureCache(tmp_path)
    key = {"kind": "image", "dataset": "Generated"}
    real_save_file = safetensors.torch.save_file

    def write_half_then_fail(tensors, filename, metadata=None):
        real_save_file(tensors, filename, metadata=metadata)
        with open(filename, "r+b") as file:
            file.truncate(os.path.getsize(filename) // 2)
        raise interruption

    monkeypatch.setattr(safetensors.torch, "save_file", write_half_then_fail)
    with pytest.raises(type(interruption)):
        cache.save(key, {"features": torch.randn(16, 8)})
    assert list(tmp_path.iterdir()) == []


def test_feature_cache_interrupted_rewrite_keeps_old_file(tmp_path, monkeypatch):
    cache = FeatureCache(tmp_path)
    key = {"kind": "image"}
    old = torch.randn(3, 4)
    cache.save(key, {"features": old})

    def fail(tensors, filename, metadata=None):
        open(filename, "wb").write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(safetensors.torch, "save_file", fail)
    with pytest.raises(OSError):
        cache.save(key, {"features": torch.zeros(3, 4)})
    monkeypatch.undo()
    assert [path.name for path in tmp_path.iterdir()] == [cache.path_for(key).name]
    assert torch.equal(cache.load(key)["features"], old)


def test_feature_cache_reserved_key(tmp_path):
    with pytest.raises(ValueError, match="reserved"):
        FeatureCache(tmp_path).path_for({"format": "x"})


@pytest.mark.slow
def test_image_features_cached(loaded, image_split, tmp_path, monkeypatch):
    cache = FeatureCache(tmp_path)
    first = image_features(loaded, image_split, cache, "cpu", batch_size=4, num_workers=0)

    def fail(*args, **kwargs):
        raise AssertionError("encoded again although the cache holds the features")

    monkeypatch.setattr(features, "encode_images", fail)
    second = image_features(loaded, image_split, cache, "cpu", batch_size=4, num_workers=0)
    assert torch.equal(first, second)
    assert len(list(tmp_path.iterdir())) == 1


# --------------------------------------------------------------------------------------------
# Augmented views


def test_crop_box_inside_image_and_seeded():
    for width, height in [(40, 40), (200, 20), (20, 200), (17, 23), (1, 1)]:
        for seed in range(50):
            top, left, crop_height, crop_width = features._crop_box(
                width, height, torch.Generator().manual_seed(seed))
            assert top >= 0
            assert top + crop_height <= height
            assert left >= 0
            assert left + crop_width <= width
            assert crop_height > 0
            assert crop_width > 0
            again = features._crop_box(width, height, torch.Generator().manual_seed(seed))
            assert again == (top, left, crop_height, crop_width)


def test_crop_box_area_in_scale_range():
    fractions = []
    for seed in range(200):
        _, _, crop_height, crop_width = features._crop_box(100, 100, torch.Generator().manual_seed(seed))
        fractions.append(crop_height * crop_width / 100**2)
    # Rounding each side to whole pixels moves the area by about 2 % at most.
    assert min(fractions) >= 0.5 - 0.02
    assert max(fractions) <= 1.0
    assert max(fractions) - min(fractions) > 0.3


def test_augment_transform_shape_and_normalisation(loaded):
    augment = features.augment_transform(loaded)
    white = Image.new("RGB", (50, 37), (255, 255, 255))
    view = augment(white, torch.Generator().manual_seed(0))
    assert view.shape == (3, 32, 32)
    mean, std = loaded.model.visual.preprocess_cfg["mean"], loaded.model.visual.preprocess_cfg["std"]
    for channel in range(3):
        expected = (1.0 - mean[channel]) / std[channel]
        torch.testing.assert_close(view[channel], torch.full((32, 32), expected), atol=1e-5, rtol=0)


@pytest.mark.slow
def test_augmented_features_seeded_views(loaded, image_split):
    rng_before = torch.get_rng_state()
    views = augmented_features(loaded, image_split, torch.tensor([0, 3]), 3, 7, None, "cpu", num_workers=0)
    assert torch.equal(torch.get_rng_state(), rng_before)
    assert views.shape == (2, 3, loaded.embed_dim)
    torch.testing.assert_close(views.norm(dim=-1), torch.ones(2, 3), atol=1e-6, rtol=0)
    assert not torch.allclose(views[0, 0], views[0, 1])

    # Image 3 comes second above and first here: its views must not depend on that position.
    alone = augmented_features(loaded, image_split, torch.tensor([3]), 3, 7, None, "cpu", num_workers=0)
    torch.testing.assert_close(alone[0], views[1], atol=1e-6, rtol=0)
    other_seed = augmented_features(loaded, image_split, torch.tensor([3]), 3, 8, None, "cpu", num_workers=0)
    assert not torch.allclose(other_seed[0], views[1])


@pytest.mark.slow
def test_augmented_features_subset_reuse(loaded, image_split, tmp_path, monkeypatch):
    cache = FeatureCache(tmp_path)
    first = augmented_features(loaded, image_split, torch.tensor([0, 3, 5]), 2, 0, cache, "cpu", num_workers=0)

    encoded_indices = []
    real_encode = features.encode_augmented

    def recording_encode(clip, split, indices, *args, **kwargs):
        encoded_indices.append(list(indices))
        return real_encode(clip, split, indices, *args, **kwargs)

    monkeypatch.setattr(features, "encode_augmented", recording_encode)
    subset = augmented_features(loaded, image_split, torch.tensor([5, 0, 5]), 2, 0, cache, "cpu", num_workers=0)
    assert encoded_indices == []
    assert torch.equal(subset, first[[2, 0, 2]])

    superset = augmented_features(loaded, image_split, torch.tensor([1, 3, 0, 9]), 2, 0, cache, "cpu", num_workers=0)
    assert encoded_indices == [[1, 9]]
    assert torch.equal(superset[1], first[1])
    assert torch.equal(superset[2], first[0])
    alone = augmented_features(loaded, image_split, torch.tensor([9]), 2, 0, None, "cpu", num_workers=0)
    torch.testing.assert_close(superset[3], alone[0], atol=1e-6, rtol=0)

    # One file stores the union of all encoded images, sorted by split index.
    merged = cache.load(_augmented_key(loaded, image_split, 2, 0))
    assert merged["indices"].tolist() == [0, 1, 3, 5, 9]
    assert len(list(tmp_path.iterdir())) == 1


def _augmented_key(clip, split, n_views, seed):
    augment = features.augment_transform(clip)
    return {**features._split_key(clip, split, torch.device("cpu"), None), "kind": "augmented",
            "transform": features._stable_repr(augment), "n_views": n_views, "seed": seed}


def test_augmented_features_invalid_indices(loaded, image_split):
    with pytest.raises(ValueError, match=r"\[0, 10\)"):
        augmented_features(loaded, image_split, torch.tensor([10]), 2, 0, None, "cpu")
    with pytest.raises(ValueError, match="integer tensor"):
        augmented_features(loaded, image_split, torch.tensor([0.5]), 2, 0, None, "cpu")
    with pytest.raises(ValueError, match="n_views"):
        augmented_features(loaded, image_split, torch.tensor([0]), 0, 0, None, "cpu")


# --------------------------------------------------------------------------------------------
# Text classifier


def _manual_text_classifier(clip, classnames, templates) -> torch.Tensor:
    rows = []
    with torch.inference_mode():
        for name in classnames:
            tokens = clip.tokenizer([template.format(name) for template in templates])
            embeddings = F.normalize(clip.model.encode_text(tokens), dim=-1)
            rows.append(F.normalize(embeddings.mean(dim=0), dim=-1))
    return torch.stack(rows)


def test_text_classifier_matches_manual(loaded):
    classnames = ("circle", "square", "hand-drawn star")
    templates = ("a photo of a {}.", "art of the {}.")
    weights = text_classifier(loaded, classnames, templates, "cpu", batch_size=4)
    assert weights.shape == (3, loaded.embed_dim)
    assert weights.dtype == torch.float32
    torch.testing.assert_close(weights, _manual_text_classifier(loaded, classnames, templates), atol=1e-6, rtol=0)


def test_text_classifier_single_template(loaded):
    weights = text_classifier(loaded, ("circle", "square"), ("a photo of a {}.",), "cpu")
    with torch.inference_mode():
        tokens = loaded.tokenizer(["a photo of a circle.", "a photo of a square."])
        direct = F.normalize(loaded.model.encode_text(tokens), dim=-1)
    torch.testing.assert_close(weights, direct, atol=1e-6, rtol=0)


def test_text_classifier_cached(loaded, tmp_path, monkeypatch):
    cache = FeatureCache(tmp_path)
    first = text_classifier(loaded, ("circle", "square"), ("a {}.",), "cpu", cache)
    monkeypatch.setattr(loaded.model, "encode_text", None)
    assert torch.equal(text_classifier(loaded, ("circle", "square"), ("a {}.",), "cpu", cache), first)
    assert len(list(tmp_path.iterdir())) == 1


def test_text_classifier_invalid_templates(loaded):
    with pytest.raises(TypeError, match="wrap a single template"):
        text_classifier(loaded, ("circle",), "a photo of a {}.", "cpu")
    with pytest.raises(ValueError, match="exactly one"):
        text_classifier(loaded, ("circle",), ("a photo.",), "cpu")
    with pytest.raises(ValueError, match="classnames"):
        text_classifier(loaded, (), ("a {}.",), "cpu")
