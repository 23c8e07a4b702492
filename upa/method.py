"""UP-Adapter as pure tensor functions, plus the loop that fine-tunes the prototype layer.

Dimension letters used in every docstring: N images, C classes, D embedding width, M selected
images, K selected per class, V augmented views per image.

| symbol in the method | identifier here |
|---|---|
| f, an image feature (L2-normalised) | ``features`` [N, D] |
| T, the text classifier (one row per class) | ``text_weights`` [C, D] |
| s, CLIP's logit scale | ``logit_scale`` (from the loaded model) |
| s·f·Tᵀ | :func:`zero_shot_logits` |
| pseudo-labels and the K most confident per class | :func:`select_confident` |
| prototypes (normalised mean of selected features) | :func:`class_prototypes` |
| W, the prototype layer (C x D, bias-free) | ``prototypes`` / :class:`PrototypeAdapter` |
| exp(−η(1 − f·Wᵀ)), the affinity | :func:`prototype_affinity` |
| β (residual weight), η (sharpness) | ``beta``, ``eta`` |
| s·f·Tᵀ + β·exp(−η(1 − f·Wᵀ)) | :func:`up_adapter_logits` |

Nothing in this module reads a true label: callers pass pseudo-labels for training and compute
accuracy on the test split only after training.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

log = logging.getLogger(__name__)


def zero_shot_logits(features: torch.Tensor, text_weights: torch.Tensor, logit_scale: float) -> torch.Tensor:
    """Compute CLIP's zero-shot logits s·f·Tᵀ.

    features [N, D] and text_weights [C, D] are L2-normalised; returns [N, C].
    """
    return logit_scale * features @ text_weights.t()


def prototype_affinity(features: torch.Tensor, prototypes: torch.Tensor, eta: float) -> torch.Tensor:
    """Compute the affinity exp(−η(1 − f·Wᵀ)) between images and class prototypes.

    features [N, D], prototypes [C, D]; returns [N, C]. With normalised rows the value lies in
    [exp(−2η), 1] and equals 1 where an image coincides with its prototype.
    """
    return torch.exp(-eta * (1.0 - features @ prototypes.t()))


def up_adapter_logits(
    features: torch.Tensor,
    text_weights: torch.Tensor,
    prototypes: torch.Tensor,
    logit_scale: float,
    beta: float,
    eta: float,
) -> torch.Tensor:
    """Compute UP-Adapter's logits s·f·Tᵀ + β·exp(−η(1 − f·Wᵀ)).

    features [N, D], text_weights [C, D], prototypes (W) [C, D]; returns [N, C]. β = 0 gives
    zero-shot CLIP back.
    """
    zero_shot = zero_shot_logits(features, text_weights, logit_scale)
    return zero_shot + beta * prototype_affinity(features, prototypes, eta)


@dataclass(frozen=True)
class Selection:
    """The pseudo-labelled images kept for building prototypes.

    indices [M] index the unlabeled pool and labels [M] are their pseudo-labels. confidences [M]
    is the softmax probability of each pseudo-label, and counts [C] the images each class kept.
    filled [M] marks images added by ``fill_shortfall`` rather than by their arg-max.
    """

    indices: torch.Tensor
    labels: torch.Tensor
    confidences: torch.Tensor
    counts: torch.Tensor
    filled: torch.Tensor

    @property
    def short_classes(self) -> list[int]:
        """Classes that kept fewer images than the largest count."""
        return [c for c, n in enumerate(self.counts.tolist()) if n < int(self.counts.max())]


def _rank_desc(scores: torch.Tensor, candidates: torch.Tensor) -> torch.Tensor:
    """Order candidate indices by score, highest first, ties broken by smaller index."""
    # A stable sort on the negated score keeps the ascending index order of equal scores.
    order = torch.sort(-scores[candidates], stable=True).indices
    return candidates[order]


def select_confident(probs: torch.Tensor, k: int, fill_shortfall: bool = False) -> Selection:
    """Select the K most confident images of each class from pseudo-label probabilities.

    probs [N, C] are softmax probabilities of the unlabeled pool. Every image is a candidate for
    its arg-max class only, so no image is selected twice. Within a class the candidates are
    ranked by confidence, ties by image index, and the first K are kept.

    A class predicted for fewer than K images keeps what it has. With ``fill_shortfall`` such a
    class is topped up, in class order, from the images not yet selected, ranked by that class's
    own probability column. A class with no image at all keeps none unless filled; the caller
    then falls back to its text embedding (see :func:`class_prototypes`).
    """
    if k < 1:
        raise ValueError(f"k must be an integer >= 1 (images kept per class), got {k}")
    if probs.ndim != 2:
        raise ValueError(f"probs must have shape [N, C], got {tuple(probs.shape)}")
    num_images, num_classes = probs.shape
    confidences, predictions = probs.max(dim=1)

    kept: list[torch.Tensor] = []
    for c in range(num_classes):
        candidates = torch.nonzero(predictions == c).flatten()
        kept.append(_rank_desc(confidences, candidates)[:k])

    filled: list[torch.Tensor] = [torch.zeros(len(idx), dtype=torch.bool) for idx in kept]
    if fill_shortfall:
        taken = torch.zeros(num_images, dtype=torch.bool)
        for idx in kept:
            taken[idx] = True
        for c in range(num_classes):
            missing = k - len(kept[c])
            if missing <= 0:
                continue
            free = torch.nonzero(~taken).flatten()
            extra = _rank_desc(probs[:, c], free)[:missing]
            taken[extra] = True
            kept[c] = torch.cat([kept[c], extra])
            filled[c] = torch.cat([filled[c], torch.ones(len(extra), dtype=torch.bool)])

    indices = torch.cat(kept).long()
    labels = torch.cat([torch.full((len(idx),), c, dtype=torch.long) for c, idx in enumerate(kept)])
    return Selection(
        indices=indices,
        labels=labels,
        confidences=probs[indices, labels],
        counts=torch.tensor([len(idx) for idx in kept], dtype=torch.long),
        filled=torch.cat(filled),
    )


def class_prototypes(
    features: torch.Tensor,
    labels: torch.Tensor,
    num_classes: int,
    fallback: torch.Tensor | None = None,
) -> torch.Tensor:
    """Average the L2-normalised features of each class and re-normalise the mean.

    features [M, D] or [M, V, D] (V augmented views all count), labels [M] in [0, C);
    returns [C, D]. A class without any feature takes its row of ``fallback`` [C, D] (the text
    classifier) or, if no fallback is given, raises ValueError.
    """
    if features.ndim == 3:
        views = features.shape[1]
        labels = labels.repeat_interleave(views)
        features = features.reshape(-1, features.shape[-1])
    features = F.normalize(features.float(), dim=-1)
    sums = torch.zeros(num_classes, features.shape[1], dtype=features.dtype, device=features.device)
    sums.index_add_(0, labels.to(features.device), features)
    counts = torch.bincount(labels, minlength=num_classes).to(features.device)

    empty = counts == 0
    if empty.any():
        if fallback is None:
            missing = torch.nonzero(empty).flatten().tolist()
            raise ValueError(f"classes {missing} have no selected image and no fallback was given")
        sums[empty] = fallback.to(sums)[empty]
    return F.normalize(sums, dim=-1)


def accuracy(logits: torch.Tensor, labels: torch.Tensor, class_subset: torch.Tensor | None = None) -> float:
    """Return top-1 accuracy in percent.

    logits [N, C], labels [N] in the same class space. With class_subset [C'] (ImageNet-A and -R
    cover 200 of ImageNet's 1000 classes) only those columns compete and the arg-max is mapped
    back to the full class index before comparing.
    """
    if class_subset is not None:
        subset = class_subset.to(logits.device)
        predictions = subset[logits[:, subset].argmax(dim=1)]
    else:
        predictions = logits.argmax(dim=1)
    return 100.0 * (predictions.cpu() == labels.cpu()).float().mean().item()


@dataclass(frozen=True)
class AdapterTraining:
    """Fine-tuning settings of the prototype layer.

    UP-Adapter's own recipe is not public. The optimiser, learning rate, eps, schedule, epoch
    count and batch size therefore follow Tip-Adapter-F (AdamW, lr 1e-3, eps 1e-4, cosine, 20
    epochs, batch 256), the closest peer that trains a cache of this form.
    """

    epochs: int = 20
    lr: float = 1e-3
    eps: float = 1e-4
    weight_decay: float = 0.01
    batch_size: int = 256


def fit_on_cached_views(
    features: torch.Tensor,
    labels: torch.Tensor,
    logits_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    optimizer: torch.optim.Optimizer,
    epochs: int,
    batch_size: int,
    generator: torch.Generator,
    scheduler: torch.optim.lr_scheduler.LRScheduler | None = None,
    on_epoch_start: Callable[[int], None] | None = None,
    progress: bool = True,
    name: str = "training",
    hint: str = "lower the learning rate",
) -> list[float]:
    """Minimise cross-entropy over cached augmented views, one random view per image per epoch.

    features [M, V, D] on the training device, labels [M]. Every epoch shuffles the M images and
    draws one of the V views for each with ``generator`` (a CPU generator), so a run is fixed by
    its seed. ``logits_fn(batch_features [B, D], batch [B]) -> [B, C]`` computes the logits of the
    normalised batch. ``scheduler`` steps after every batch and ``on_epoch_start(epoch)`` runs
    before each epoch. Returns the mean loss of each epoch and raises FloatingPointError with
    ``hint`` when the loss stops being finite.
    """
    num_images, num_views, _ = features.shape
    device = features.device
    epoch_losses: list[float] = []
    for epoch in tqdm(range(epochs), desc=name, unit="epoch", disable=not progress):
        if on_epoch_start is not None:
            on_epoch_start(epoch)
        order = torch.randperm(num_images, generator=generator)
        views = torch.randint(num_views, (num_images,), generator=generator)
        total = 0.0
        for start in range(0, num_images, batch_size):
            batch = order[start : start + batch_size].to(device)
            batch_views = views[start : start + batch_size].to(device)
            batch_features = F.normalize(features[batch, batch_views].float(), dim=-1)
            loss = F.cross_entropy(logits_fn(batch_features, batch), labels[batch])
            if not torch.isfinite(loss):
                raise FloatingPointError(f"non-finite {name} loss ({loss.item()}) at epoch {epoch + 1}; {hint}")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            if scheduler is not None:
                scheduler.step()
            total += loss.item() * len(batch)
        epoch_losses.append(total / num_images)
        log.debug("%s epoch %d: loss %.4f", name, epoch + 1, epoch_losses[-1])
    return epoch_losses


class PrototypeAdapter(torch.nn.Module):
    """The trainable prototype layer W [C, D], a bias-free linear layer initialised with prototypes."""

    def __init__(self, prototypes: torch.Tensor):
        super().__init__()
        self.weight = torch.nn.Parameter(prototypes.detach().clone().float())

    def forward(self, features, text_weights, logit_scale, beta, eta):  # noqa: D102 - see up_adapter_logits
        return up_adapter_logits(features, text_weights, self.weight, logit_scale, beta, eta)


def train_prototype_adapter(
    features: torch.Tensor,
    pseudo_labels: torch.Tensor,
    text_weights: torch.Tensor,
    prototypes: torch.Tensor,
    logit_scale: float,
    beta: float,
    eta: float,
    training: AdapterTraining = AdapterTraining(),
    generator: torch.Generator | None = None,
    progress: bool = True,
) -> tuple[torch.Tensor, list[float]]:
    """Fine-tune the prototype layer with cross-entropy on pseudo-labels; T stays frozen.

    features [M, V, D] hold V cached augmented views of the M selected images (a [M, D] tensor
    counts as V = 1); every epoch visits each image once through one view drawn at random.
    pseudo_labels [M]; text_weights and prototypes [C, D]. The device is the features' device
    and the generator (a CPU ``torch.Generator``) fixes shuffling and view choice.

    Returns the trained W [C, D] and the mean loss of each epoch. Raises FloatingPointError when
    the loss stops being finite.
    """
    if features.ndim == 2:
        features = features.unsqueeze(1)
    num_images, num_views, _ = features.shape
    if num_images == 0:
        raise ValueError("no selected image to train the prototype layer on")
    device = features.device
    generator = generator if generator is not None else torch.Generator().manual_seed(0)

    adapter = PrototypeAdapter(prototypes.to(device))
    text_weights = text_weights.to(device).float()
    labels = pseudo_labels.to(device)
    optimizer = torch.optim.AdamW(
        adapter.parameters(), lr=training.lr, eps=training.eps, weight_decay=training.weight_decay
    )
    steps_per_epoch = math.ceil(num_images / training.batch_size)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, max(1, training.epochs * steps_per_epoch))

    def logits_fn(batch_features, batch):
        return adapter(batch_features, text_weights, logit_scale, beta, eta)

    epoch_losses = fit_on_cached_views(
        features, labels, logits_fn, optimizer, training.epochs, training.batch_size, generator,
        scheduler=scheduler, progress=progress, name="prototype layer",
        hint=f"lower the learning rate ({training.lr}) or eta ({eta})",
    )
    return adapter.weight.detach(), epoch_losses
