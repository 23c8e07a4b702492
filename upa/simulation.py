"""Simulated CLIP-like features for studying the method without a model or images.

Every number computed from these features is a simulation and is labelled as such by the callers.
The generative model: C unit class directions μ_c in D dimensions; an image feature of class c is
normalize(μ_c + g_image + σ_image·ε) and the text embedding of class c is
normalize(μ_c + g_text + σ_text·ξ_c), with ε, ξ standard normal and g_image, g_text fixed random
offsets of norm ``modality_gap`` that mimic CLIP's gap between image and text embeddings.
Small σ_image means tight image clusters; large σ_text means poor text alignment.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class SimulationConfig:
    """Parameters of the generative model above.

    Noise levels are expected noise norms (per-dimension standard deviation times sqrt(D)), so
    they compare across widths. The defaults give image-text cosines near 0.2 and image-prototype
    cosines near 0.8 (measured on seed 0), so images sit far closer to each other than to their
    text, and a logit scale of 100 as in OpenAI's CLIP weights.
    """

    num_classes: int = 10
    train_per_class: int = 100
    test_per_class: int = 100
    dim: int = 128
    image_noise: float = 0.5
    text_noise: float = 2.0
    modality_gap: float = 2.0
    logit_scale: float = 100.0
    seed: int = 0

    def as_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class SimulatedFeatures:
    """train_features [N, D], train_labels [N], test_features [N', D], test_labels [N'],
    text_weights [C, D]; all rows L2-normalised."""

    train_features: torch.Tensor
    train_labels: torch.Tensor
    test_features: torch.Tensor
    test_labels: torch.Tensor
    text_weights: torch.Tensor
    config: SimulationConfig


def _random_unit(rows: int, dim: int, generator: torch.Generator) -> torch.Tensor:
    return F.normalize(torch.randn(rows, dim, generator=generator), dim=-1)


def simulate_clip_features(config: SimulationConfig = SimulationConfig()) -> SimulatedFeatures:
    """Draw train and test features and a text classifier from the generative model."""
    generator = torch.Generator().manual_seed(config.seed)
    dim = config.dim
    class_means = _random_unit(config.num_classes, dim, generator)
    image_gap = config.modality_gap * _random_unit(1, dim, generator)
    text_gap = config.modality_gap * _random_unit(1, dim, generator)

    def draw_images(per_class: int) -> tuple[torch.Tensor, torch.Tensor]:
        labels = torch.arange(config.num_classes).repeat_interleave(per_class)
        noise = torch.randn(len(labels), dim, generator=generator) * config.image_noise / dim**0.5
        return F.normalize(class_means[labels] + image_gap + noise, dim=-1), labels

    train_features, train_labels = draw_images(config.train_per_class)
    test_features, test_labels = draw_images(config.test_per_class)
    text_noise = torch.randn(config.num_classes, dim, generator=generator) * config.text_noise / dim**0.5
    text_weights = F.normalize(class_means + text_gap + text_noise, dim=-1)
    return SimulatedFeatures(train_features, train_labels, test_features, test_labels, text_weights, config)
