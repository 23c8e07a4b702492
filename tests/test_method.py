"""The UP-Adapter equations against naive per-sample code and hand-computed golden values."""

import math

import pytest
import torch
import torch.nn.functional as F

from upa.method import (
    AdapterTraining,
    accuracy,
    class_prototypes,
    prototype_affinity,
    select_confident,
    train_prototype_adapter,
    up_adapter_logits,
    zero_shot_logits,
)
from upa.simulation import SimulationConfig, simulate_clip_features


def _unit(rows, dim, seed):
    return F.normalize(torch.randn(rows, dim, generator=torch.Generator().manual_seed(seed)), dim=-1)


def _naive_logits(features, text, protos, scale, beta, eta):
    out = torch.zeros(len(features), len(text))
    for n, f in enumerate(features):
        for c in range(len(text)):
            cos_text = sum(float(a) * float(b) for a, b in zip(f, text[c]))
            cos_proto = sum(float(a) * float(b) for a, b in zip(f, protos[c]))
            out[n, c] = scale * cos_text + beta * math.exp(-eta * (1.0 - cos_proto))
    return out


def test_up_adapter_logits_match_naive_loop():
    features, text, protos = _unit(7, 5, 0), _unit(4, 5, 1), _unit(4, 5, 2)
    fast = up_adapter_logits(features, text, protos, logit_scale=50.0, beta=2.0, eta=3.5)
    naive = _naive_logits(features, text, protos, 50.0, 2.0, 3.5)
    assert fast.shape == (7, 4)
    torch.testing.assert_close(fast, naive, rtol=1e-5, atol=1e-5)


def test_up_adapter_logits_golden_three_classes():
    # One image f = (1, 0); classes along (1, 0), (0, 1), (-1, 0) for both T and W.
    features = torch.tensor([[1.0, 0.0]])
    text = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]])
    protos = torch.tensor([[0.6, 0.8], [1.0, 0.0], [0.0, -1.0]])
    # cos(f, T) = (1, 0, -1); cos(f, W) = (0.6, 1, 0); s = 10, beta = 2, eta = 0.5:
    # 10 + 2·exp(-0.2), 0 + 2·exp(0), -10 + 2·exp(-0.5)
    expected = torch.tensor([[10 + 2 * math.exp(-0.2), 2.0, -10 + 2 * math.exp(-0.5)]])
    got = up_adapter_logits(features, text, protos, logit_scale=10.0, beta=2.0, eta=0.5)
    torch.testing.assert_close(got, expected)


def test_up_adapter_logits_beta_zero_is_zero_shot():
    features, text, protos = _unit(6, 8, 3), _unit(3, 8, 4), _unit(3, 8, 5)
    torch.testing.assert_close(
        up_adapter_logits(features, text, protos, 100.0, beta=0.0, eta=5.0),
        zero_shot_logits(features, text, 100.0),
    )


def test_prototype_affinity_range_and_identity():
    protos = _unit(3, 4, 6)
    affinity = prototype_affinity(protos, protos, eta=2.0)
    torch.testing.assert_close(affinity.diagonal(), torch.ones(3))
    assert affinity.min() >= math.exp(-4.0) - 1e-6


def test_class_prototypes_golden_mean():
    features = torch.tensor([[2.0, 0.0], [0.0, 3.0], [0.0, 1.0]])
    labels = torch.tensor([0, 0, 1])
    protos = class_prototypes(features, labels, num_classes=2)
    # Class 0: mean of (1, 0) and (0, 1) normalised -> (1/sqrt2, 1/sqrt2); class 1: (0, 1).
    torch.testing.assert_close(protos, torch.tensor([[2**-0.5, 2**-0.5], [0.0, 1.0]]))


def test_class_prototypes_views_match_flattened():
    features = torch.randn(5, 3, 4, generator=torch.Generator().manual_seed(7))
    labels = torch.tensor([0, 1, 1, 0, 1])
    with_views = class_prototypes(features, labels, 2)
    flattened = class_prototypes(features.reshape(15, 4), labels.repeat_interleave(3), 2)
    torch.testing.assert_close(with_views, flattened)


def test_class_prototypes_empty_class_uses_fallback():
    features = _unit(4, 3, 8)
    fallback = _unit(3, 3, 9)
    protos = class_prototypes(features, torch.tensor([0, 0, 2, 2]), 3, fallback=fallback)
    torch.testing.assert_close(protos[1], fallback[1])


def test_class_prototypes_empty_class_without_fallback_raises():
    with pytest.raises(ValueError, match=r"classes \[1\]"):
        class_prototypes(_unit(2, 3, 0), torch.tensor([0, 0]), 2)


def _naive_select(probs, k):
    confidences, predictions = probs.max(dim=1)
    chosen = {}
    for c in range(probs.shape[1]):
        members = [n for n in range(len(probs)) if predictions[n] == c]
        members.sort(key=lambda n: (-float(confidences[n]), n))
        chosen[c] = members[:k]
    return chosen


def test_select_confident_matches_naive_selection():
    probs = torch.softmax(torch.randn(200, 6, generator=torch.Generator().manual_seed(10)) * 3, dim=1)
    selection = select_confident(probs, k=5)
    naive = _naive_select(probs, 5)
    for c in range(6):
        assert selection.indices[selection.labels == c].tolist() == naive[c]
    assert selection.counts.tolist() == [len(naive[c]) for c in range(6)]


def test_select_confident_short_class_keeps_what_it_has():
    # Class 0 is the arg-max of 3 images, class 1 of 20; K = 16.
    probs = torch.tensor([[0.9, 0.1]] * 3 + [[0.2, 0.8]] * 20)
    selection = select_confident(probs, k=16)
    assert selection.counts.tolist() == [3, 16]
    assert selection.short_classes == [0]
    assert not selection.filled.any()


def test_select_confident_fill_shortfall_without_free_images():
    probs = torch.tensor([[0.9, 0.1]] * 3 + [[0.45, 0.55], [0.3, 0.7], [0.2, 0.8], [0.1, 0.9]])
    selection = select_confident(probs, k=4, fill_shortfall=True)
    # Class 1 keeps all four of its arg-max images, so no free image is left to top up class 0.
    assert selection.indices[selection.labels == 1].tolist() == [6, 5, 4, 3]
    assert selection.indices[selection.labels == 0].tolist() == [0, 1, 2]
    assert selection.counts.tolist() == [3, 4]


def test_select_confident_fill_shortfall_uses_own_column():
    probs = torch.tensor([[0.9, 0.1], [0.4, 0.6], [0.3, 0.7], [0.2, 0.8]])
    selection = select_confident(probs, k=2, fill_shortfall=True)
    # Class 1 keeps images 3 and 2, its most confident. Class 0 has one arg-max image, so it is
    # topped up with image 1, the free image with the highest class-0 probability (0.4).
    assert selection.indices[selection.labels == 1].tolist() == [3, 2]
    assert selection.indices[selection.labels == 0].tolist() == [0, 1]
    assert selection.filled[selection.labels == 0].tolist() == [False, True]


def test_select_confident_class_never_predicted():
    probs = torch.tensor([[0.7, 0.2, 0.1]] * 4)
    selection = select_confident(probs, k=2)
    assert selection.counts.tolist() == [2, 0, 0]


def test_select_confident_ties_broken_by_index():
    probs = torch.tensor([[0.6, 0.4]] * 5)
    selection = select_confident(probs, k=3)
    assert selection.indices.tolist() == [0, 1, 2]


def test_select_confident_no_image_twice():
    probs = torch.softmax(torch.randn(50, 4, generator=torch.Generator().manual_seed(11)), dim=1)
    selection = select_confident(probs, k=30, fill_shortfall=True)
    assert len(set(selection.indices.tolist())) == len(selection.indices)


@pytest.mark.parametrize("k", [0, -3])
def test_select_confident_rejects_k_below_one(k):
    with pytest.raises(ValueError, match="k must be an integer >= 1"):
        select_confident(torch.full((4, 2), 0.5), k=k)


def test_accuracy_class_subset_maps_back():
    logits = torch.tensor([[5.0, 1.0, 3.0, 0.0], [9.0, 0.0, 1.0, 2.0]])
    labels = torch.tensor([2, 3])
    # Over all 4 classes both predictions are class 0; over the subset {2, 3} they are 2 and 3.
    assert accuracy(logits, labels) == 0.0
    assert accuracy(logits, labels, class_subset=torch.tensor([2, 3])) == 100.0


def test_train_prototype_adapter_is_seeded():
    sim = simulate_clip_features(SimulationConfig(train_per_class=20, test_per_class=5))
    protos = class_prototypes(sim.train_features, sim.train_labels, 10)
    runs = [
        train_prototype_adapter(
            sim.train_features, sim.train_labels, sim.text_weights, protos, 100.0, 3.0, 5.5,
            AdapterTraining(epochs=3, batch_size=32), torch.Generator().manual_seed(1), progress=False,
        )
        for _ in range(2)
    ]
    torch.testing.assert_close(runs[0][0], runs[1][0], rtol=0, atol=0)
    assert not torch.equal(runs[0][0], protos)


def test_train_prototype_adapter_leaves_text_frozen():
    sim = simulate_clip_features(SimulationConfig(train_per_class=10, test_per_class=5))
    text = sim.text_weights.clone()
    protos = class_prototypes(sim.train_features, sim.train_labels, 10)
    train_prototype_adapter(sim.train_features, sim.train_labels, sim.text_weights, protos, 100.0, 1.0, 1.0,
                            AdapterTraining(epochs=1), progress=False)
    assert torch.equal(sim.text_weights, text)


def test_train_prototype_adapter_non_finite_loss_raises():
    sim = simulate_clip_features(SimulationConfig(train_per_class=5, test_per_class=5))
    protos = class_prototypes(sim.train_features, sim.train_labels, 10)
    with pytest.raises(FloatingPointError, match="non-finite prototype layer loss"):
        train_prototype_adapter(sim.train_features, sim.train_labels, sim.text_weights, protos,
                                100.0, float("inf"), 1.0, AdapterTraining(epochs=1), progress=False)


def _up_adapter_gain(config: SimulationConfig, k: int = 16) -> tuple[float, float]:
    sim = simulate_clip_features(config)
    scale, beta, eta = config.logit_scale, 3.0, 5.5
    probs = zero_shot_logits(sim.train_features, sim.text_weights, scale).softmax(dim=1)
    selection = select_confident(probs, k)
    protos = class_prototypes(sim.train_features[selection.indices], selection.labels, config.num_classes,
                              fallback=sim.text_weights)
    weights, _ = train_prototype_adapter(sim.train_features[selection.indices], selection.labels,
                                         sim.text_weights, protos, scale, beta, eta, progress=False)
    zero_shot = accuracy(zero_shot_logits(sim.test_features, sim.text_weights, scale), sim.test_labels)
    adapted = accuracy(up_adapter_logits(sim.test_features, sim.text_weights, weights, scale, beta, eta),
                       sim.test_labels)
    return zero_shot, adapted


def test_up_adapter_gain_tight_clusters():
    # Image clusters (noise 0.5) far tighter than the text alignment (noise 2.0).
    zero_shot, adapted = _up_adapter_gain(SimulationConfig(image_noise=0.5, text_noise=2.0))
    assert adapted > zero_shot + 5.0


def test_up_adapter_gain_loose_clusters():
    # Loose clusters (noise 3.0) around well-aligned text (noise 0.5): prototypes add little, and
    # the study documents that the gain stays within a few points rather than turning negative.
    zero_shot, adapted = _up_adapter_gain(SimulationConfig(image_noise=3.0, text_noise=0.5))
    assert abs(adapted - zero_shot) < 3.0
