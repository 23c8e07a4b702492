"""A linear probe (multinomial logistic regression) fitted on pseudo-labelled image features.

The linear-probe example in the openai/CLIP README fits scikit-learn's LogisticRegression with
C = 0.316, max_iter 1000 and random_state 0, and notes that C should come from a sweep on a
validation split. An unsupervised study has no labelled validation split, so C stays fixed in
advance at that published value. The features here are L2-normalised (the README's are raw
encoder outputs), which makes the same C regularise more strongly.

With three or more classes scikit-learn's lbfgs solver minimises the multinomial loss (checked
with scikit-learn 1.9.1, whose LogisticRegression no longer takes ``multi_class``); with two it
fits the equivalent binary model.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import numpy as np
import torch
from sklearn.linear_model import LogisticRegression

log = logging.getLogger(__name__)

INVERSE_REGULARISATION = 0.316
MAX_ITERATIONS = 1000


def fit_linear_probe(
    train_features: torch.Tensor,
    train_labels: torch.Tensor,
    num_classes: int,
    seed: int = 0,
    inverse_regularisation: float = INVERSE_REGULARISATION,
) -> Callable[[torch.Tensor], torch.Tensor]:
    """Fit logistic regression on (features, labels) and return the fitted probe as a function.

    train_features [M, D] with labels [M] in [0, C) (pseudo-labels for the unsupervised
    baseline). The returned function maps features [N', D] to log-probabilities [N', C] on the
    CPU. A class without any training image gets a column of −inf, so it is never predicted but
    the column layout still matches the C classes. With a single class present every image is
    assigned to it.
    """
    if len(train_labels) == 0:
        raise ValueError("the linear probe needs at least one training image")
    labels = train_labels.cpu().long().numpy()
    present = np.unique(labels)
    if len(present) == 1:
        log.warning("the linear probe saw a single class (%d); it predicts that class everywhere", present[0])

        def predict_single(features: torch.Tensor) -> torch.Tensor:
            logits = torch.full((len(features), num_classes), float("-inf"))
            logits[:, int(present[0])] = 0.0
            return logits

        return predict_single

    probe = LogisticRegression(
        C=inverse_regularisation, solver="lbfgs", max_iter=MAX_ITERATIONS, random_state=seed
    )
    probe.fit(train_features.cpu().double().numpy(), labels)
    columns = torch.from_numpy(probe.classes_).long()

    def predict(features: torch.Tensor) -> torch.Tensor:
        logits = torch.full((len(features), num_classes), float("-inf"))
        log_probs = probe.predict_log_proba(features.cpu().double().numpy())
        logits[:, columns] = torch.from_numpy(log_probs).float()
        return logits

    return predict


def linear_probe_logits(
    train_features: torch.Tensor,
    train_labels: torch.Tensor,
    test_features: torch.Tensor,
    num_classes: int,
    seed: int = 0,
    inverse_regularisation: float = INVERSE_REGULARISATION,
) -> torch.Tensor:
    """Fit the probe (see :func:`fit_linear_probe`) and return test log-probabilities [N', C]."""
    probe = fit_linear_probe(train_features, train_labels, num_classes, seed, inverse_regularisation)
    return probe(test_features)
