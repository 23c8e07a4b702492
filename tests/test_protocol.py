"""The label-free selection rule, the validation rule and the oracle column."""

import math

import pytest
import torch

from upa import protocol
from upa.method import Selection, select_confident, zero_shot_logits
from upa.simulation import SimulationConfig, simulate_clip_features


def _selection(counts):
    labels = torch.cat([torch.full((n,), c, dtype=torch.long) for c, n in enumerate(counts)])
    return Selection(
        indices=torch.arange(100, 100 + len(labels)),
        labels=labels,
        confidences=torch.linspace(0.9, 0.5, len(labels)),
        counts=torch.tensor(counts),
        filled=torch.zeros(len(labels), dtype=torch.bool),
    )


def test_split_selection_counts_per_class():
    fit, holdout = protocol.split_selection(_selection([10, 1, 2, 0, 16]), 0.2, torch.Generator().manual_seed(0))
    # 10 -> 2 held out, 1 -> 0, 2 -> 1, 0 -> 0, 16 -> 3 (floor of 3.2).
    assert holdout.counts.tolist() == [2, 0, 1, 0, 3]
    assert fit.counts.tolist() == [8, 1, 1, 0, 13]


def test_split_selection_partitions_selection():
    selection = _selection([10, 6, 8])
    fit, holdout = protocol.split_selection(selection, 0.25, torch.Generator().manual_seed(1))
    assert set(fit.indices.tolist()).isdisjoint(holdout.indices.tolist())
    assert sorted(fit.indices.tolist() + holdout.indices.tolist()) == selection.indices.tolist()
    for part in (fit, holdout):
        positions = part.indices - 100
        assert torch.equal(part.labels, selection.labels[positions])
        assert torch.equal(part.confidences, selection.confidences[positions])


def test_split_selection_seeded():
    selection = _selection([10, 10, 10])
    first = protocol.split_selection(selection, 0.2, torch.Generator().manual_seed(4))[1].indices
    again = protocol.split_selection(selection, 0.2, torch.Generator().manual_seed(4))[1].indices
    other = protocol.split_selection(selection, 0.2, torch.Generator().manual_seed(5))[1].indices
    assert torch.equal(first, again)
    assert not torch.equal(first, other)


@pytest.mark.parametrize("fraction", [0.0, 1.0, -0.1])
def test_split_selection_rejects_fraction(fraction):
    with pytest.raises(ValueError, match="holdout_fraction"):
        protocol.split_selection(_selection([4]), fraction)


def test_choose_best_ties_go_to_earliest():
    grid = [{"x": 1}, {"x": 2}, {"x": 3}]
    choice = protocol.choose_best(grid, [50.0, 80.0, 80.0], "rule")
    assert choice.params == {"x": 2}
    assert choice.score == 80.0


def test_choose_best_ties_go_to_default():
    grid = [{"x": 1}, {"x": 2}, {"x": 3}]
    assert protocol.choose_best(grid, [80.0, 50.0, 80.0], "rule", default={"x": 3}).params == {"x": 3}
    # The default does not win when another point scores strictly higher.
    assert protocol.choose_best(grid, [80.0, 50.0, 70.0], "rule", default={"x": 3}).params == {"x": 1}


def test_choose_best_nan_never_wins():
    choice = protocol.choose_best([{"x": 1}, {"x": 2}], [math.nan, 10.0], "rule")
    assert choice.params == {"x": 2}


def test_select_on_pseudo_holdout_passes_disjoint_parts():
    seen = []

    def score(params, fit, holdout):
        seen.append((set(fit.indices.tolist()), set(holdout.indices.tolist())))
        return -abs(params["x"] - 2)

    grid = [{"x": 1}, {"x": 2}, {"x": 3}]
    choice = protocol.select_on_pseudo_holdout(grid, score, _selection([5, 5]), generator=torch.Generator().manual_seed(0))
    assert choice.params == {"x": 2}
    assert choice.rule == protocol.PSEUDO_HOLDOUT
    assert len(seen) == 3
    fit, holdout = seen[0]
    assert fit.isdisjoint(holdout)
    assert len(holdout) == 2


def test_select_on_pseudo_holdout_adds_missing_default():
    choice = protocol.select_on_pseudo_holdout([{"x": 1}, {"x": 2}], lambda p, f, h: 1.0, _selection([5, 5]),
                                               default={"x": 7})
    assert choice.params == {"x": 7}
    assert [point for point, _ in choice.scores] == [{"x": 1}, {"x": 2}, {"x": 7}]


def test_select_on_pseudo_holdout_nothing_to_hold_out():
    choice = protocol.select_on_pseudo_holdout([{"x": 1}, {"x": 2}], lambda p, f, h: 1.0, _selection([1, 1]),
                                               default={"x": 2})
    assert choice.params == {"x": 2}
    assert choice.rule == protocol.FIXED


def test_select_on_validation_and_oracle_rules():
    grid = [{"x": 1}, {"x": 2}]
    assert protocol.select_on_validation(grid, lambda p: p["x"]).rule == protocol.LABELLED_VAL
    oracle = protocol.oracle_grid(grid, lambda p: 10.0 * p["x"])
    assert oracle.params == {"x": 2}
    assert oracle.rule.startswith("oracle")


def test_grid_choice_record_limits_grid():
    choice = protocol.choose_best([{"x": i} for i in range(60)], [float(i) for i in range(60)], "rule")
    record = choice.as_dict(max_points=50)
    assert record["grid_size"] == 60
    assert "grid" not in record
    assert len(choice.as_dict(max_points=100)["grid"]) == 60


def test_branch_accuracy_golden():
    logits = torch.tensor([[0.1, 0.9], [0.8, 0.2], [0.3, 0.7]])
    assert protocol.branch_accuracy(logits, torch.tensor([1, 1, 1])) == pytest.approx(200.0 / 3.0)
    assert math.isnan(protocol.branch_accuracy(logits[:0], torch.tensor([], dtype=torch.long)))


def test_zero_shot_agrees_with_holdout_pseudo_labels():
    # The reason the hold-out scorers leave out the zero-shot term: the pseudo-labels are its own
    # arg-max, so it scores 100 % on any hold-out and would always win.
    sim = simulate_clip_features(SimulationConfig(num_classes=6, train_per_class=30, test_per_class=1))
    logits = zero_shot_logits(sim.train_features, sim.text_weights, 100.0)
    _, holdout = protocol.split_selection(select_confident(logits.softmax(dim=1), k=10))
    assert len(holdout.indices) > 0
    assert protocol.branch_accuracy(logits[holdout.indices], holdout.labels) == 100.0

