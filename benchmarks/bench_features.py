"""Benchmark feature extraction: loader overhead, cached K sweeps and memory against N.

Four measurements on the same generated JPEG images and the same model, in one run:

1. model-forward throughput on images decoded and transformed beforehand (the ceiling);
2. full extraction throughput through ``upa.features.encode_images`` (decode, transform,
   forward), and the ratio of the two (target >= 0.85);
3. an 8-value K sweep of prototype building from cached features against re-encoding the
   images for every K (target speed-up >= 50x);
4. peak resident memory during extraction of N and 4N images, which should not grow with N
   beyond the N x D x 4 bytes of the output.

Weights default to random initialisation, so every number measures speed and memory only.
Measurement 2 runs with 0 loader workers and with the requested number. With 0 workers the
transforms run in the main process under torch's intra-op thread pool. On the 2-core VM used
during development, ToTensor and Normalize then took about 35 ms per image each, against
0.5 ms with the single thread that DataLoader workers use.
Example (about 2-3 minutes on 2 CPU cores)::

    .venv/bin/python benchmarks/bench_features.py --arch ViT-B-32 --weights random --n-images 64
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import multiprocessing
import os
import platform
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from upa import features
from upa.data import ImageDataset, ImageSplit, open_rgb_image

K_VALUES = (1, 2, 3, 4, 6, 8, 12, 16)
ROUNDS = 2
CLASSNAMES = ("red thing", "green thing", "blue thing", "grey thing")
TINTS = ((200, 60, 60), (60, 200, 60), (60, 60, 200), (128, 128, 128))
TEMPLATE = "a photo of a {}."
# ImageNet's typical photo size, so that JPEG decoding and resizing cost what they cost there.
IMAGE_WIDTH, IMAGE_HEIGHT = 500, 375


def generate_images(folder: Path, count: int) -> ImageSplit:
    """Write ``count`` smooth random JPEGs (quality 90), one tint per class, and return their split."""
    rng = np.random.default_rng(0)
    folder.mkdir(parents=True, exist_ok=True)
    paths, labels = [], []
    for number in range(count):
        label = number % len(CLASSNAMES)
        coarse = rng.integers(0, 256, size=(12, 16, 3), dtype=np.uint8)
        image = Image.fromarray(coarse).resize((IMAGE_WIDTH, IMAGE_HEIGHT), Image.BILINEAR)
        pixels = (0.6 * np.asarray(image) + 0.4 * np.array(TINTS[label])).astype(np.uint8)
        path = folder / f"{number:05d}.jpg"
        Image.fromarray(pixels).save(path, quality=90)
        paths.append(path)
        labels.append(label)
    return ImageSplit("generated-jpeg", "train", folder, tuple(paths), torch.tensor(labels, dtype=torch.int64),
                      CLASSNAMES)


def subset(split: ImageSplit, count: int) -> ImageSplit:
    return ImageSplit(split.dataset, f"first-{count}", split.root, split.paths[:count], split.labels[:count],
                      split.classnames)


def decode_all(clip, split: ImageSplit) -> torch.Tensor:
    """Decode and transform every image of ``split`` into one tensor [N, 3, H, W]."""
    return torch.stack([clip.preprocess(open_rgb_image(path)) for path in split.paths])


def forward_throughput(clip, decoded: torch.Tensor, device: torch.device, batch_size: int) -> float:
    """Images per second of normalised forward passes on tensors decoded beforehand."""
    with torch.inference_mode():
        clip.model.encode_image(decoded[:2].to(device))  # warm-up
        start = time.perf_counter()
        for first in range(0, len(decoded), batch_size):
            batch = decoded[first:first + batch_size].to(device)
            F.normalize(clip.model.encode_image(batch).float(), dim=-1).cpu()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return len(decoded) / (time.perf_counter() - start)


def extraction_throughput(clip, split: ImageSplit, device: torch.device, batch_size: int,
                          num_workers: int) -> float:
    """Images per second of encode_images, decoding and transforming included."""
    start = time.perf_counter()
    features.encode_images(clip, ImageDataset(split, clip.preprocess), device, batch_size, num_workers)
    return len(split) / (time.perf_counter() - start)


def throughputs(clip, split: ImageSplit, device: torch.device, batch_size: int, worker_counts: list[int]) -> dict:
    """Best of ROUNDS interleaved rounds of forward-only and extraction throughput, in img/s.

    Interleaving spreads changes in machine load over all variants instead of one.
    """
    decoded = decode_all(clip, split)
    best = {"forward": 0.0} | {f"extraction_{workers}_workers": 0.0 for workers in worker_counts}
    for _ in range(ROUNDS):
        best["forward"] = max(best["forward"], forward_throughput(clip, decoded, device, batch_size))
        for workers in worker_counts:
            name = f"extraction_{workers}_workers"
            best[name] = max(best[name], extraction_throughput(clip, split, device, batch_size, workers))
    return best


def prototypes_for_k(image_features: torch.Tensor, text_weights: torch.Tensor, logit_scale: float, k: int):
    from upa.method import class_prototypes, select_confident, zero_shot_logits

    probs = zero_shot_logits(image_features, text_weights, logit_scale).softmax(dim=1)
    selection = select_confident(probs, k)
    return class_prototypes(image_features[selection.indices], selection.labels, len(text_weights),
                            fallback=text_weights)


def k_sweep(clip, split: ImageSplit, device: torch.device, batch_size: int, num_workers: int,
            cache_dir: Path) -> dict:
    """Time the K sweep from one cached feature file and with re-encoding for every K."""
    text_weights = features.text_classifier(clip, split.classnames, (TEMPLATE,), device)
    cache = features.FeatureCache(cache_dir)

    start = time.perf_counter()
    features.image_features(clip, split, cache, device, batch_size, num_workers)
    first_encoding_s = time.perf_counter() - start

    start = time.perf_counter()
    cached = features.image_features(clip, split, cache, device, batch_size, num_workers)
    cached_results = [prototypes_for_k(cached, text_weights, clip.logit_scale, k) for k in K_VALUES]
    cached_s = time.perf_counter() - start

    start = time.perf_counter()
    encoded_results = []
    for k in K_VALUES:
        fresh = features.encode_images(clip, ImageDataset(split, clip.preprocess), device, batch_size, num_workers)
        encoded_results.append(prototypes_for_k(fresh, text_weights, clip.logit_scale, k))
    reencode_s = time.perf_counter() - start

    max_difference = max(float((a - b).abs().max()) for a, b in zip(cached_results, encoded_results))
    return {"k_values": list(K_VALUES), "first_encoding_s": first_encoding_s, "cached_sweep_s": cached_s,
            "reencode_sweep_s": reencode_s, "speedup": reencode_s / cached_s,
            "max_prototype_difference": max_difference}


def current_rss_bytes() -> int | None:
    """Resident set size of this process from /proc (Linux); None elsewhere."""
    try:
        with open("/proc/self/statm") as file:
            return int(file.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        return None


class PeakRSS:
    """Sample this process's resident memory every few milliseconds and keep the maximum."""

    def __init__(self, interval_s: float = 0.005):
        self.interval_s = interval_s
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def _sample(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, current_rss_bytes() or 0)
            time.sleep(self.interval_s)

    def __enter__(self) -> "PeakRSS":
        self._thread.start()
        return self

    def __exit__(self, *exc_info) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, current_rss_bytes() or 0)


def _measure_extraction_memory(arch: str, weights: str, hf_cache_dir: str | None, allow_pickle: bool,
                               split: ImageSplit, device: str, batch_size: int) -> dict:
    """Run in a fresh process: peak RSS above the post-load baseline while encoding ``split``."""
    clip = features.load_clip(arch, features.parse_weights(weights), device, cache_dir=hf_cache_dir,
                              allow_pickle=allow_pickle)
    gc.collect()
    baseline = current_rss_bytes()
    with PeakRSS() as sampler:
        out = features.encode_images(clip, ImageDataset(split, clip.preprocess), device, batch_size, num_workers=0)
    return {"n_images": len(split), "baseline_mib": baseline / 2**20,
            "peak_growth_mib": (sampler.peak - baseline) / 2**20,
            "output_mib": out.numel() * out.element_size() / 2**20}


def memory_growth(args: argparse.Namespace, split: ImageSplit, counts: tuple[int, ...]) -> list[dict]:
    """Measure extraction memory for each image count, each in a fresh process.

    A fresh process keeps memory that an earlier run left in the allocator out of the
    measurement. Images load in that process (num_workers=0), so the sampler measures their memory too.
    """
    if current_rss_bytes() is None:
        return [{"n_images": None, "note": "/proc/self/statm is not available; memory not measured"}]
    context = multiprocessing.get_context("spawn")
    rows = []
    for count in counts:
        with context.Pool(1) as pool:
            rows.append(pool.apply(_measure_extraction_memory, (
                args.arch, args.weights, args.hf_cache_dir, args.allow_pickle, subset(split, count),
                args.device, args.batch_size)))
    return rows


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", default="ViT-B-32", help="open_clip architecture name")
    parser.add_argument("--weights", default="random",
                        help="random, pretrained:<tag> (from the local Hugging Face cache) or file:<path>")
    parser.add_argument("--hf-cache-dir", default=None, help="Hugging Face hub cache folder for pretrained tags")
    parser.add_argument("--allow-pickle", action="store_true", help="allow a full pickle load of a .pt checkpoint")
    parser.add_argument("--n-images", type=int, default=64,
                        help="N, the images of measurements 1-3; measurement 4 also encodes 4N")
    parser.add_argument("--batch-size", type=int, default=32, help="images per forward pass")
    parser.add_argument("--num-workers", type=int, default=None,
                        help="DataLoader worker processes for measurements 2 and 3 (default: upa's, "
                             "min(4, CPU count))")
    parser.add_argument("--device", default="cpu", help="torch device, e.g. cpu or cuda")
    parser.add_argument("--work-dir", default=None, help="folder for the generated images and cache "
                                                         "(default: a temporary folder, removed afterwards)")
    parser.add_argument("--json", default=None, help="also write the results to this JSON file")
    return parser.parse_args()


def run(args: argparse.Namespace, work_dir: Path) -> dict:
    device = torch.device(args.device)
    num_workers = features.default_num_workers() if args.num_workers is None else args.num_workers
    clip = features.load_clip(args.arch, features.parse_weights(args.weights), device,
                              cache_dir=args.hf_cache_dir, allow_pickle=args.allow_pickle)
    all_images = generate_images(work_dir / "images", 4 * args.n_images)
    split = subset(all_images, args.n_images)
    weights_text = "random init" if clip.provenance["random_init"] else clip.weights.describe()
    print(f"provenance: {args.arch} with {weights_text}; data: {4 * args.n_images} generated "
          f"{IMAGE_WIDTH}x{IMAGE_HEIGHT} JPEGs (no real dataset); device {device}, "
          f"{torch.get_num_threads()} torch threads, {os.cpu_count()} CPUs, "
          f"{platform.processor() or platform.machine()}")

    worker_counts = sorted({0, num_workers})
    speeds = throughputs(clip, split, device, args.batch_size, worker_counts)
    forward = speeds["forward"]
    print(f"1. forward only, pre-decoded:  {forward:7.1f} img/s (N={args.n_images}, batch {args.batch_size}, "
          f"best of {ROUNDS})")
    for workers in worker_counts:
        extraction = speeds[f"extraction_{workers}_workers"]
        print(f"2. encode_images, {workers} workers: {extraction:7.1f} img/s, ratio to forward "
              f"{extraction / forward:.3f} (target >= 0.85)")

    sweep = k_sweep(clip, split, device, args.batch_size, num_workers, work_dir / "cache")
    print(f"3. K sweep over {sweep['k_values']}: cached {sweep['cached_sweep_s']:.3f} s, "
          f"re-encoding every K {sweep['reencode_sweep_s']:.1f} s, speed-up {sweep['speedup']:.0f}x "
          f"(target >= 50x); first encoding {sweep['first_encoding_s']:.1f} s; "
          f"max prototype difference {sweep['max_prototype_difference']:.1e}")

    memory = memory_growth(args, all_images, (args.n_images, 4 * args.n_images))
    for row in memory:
        if row.get("n_images") is None:
            print(f"4. {row['note']}")
            continue
        print(f"4. N={row['n_images']:5d}: peak RSS growth {row['peak_growth_mib']:7.1f} MiB over a "
              f"{row['baseline_mib']:.0f} MiB baseline; output tensor {row['output_mib']:.2f} MiB")

    return {"provenance": {**clip.provenance, "data": f"{4 * args.n_images} generated JPEGs",
                           "device": str(device), "torch_threads": torch.get_num_threads(),
                           "cpu_count": os.cpu_count()},
            "settings": {name: value for name, value in vars(args).items() if name != "json"} | {
                "num_workers": num_workers},
            "throughput_img_per_s": speeds,
            "extraction_ratios": {name: value / forward for name, value in speeds.items() if name != "forward"},
            "k_sweep": sweep, "memory": memory}


def main() -> None:
    args = parse_args()
    logging.basicConfig(level=logging.WARNING)
    if args.work_dir:
        results = run(args, Path(args.work_dir))
    else:
        with tempfile.TemporaryDirectory(prefix="upa-bench-") as folder:
            results = run(args, Path(folder))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2, default=str))
        print(f"results written to {args.json}")


if __name__ == "__main__":
    main()
