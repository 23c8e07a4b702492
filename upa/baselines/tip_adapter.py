"""Tip-Adapter and Tip-Adapter-F (Zhang et al., ECCV 2022; github.com/gaopengcuhk/Tip-Adapter).

A cache of M images, keys [M, D] (their features) and values [M, C] (their one-hot labels),
is added to CLIP's zero-shot logits:

    logits = s·f·Tᵀ + α·exp(−β(1 − f·keysᵀ))·values

α is the residual ratio and β the sharpness, the naming of the Tip-Adapter repository's
``main.py`` and ``utils.py``. NOTE: the paper and an early release of the code are reported to
swap the two names (α sharpness, β residual); match a published value to its place in the
formula, not to its letter, before using it here.

Published recipe, from the repository's ``configs/*.yaml`` and ``main.py``:

- keys: the mean of 10 augmented passes over each cached image (RandomResizedCrop scale 0.5-1,
  bicubic, horizontal flip), then L2-normalised;
- α and β: searched on the labelled val split over 20 α values in [0.1, 3) and 200 β values
  in [0.1, 7) (ImageNet, OxfordPets; other datasets use wider ranges), starting from init_alpha
  1.17 and init_beta 1;
- Tip-Adapter-F: the keys become a trainable bias-free linear layer, trained with AdamW (lr 1e-3,
  eps 1e-4), cosine schedule, 20 epochs, batch 256, at the initial α and β, then α and β are
  searched again on val with the trained keys.

The repository multiplies by a fixed 100; here s is the loaded model's logit scale. The
repository also keeps the Tip-Adapter-F epoch with the best test accuracy; this module always
keeps the last epoch.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F

from upa.method import AdapterTraining, fit_on_cached_views, zero_shot_logits

log = logging.getLogger(__name__)

# configs/imagenet.yaml of the Tip-Adapter repository: init_alpha 1.17, init_beta 1,
# search_scale [7, 3] (β range, α range), search_step [200, 20].
INIT_ALPHA = 1.17
INIT_BETA = 1.0
SEARCH_SCALE = (7.0, 3.0)
SEARCH_STEPS = (200, 20)


def cache_affinity(features: torch.Tensor, cache_keys: torch.Tensor, beta: float) -> torch.Tensor:
    """Compute exp(−β(1 − f·keysᵀ)) between images and cache keys.

    features [N, D], cache_keys [M, D]; returns [N, M].
    """
    return torch.exp(-beta * (1.0 - features @ cache_keys.t()))


def tip_adapter_logits(
    features: torch.Tensor,
    text_weights: torch.Tensor,
    cache_keys: torch.Tensor,
    cache_values: torch.Tensor,
    logit_scale: float,
    alpha: float,
    beta: float,
) -> torch.Tensor:
    """Compute Tip-Adapter's logits s·f·Tᵀ + α·exp(−β(1 − f·keysᵀ))·values.

    features [N, D], text_weights [C, D], cache_keys [M, D], cache_values [M, C]; returns [N, C].
    α (residual ratio) scales the cache term and β (sharpness) sits inside the exponent; α = 0
    gives zero-shot CLIP back.
    """
    cache_logits = cache_affinity(features, cache_keys, beta) @ cache_values.to(features.dtype)
    return zero_shot_logits(features, text_weights, logit_scale) + alpha * cache_logits


def cache_values(labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """One-hot cache values [M, C] from labels [M]; a class without any cached image keeps its column."""
    if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= num_classes):
        raise ValueError(
            f"cache labels must lie in [0, {num_classes}), got range "
            f"[{int(labels.min())}, {int(labels.max())}]; pass num_classes of the full class space"
        )
    return F.one_hot(labels.long(), num_classes).float()


def cache_keys(views: torch.Tensor) -> torch.Tensor:
    """Average the augmented views of each cached image and L2-normalise: [M, V, D] -> [M, D].

    A [M, D] tensor counts as one view per image. The views arrive already normalised because
    the feature cache stores unit vectors. The Tip-Adapter repository averages the raw encoder
    outputs instead, so the two means differ slightly in direction.
    """
    if views.ndim == 2:
        views = views.unsqueeze(1)
    if views.ndim != 3:
        raise ValueError(f"views must have shape [M, V, D] or [M, D], got {tuple(views.shape)}")
    return F.normalize(views.float().mean(dim=1), dim=-1)


def sample_few_shot(train_labels: torch.Tensor, shots: int, generator: torch.Generator,
                    num_classes: int | None = None) -> torch.Tensor:
    """Draw ``shots`` images per class from the labelled train split, without replacement.

    train_labels [N] are the train split's labels and the only data this function reads, so a
    supervised baseline built on its output cannot read a test label. Returns indices into the
    train split, class by class ([C·shots] when every class has enough images). A class with
    fewer images keeps all of them and is logged; classes are 0..num_classes−1 (default: up to
    the largest label).
    """
    if shots < 1:
        raise ValueError(f"shots must be an integer >= 1 (labelled images per class), got {shots}")
    labels = train_labels.cpu().long()
    num_classes = int(labels.max()) + 1 if num_classes is None else num_classes
    chosen: list[torch.Tensor] = []
    short: list[int] = []
    for c in range(num_classes):
        members = torch.nonzero(labels == c).flatten()
        order = torch.randperm(len(members), generator=generator)
        chosen.append(members[order[:shots]])
        if len(members) < shots:
            short.append(c)
    if short:
        log.warning("%d classes have fewer than %d labelled train images and keep all they have: %s",
                    len(short), shots, short[:20])
    return torch.cat(chosen)


def search_grid(scale: float, steps: int) -> list[float]:
    """Return Tip-Adapter's search values: ``steps`` equally spaced values from 0.1 up to, not including, ``scale``."""
    return [0.1 + (scale - 0.1) * i / steps for i in range(steps)]


def default_grid() -> tuple[list[float], list[float]]:
    """Return the (alphas, betas) of Tip-Adapter's ImageNet search: 20 α in [0.1, 3), 200 β in [0.1, 7)."""
    return search_grid(SEARCH_SCALE[1], SEARCH_STEPS[1]), search_grid(SEARCH_SCALE[0], SEARCH_STEPS[0])


def grid_accuracies(
    features: torch.Tensor,
    labels: torch.Tensor,
    text_weights: torch.Tensor,
    cache_keys: torch.Tensor,
    cache_values: torch.Tensor,
    logit_scale: float,
    alphas: Sequence[float],
    betas: Sequence[float],
    class_subset: torch.Tensor | None = None,
) -> torch.Tensor:
    """Top-1 accuracy (percent) of every (β, α) pair: returns [len(betas), len(alphas)].

    features [N, D] and labels [N] are the split being scored; the affinity is computed once and
    each β costs one exponential and one product with the values.
    """
    zero_shot = zero_shot_logits(features, text_weights, logit_scale)
    similarity = features @ cache_keys.t()
    values = cache_values.to(features.dtype)
    labels = labels.to(features.device)
    subset = class_subset.to(features.device) if class_subset is not None else None
    table = torch.zeros(len(betas), len(alphas))
    for b, beta in enumerate(betas):
        cache_logits = torch.exp(-beta * (1.0 - similarity)) @ values
        for a, alpha in enumerate(alphas):
            logits = zero_shot + alpha * cache_logits
            if subset is not None:
                predictions = subset[logits[:, subset].argmax(dim=1)]
            else:
                predictions = logits.argmax(dim=1)
            table[b, a] = 100.0 * (predictions == labels).float().mean()
    return table


class CacheKeys(torch.nn.Module):
    """Tip-Adapter-F's trainable keys [M, D], a bias-free linear layer initialised with the cache keys."""

    def __init__(self, keys: torch.Tensor):
        super().__init__()
        self.weight = torch.nn.Parameter(keys.detach().clone().float())

    def forward(self, features, text_weights, values, logit_scale, alpha, beta):  # noqa: D102 - see tip_adapter_logits
        return tip_adapter_logits(features, text_weights, self.weight, values, logit_scale, alpha, beta)


def train_cache_keys(
    views: torch.Tensor,
    labels: torch.Tensor,
    text_weights: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    logit_scale: float,
    alpha: float = INIT_ALPHA,
    beta: float = INIT_BETA,
    training: AdapterTraining = AdapterTraining(),
    generator: torch.Generator | None = None,
    progress: bool = True,
) -> tuple[torch.Tensor, list[float]]:
    """Fine-tune the cache keys with cross-entropy (Tip-Adapter-F); T and the values stay frozen.

    views [M, V, D] are V cached augmented views of the M cached images ([M, D] counts as V = 1);
    each epoch visits every image once through one view drawn at random, standing in for the
    fresh augmentation the repository draws each epoch. labels [M] are the cache labels (true
    labels for the few-shot baseline, pseudo-labels for the unsupervised one); keys [M, D] and
    values [M, C]. The device is the views' device; the CPU generator fixes shuffling and views.

    Returns the trained keys [M, D] and the mean loss of each epoch. Raises FloatingPointError
    when the loss stops being finite.
    """
    if views.ndim == 2:
        views = views.unsqueeze(1)
    num_images, num_views, _ = views.shape
    if num_images == 0:
        raise ValueError("no cached image to train the keys on")
    device = views.device
    generator = generator if generator is not None else torch.Generator().manual_seed(0)

    adapter = CacheKeys(keys.to(device))
    text_weights = text_weights.to(device).float()
    values = values.to(device).float()
    labels = labels.to(device)
    optimizer = torch.optim.AdamW(
        adapter.parameters(), lr=training.lr, eps=training.eps, weight_decay=training.weight_decay
    )
    steps_per_epoch = math.ceil(num_images / training.batch_size)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, max(1, training.epochs * steps_per_epoch))

    def logits_fn(batch_features, batch):
        return adapter(batch_features, text_weights, values, logit_scale, alpha, beta)

    epoch_losses = fit_on_cached_views(
        views, labels, logits_fn, optimizer, training.epochs, training.batch_size, generator,
        scheduler=scheduler, progress=progress, name="Tip-Adapter-F",
        hint=f"lower the learning rate ({training.lr}) or beta ({beta})",
    )
    return adapter.weight.detach(), epoch_losses
