"""Provenance of a number: code version, packages, device, weights and data."""

from __future__ import annotations

import platform
import subprocess
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path

import torch

PACKAGES = ("upa", "torch", "torchvision", "open_clip_torch", "safetensors", "numpy", "pandas", "scikit-learn")


def git_commit(repo: Path | None = None) -> str:
    """Return the checked-out commit with a ``-dirty`` suffix for local changes, or "unknown"."""
    repo = repo or Path(__file__).resolve().parent.parent
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=repo, capture_output=True, text=True, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"], cwd=repo, capture_output=True, text=True
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return commit + ("-dirty" if dirty else "")


def package_versions() -> dict[str, str]:
    versions = {}
    for name in PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = "not installed"
    return versions


def device_description(device: torch.device) -> str:
    if device.type == "cuda":
        return f"cuda:{torch.cuda.get_device_name(device)}"
    return f"{device.type}:{platform.processor() or platform.machine()} ({torch.get_num_threads()} threads)"


def environment(device: torch.device) -> dict:
    """Collect the environment block written into every result file."""
    return {
        "git_commit": git_commit(),
        "packages": package_versions(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "device": device_description(device),
        "created_utc": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }


def provenance_label(weights: dict, data: dict) -> str:
    """Summarise weights and data in one line, marking a number that is no reproduction."""
    if weights.get("random_init"):
        weights_text = f"randomly initialised {weights['arch']}"
    elif weights.get("kind") == "pretrained":
        weights_text = f"{weights['arch']} pretrained:{weights['value']}"
    else:
        weights_text = f"{weights['arch']} from file {weights.get('value')}"
    data_text = f"{data['dataset']} ({data['kind']})"
    label = f"{weights_text} on {data_text}"
    if not is_reproduction(weights, data):
        label += ": not a reproduction of the paper"
    return label


def is_reproduction(weights: dict, data: dict) -> bool:
    """Return True only for trained weights on a real benchmark dataset, the numbers comparable to published ones."""
    return not weights.get("random_init") and data.get("kind") == "real benchmark dataset"
