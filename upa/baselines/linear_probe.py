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

import numpy as np
import torch
from sklearn.linear_model import LogisticRegression

log = logging.getLogger(__name__)

INVERSE_REGULARISATION = 0.316
MAX_ITERATIONS = 1000


def linear_probe_logits(
    train_features: torch.Tensor,
    train_labels: torch.Tensor,
    test_features: torch.Tensor,
    num_classes: int,
    seed: int = 0,
    inverse_regularisation: float = INVERSE_REGULARISATION,
) -> torch.Tensor:
    """Fit logistic regression on (features, labels) and return test log-probabilities [N', C].

    train_features [M, D] with labels [M] in [0, C) (pseudo-labels for the unsupervised
    baseline); test_features [N', D]. A class without any training image gets a column of −inf,
    so it is never predicted but the column layout still matches the C classes. With a single
    class present every test image is assigned to it.
    """
    if len(train_labels) == 0:
        raise ValueError("the linear probe needs at least one training image")
    labels = train_labels.cpu().long().numpy()
    present = np.unique(labels)
    logits = torch.full((len(test_features), num_classes), float("-inf"))
    if len(present) == 1:
        log.warning("the linear probe saw a single class (%d); it predicts that class everywhere", present[0])
        logits[:, int(present[0])] = 0.0
        return logits

    probe = LogisticRegression(
        C=inverse_regularisation, solver="lbfgs", max_iter=MAX_ITERATIONS, random_state=seed
    )
    probe.fit(train_features.cpu().double().numpy(), labels)
    log_probs = probe.predict_log_proba(test_features.cpu().double().numpy())
    logits[:, torch.from_numpy(probe.classes_).long()] = torch.from_numpy(log_probs).float()
    return logits
