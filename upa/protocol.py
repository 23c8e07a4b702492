"""How hyper-parameters are chosen, and on which split, for every method in the study.

Three rules, each recorded next to the numbers it produced:

- ``"pseudo-label hold-out"`` (unsupervised methods): the pseudo-labelled selection is split per
  class into a fit part (80 %) and a hold-out part (20 %) with a seeded generator. Each grid
  point is fitted on the fit part and scored against the hold-out images' pseudo-labels. The
  best point is refitted on the whole selection. No true label is read.
- ``"labelled val split"`` (supervised few-shot baselines): the grid is scored by top-1 accuracy
  on the labelled val split.
- ``"fixed in advance"``: the value comes from the method's published recipe or the study's
  defaults, before any data is seen.

``oracle_grid`` scores the same grid on test accuracy. Its result only ever fills a column
labelled "oracle", which shows how much test-set tuning would flatter a method; no reported
number is chosen with it.

Ties go to the default point when one is given (the value that would otherwise be fixed in
advance), so the data must show an advantage before a choice departs from it; other ties go to
the earliest grid point, and grids list their simplest point first (smallest values, fewest
epochs).

NOTE: the pseudo-labels of the selection are the zero-shot classifier's own arg-max, so the
zero-shot term scores 100 % on them by construction and a score of the full logits would always
prefer the smallest residual weight. The scorers in ``upa.baselines.runner`` therefore score the
adapter branch alone (prototype or cache term) and keep the residual weight fixed in advance.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from upa.method import Selection

log = logging.getLogger(__name__)

PSEUDO_HOLDOUT = "pseudo-label hold-out"
LABELLED_VAL = "labelled val split"
FIXED = "fixed in advance"
ORACLE = "oracle: chosen on test accuracy, not a valid result"

HOLDOUT_FRACTION = 0.2


@dataclass(frozen=True)
class GridChoice:
    """The chosen grid point, its score, the score of every point in grid order, and the rule used."""

    params: dict
    score: float
    scores: tuple[tuple[dict, float], ...]
    rule: str

    def as_dict(self, max_points: int = 50) -> dict:
        """JSON-ready record; grids larger than ``max_points`` keep only their size."""
        record = {"params": self.params, "score": _round(self.score), "rule": self.rule,
                  "grid_size": len(self.scores)}
        if len(self.scores) <= max_points:
            record["grid"] = [{"params": p, "score": _round(s)} for p, s in self.scores]
        return record


def _round(value: float) -> float | None:
    return None if value is None or math.isnan(value) else round(float(value), 4)


def subset_selection(selection: Selection, positions: torch.Tensor) -> Selection:
    """Keep the selected images at ``positions`` [M'] (positions within the selection, not pool indices)."""
    labels = selection.labels[positions]
    return Selection(
        indices=selection.indices[positions],
        labels=labels,
        confidences=selection.confidences[positions],
        counts=torch.bincount(labels, minlength=len(selection.counts)),
        filled=selection.filled[positions],
    )


def split_selection(
    selection: Selection,
    holdout_fraction: float = HOLDOUT_FRACTION,
    generator: torch.Generator | None = None,
) -> tuple[Selection, Selection]:
    """Split a selection per class into (fit, hold-out) parts, seeded by ``generator``.

    A class with n ≥ 2 images holds out max(1, floor(n · fraction)) of them but always keeps at
    least one for fitting. A class with fewer than 2 images stays in the fit part. Only the
    pseudo-labels decide the split.
    """
    if not 0.0 < holdout_fraction < 1.0:
        raise ValueError(f"holdout_fraction must lie strictly between 0 and 1, got {holdout_fraction}")
    generator = generator if generator is not None else torch.Generator().manual_seed(0)
    fit: list[torch.Tensor] = []
    held: list[torch.Tensor] = []
    for c in range(len(selection.counts)):
        members = torch.nonzero(selection.labels == c).flatten()
        members = members[torch.randperm(len(members), generator=generator)]
        count = 0 if len(members) < 2 else min(len(members) - 1, max(1, int(len(members) * holdout_fraction)))
        held.append(members[:count])
        fit.append(members[count:])
    fit_positions = torch.sort(torch.cat(fit)).values
    held_positions = torch.sort(torch.cat(held)).values
    return subset_selection(selection, fit_positions), subset_selection(selection, held_positions)


def choose_best(grid: Sequence[dict], scores: Sequence[float], rule: str, default: dict | None = None) -> GridChoice:
    """Pick the highest score; ties go to ``default`` if it is among them, else to the earliest point.

    NaN scores never win unless every score is NaN, in which case the earliest point is kept.
    """
    if len(grid) == 0 or len(grid) != len(scores):
        raise ValueError(f"grid ({len(grid)} points) and scores ({len(scores)}) must be non-empty and equal in length")
    best = 0
    for position, score in enumerate(scores):
        if not math.isnan(score) and (math.isnan(scores[best]) or score > scores[best]):
            best = position
    if default is not None and default in grid:
        position = list(grid).index(default)
        if scores[position] == scores[best]:
            best = position
    table = tuple((dict(point), float(score)) for point, score in zip(grid, scores))
    return GridChoice(params=dict(grid[best]), score=float(scores[best]), scores=table, rule=rule)


def select_on_pseudo_holdout(
    grid: Sequence[dict],
    score: Callable[[dict, Selection, Selection], float],
    selection: Selection,
    holdout_fraction: float = HOLDOUT_FRACTION,
    generator: torch.Generator | None = None,
    default: dict | None = None,
) -> GridChoice:
    """Choose a grid point without labels: fit on part of the selection, score on the rest.

    ``score(params, fit, holdout)`` fits the method on the ``fit`` selection and returns a
    number computed from the hold-out images and their pseudo-labels (higher is better). The
    caller then refits on the whole selection with the chosen params. ``default`` (added to the
    grid if missing) wins ties. If no class has two images there is nothing to hold out, and
    ``default`` (or the first grid point) is returned as fixed in advance.
    """
    grid = list(grid)
    if default is not None and default not in grid:
        grid.append(dict(default))
    fit, holdout = split_selection(selection, holdout_fraction, generator)
    if len(holdout.indices) == 0:
        fallback = default if default is not None else grid[0]
        log.warning("no class has two selected images, so nothing can be held out; keeping %s", fallback)
        return choose_best([fallback], [float("nan")], FIXED)
    scores = [float(score(point, fit, holdout)) for point in grid]
    choice = choose_best(grid, scores, PSEUDO_HOLDOUT, default)
    log.info("pseudo-label hold-out chose %s (score %.2f over %d hold-out images)",
             choice.params, choice.score, len(holdout.indices))
    return choice


def select_on_validation(grid: Sequence[dict], val_accuracy: Callable[[dict], float]) -> GridChoice:
    """Choose the grid point with the best top-1 accuracy on the labelled val split."""
    return choose_best(grid, [float(val_accuracy(point)) for point in grid], LABELLED_VAL)


def oracle_grid(grid: Sequence[dict], test_accuracy: Callable[[dict], float]) -> GridChoice:
    """Best test accuracy over the grid, for the column labelled "oracle" only; never a reported result."""
    return choose_best(grid, [float(test_accuracy(point)) for point in grid], ORACLE)


def branch_accuracy(branch_logits: torch.Tensor, pseudo_labels: torch.Tensor) -> float:
    """Agreement (percent) of the adapter branch's arg-max [N, C] with the pseudo-labels [N]."""
    if len(pseudo_labels) == 0:
        return float("nan")
    predictions = branch_logits.argmax(dim=1).cpu()
    return 100.0 * (predictions == pseudo_labels.cpu()).float().mean().item()
