"""Tip-Adapter, the linear probe and the baseline runner on simulated features (no model weights)."""

import inspect
import math
from dataclasses import replace
from types import SimpleNamespace

import open_clip
import pytest
import torch
import torch.nn.functional as F

from upa.baselines import tip_adapter as tip
from upa.baselines.linear_probe import linear_probe_logits
from upa.baselines.prompt_learner import PromptTraining
from upa.baselines.runner import (
    METHODS,
    SUPERVISED,
    UNSUPERVISED,
    BaselineInputs,
    BaselineSettings,
    evaluate_baselines,
)
from upa.method import AdapterTraining, accuracy, select_confident, zero_shot_logits
from upa.simulation import SimulationConfig, simulate_clip_features

# ---- Tip-Adapter logits --------------------------------------------------------------------

# One image f = (1, 0); text rows (1, 0) and (0, 1); cache keys (1, 0), (0.6, 0.8), (0, 1) with
# labels 0, 1, 1. cos(f, T) = (1, 0) and cos(f, keys) = (1, 0.6, 0).
TOY_FEATURES = torch.tensor([[1.0, 0.0]])
TOY_TEXT = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
TOY_KEYS = torch.tensor([[1.0, 0.0], [0.6, 0.8], [0.0, 1.0]])
TOY_VALUES = tip.cache_values(torch.tensor([0, 1, 1]), 2)


def _toy_logits(alpha, beta, scale=10.0):
    return tip.tip_adapter_logits(TOY_FEATURES, TOY_TEXT, TOY_KEYS, TOY_VALUES, scale, alpha, beta)


def test_tip_adapter_logits_golden_toy():
    # affinity exp(-0.5·(1 - cos)) = (1, e^-0.2, e^-0.5); class 0 sums key 0, class 1 keys 1 and 2.
    expected = torch.tensor([[10.0 + 2.0 * 1.0, 0.0 + 2.0 * (math.exp(-0.2) + math.exp(-0.5))]])
    torch.testing.assert_close(_toy_logits(alpha=2.0, beta=0.5), expected)


def test_tip_adapter_alpha_scales_cache_term():
    zero_shot = zero_shot_logits(TOY_FEATURES, TOY_TEXT, 10.0)
    single = _toy_logits(alpha=1.0, beta=0.5) - zero_shot
    triple = _toy_logits(alpha=3.0, beta=0.5) - zero_shot
    torch.testing.assert_close(triple, 3.0 * single)
    torch.testing.assert_close(_toy_logits(alpha=0.0, beta=0.5), zero_shot)


def test_tip_adapter_beta_sits_in_exponent():
    zero_shot = zero_shot_logits(TOY_FEATURES, TOY_TEXT, 10.0)
    # beta = 0 makes every affinity 1, so the cache term counts the keys of each class: (1, 2).
    torch.testing.assert_close(_toy_logits(alpha=1.0, beta=0.0) - zero_shot, torch.tensor([[1.0, 2.0]]))
    # beta = 2: (exp(0), exp(-0.8) + exp(-2)); the key equal to f keeps affinity 1 at any beta.
    expected = torch.tensor([[1.0, math.exp(-0.8) + math.exp(-2.0)]])
    torch.testing.assert_close(_toy_logits(alpha=1.0, beta=2.0) - zero_shot, expected)


def test_tip_adapter_logits_match_naive_loop():
    gen = torch.Generator().manual_seed(0)
    features = F.normalize(torch.randn(6, 5, generator=gen), dim=-1)
    text = F.normalize(torch.randn(3, 5, generator=gen), dim=-1)
    keys = F.normalize(torch.randn(7, 5, generator=gen), dim=-1)
    labels = torch.tensor([0, 1, 2, 2, 1, 0, 0])
    fast = tip.tip_adapter_logits(features, text, keys, tip.cache_values(labels, 3), 50.0, 1.5, 4.0)
    naive = torch.zeros(6, 3)
    for n in range(6):
        for c in range(3):
            naive[n, c] = 50.0 * float(features[n] @ text[c])
            for m in range(7):
                if labels[m] == c:
                    naive[n, c] += 1.5 * math.exp(-4.0 * (1.0 - float(features[n] @ keys[m])))
    torch.testing.assert_close(fast, naive, rtol=1e-5, atol=1e-5)


def test_cache_values_keep_empty_class_columns():
    values = tip.cache_values(torch.tensor([0, 2, 2]), num_classes=4)
    assert values.shape == (3, 4)
    torch.testing.assert_close(values.sum(dim=0), torch.tensor([1.0, 0.0, 2.0, 0.0]))


def test_cache_values_reject_out_of_range_label():
    with pytest.raises(ValueError, match=r"\[0, 3\)"):
        tip.cache_values(torch.tensor([0, 3]), num_classes=3)


def test_cache_keys_mean_of_views_normalised():
    views = torch.tensor([[[1.0, 0.0], [0.0, 1.0]], [[0.0, 2.0], [0.0, 4.0]]])
    keys = tip.cache_keys(views)
    torch.testing.assert_close(keys, torch.tensor([[2**-0.5, 2**-0.5], [0.0, 1.0]]))


def test_search_grid_matches_tip_adapter_ranges():
    betas = tip.search_grid(7.0, 200)
    assert len(betas) == 200
    assert betas[0] == pytest.approx(0.1)
    assert betas[1] - betas[0] == pytest.approx(6.9 / 200)
    assert betas[-1] < 7.0


def test_grid_accuracies_match_direct_logits():
    sim = simulate_clip_features(SimulationConfig(num_classes=4, train_per_class=5, test_per_class=10, dim=16))
    keys = sim.train_features
    values = tip.cache_values(sim.train_labels, 4)
    alphas, betas = [0.5, 2.0], [1.0, 6.0]
    table = tip.grid_accuracies(sim.test_features, sim.test_labels, sim.text_weights, keys, values, 30.0, alphas, betas)
    for b, beta in enumerate(betas):
        for a, alpha in enumerate(alphas):
            logits = tip.tip_adapter_logits(sim.test_features, sim.text_weights, keys, values, 30.0, alpha, beta)
            assert table[b, a].item() == pytest.approx(accuracy(logits, sim.test_labels))


# ---- Few-shot sampler --------------------------------------------------------------------------


def test_sample_few_shot_reads_only_train_labels():
    assert list(inspect.signature(tip.sample_few_shot).parameters) == ["train_labels", "shots", "generator",
                                                                       "num_classes"]


def test_sample_few_shot_counts_and_labels():
    labels = torch.arange(3).repeat_interleave(10)
    chosen = tip.sample_few_shot(labels, 4, torch.Generator().manual_seed(0))
    assert torch.bincount(labels[chosen], minlength=3).tolist() == [4, 4, 4]
    assert len(set(chosen.tolist())) == 12


def test_sample_few_shot_seeded():
    labels = torch.arange(5).repeat(20)
    first = tip.sample_few_shot(labels, 8, torch.Generator().manual_seed(3))
    again = tip.sample_few_shot(labels, 8, torch.Generator().manual_seed(3))
    other = tip.sample_few_shot(labels, 8, torch.Generator().manual_seed(4))
    assert torch.equal(first, again)
    assert not torch.equal(first, other)


def test_sample_few_shot_short_class_keeps_all():
    labels = torch.tensor([0] * 10 + [1] * 2)
    chosen = tip.sample_few_shot(labels, 4, torch.Generator().manual_seed(0), num_classes=3)
    assert torch.bincount(labels[chosen], minlength=3).tolist() == [4, 2, 0]


# ---- Tip-Adapter-F training ------------------------------------------------------------------------


def _tip_f_inputs():
    sim = simulate_clip_features(SimulationConfig(num_classes=4, train_per_class=6, test_per_class=2, dim=16))
    views = torch.stack([sim.train_features, F.normalize(sim.train_features + 0.05, dim=-1)], dim=1)
    values = tip.cache_values(sim.train_labels, 4)
    return sim, views, values


def test_train_cache_keys_seeded_and_moving():
    sim, views, values = _tip_f_inputs()
    keys = tip.cache_keys(views)
    runs = [
        tip.train_cache_keys(views, sim.train_labels, sim.text_weights, keys, values, 100.0, 1.17, 1.0,
                             AdapterTraining(epochs=3, batch_size=8), torch.Generator().manual_seed(2), progress=False)
        for _ in range(2)
    ]
    torch.testing.assert_close(runs[0][0], runs[1][0], rtol=0, atol=0)
    assert runs[0][1] == runs[1][1]
    assert not torch.equal(runs[0][0], keys)


def test_train_cache_keys_non_finite_loss_raises():
    sim, views, values = _tip_f_inputs()
    with pytest.raises(FloatingPointError, match="non-finite"):
        tip.train_cache_keys(views, sim.train_labels, sim.text_weights, tip.cache_keys(views), values, 100.0,
                             float("inf"), 1.0, AdapterTraining(epochs=1), progress=False)


# ---- Linear probe ------------------------------------------------------------------------------------


def test_linear_probe_missing_class_column():
    sim = simulate_clip_features(SimulationConfig(num_classes=4, train_per_class=10, test_per_class=5, dim=16))
    kept = sim.train_labels != 2
    logits = linear_probe_logits(sim.train_features[kept], sim.train_labels[kept], sim.test_features, 4)
    assert logits.shape == (20, 4)
    assert torch.isinf(logits[:, 2]).all()
    assert torch.isfinite(logits[:, [0, 1, 3]]).all()
    # Exponentiated log-probabilities of the present classes sum to one.
    torch.testing.assert_close(logits[:, [0, 1, 3]].exp().sum(dim=1), torch.ones(20))


def test_linear_probe_separable_classes():
    sim = simulate_clip_features(SimulationConfig(num_classes=3, train_per_class=20, test_per_class=20, dim=16))
    logits = linear_probe_logits(sim.train_features, sim.train_labels, sim.test_features, 3)
    assert accuracy(logits, sim.test_labels) > 90.0


def test_linear_probe_single_class():
    logits = linear_probe_logits(torch.eye(3)[:2], torch.tensor([1, 1]), torch.eye(3), 3)
    assert logits.argmax(dim=1).tolist() == [1, 1, 1]


# ---- Runner ------------------------------------------------------------------------------------------

DIM = 32  # the tiny open_clip config's embed_dim, so UPL and CoOp share the simulated features


@pytest.fixture(scope="module")
def tiny_clip(tiny_arch):
    torch.manual_seed(0)
    model = open_clip.create_model(tiny_arch, pretrained=None).eval()
    # The two fields of upa.features.LoadedCLIP that the prompt learner reads.
    return SimpleNamespace(model=model, tokenizer=open_clip.get_tokenizer(tiny_arch))


def _views_of(features: torch.Tensor, n_views: int = 3):
    """Seeded augmented views standing in for upa.features.augmented_features: depend only on the index."""

    def view_fn(indices: torch.Tensor) -> torch.Tensor:
        rows = []
        for i in indices.tolist():
            noise = torch.randn(n_views, features.shape[1], generator=torch.Generator().manual_seed(1000 + i))
            rows.append(F.normalize(features[i] + 0.1 * noise, dim=-1))
        return torch.stack(rows)

    return view_fn


def _targets(test_features: torch.Tensor, test_labels: torch.Tensor) -> dict:
    """Domain-shift targets built from the test split, each with a known relation to test_top1.

    same: the test split itself. reversed: the test split with every class in a reversed
    class_subset, so mapping the subset's arg-max back gives test_top1 again. only_two: the
    test images of classes 2 and 3 with class_subset [2], so every prediction maps to class 2.
    shifted: noisy copies of the test features, whose accuracy is not known in advance.
    """
    noise = torch.randn(test_features.shape, generator=torch.Generator().manual_seed(11))
    two_or_three = (test_labels == 2) | (test_labels == 3)
    return {
        "same": (test_features, test_labels, None),
        "reversed": (test_features, test_labels, torch.arange(5).flip(0)),
        "only_two": (test_features[two_or_three], test_labels[two_or_three], torch.tensor([2])),
        "shifted": (F.normalize(test_features + 0.2 * noise, dim=-1), test_labels, None),
    }


def _inputs(tiny_clip, seed=0, train_labels=None):
    # A small modality gap keeps every class predicted in 32 dimensions; class 4 keeps 4 of k = 8.
    sim = simulate_clip_features(SimulationConfig(num_classes=5, train_per_class=30, test_per_class=30, dim=DIM,
                                                  text_noise=2.0, modality_gap=0.5, seed=1))
    probs = zero_shot_logits(sim.train_features, sim.text_weights, 100.0).softmax(dim=1)
    half = len(sim.test_labels) // 2
    order = torch.randperm(len(sim.test_labels), generator=torch.Generator().manual_seed(9))
    val, test = order[:half], order[half:]
    return BaselineInputs(
        train_features=sim.train_features,
        train_labels=sim.train_labels if train_labels is None else train_labels,
        val_features=sim.test_features[val],
        val_labels=sim.test_labels[val],
        test_features=sim.test_features[test],
        test_labels=sim.test_labels[test],
        test_class_subset=None,
        text_weights=sim.text_weights,
        logit_scale=100.0,
        selection=select_confident(probs, k=8),
        view_fn=_views_of(sim.train_features),
        clip=tiny_clip,
        classnames=("zero", "one", "two", "three", "four"),
        seed=seed,
        targets=_targets(sim.test_features[test], sim.test_labels[test]),
    )


FAST = BaselineSettings(
    adapter_training=AdapterTraining(epochs=4, batch_size=16),
    up_etas=(1.0, 4.0),
    upl_training=PromptTraining(epochs=2, batch_size=16),
    coop_training=PromptTraining(epochs=2, batch_size=16),
    tip_search_steps=(50, 10),
    progress=False,
)


@pytest.fixture(scope="module")
def baseline_results(tiny_clip):
    return evaluate_baselines(_inputs(tiny_clip), FAST)


def test_evaluate_baselines_runs_every_method(baseline_results):
    assert set(baseline_results) == set(METHODS)
    for name, record in baseline_results.items():
        assert 0.0 <= record["test_top1"] <= 100.0, name
        assert record["selected_by"], name
        assert set(record["target_top1"]) == {"same", "reversed", "only_two", "shifted"}, name
        for value in record["target_top1"].values():
            assert 0.0 <= value <= 100.0, name


def test_target_equal_to_test_matches_test_top1(baseline_results):
    for name, record in baseline_results.items():
        assert record["target_top1"]["same"] == record["test_top1"], name


def test_target_class_subset_maps_predictions_back(tiny_clip, baseline_results):
    # With class_subset [2] every arg-max is position 0, which must map back to class 2. The
    # accuracy is then the share of class-2 images among the target's class-2 and class-3 images.
    _, labels, _ = _inputs(tiny_clip).targets["only_two"]
    expected = round(100.0 * (labels == 2).sum().item() / len(labels), 4)
    assert 0.0 < expected < 100.0
    for name, record in baseline_results.items():
        assert record["target_top1"]["only_two"] == expected, name
        # A reversed subset keeps every class, so only a correct mapping reproduces test_top1.
        assert record["target_top1"]["reversed"] == record["test_top1"], name


def test_targets_leave_source_records_unchanged(tiny_clip, baseline_results):
    # One target with permuted labels instead of the fixture's four: every choice, oracle and
    # source-test number must stay the same, so no target features or labels feed a decision.
    inputs = _inputs(tiny_clip)
    permuted = inputs.test_labels[torch.randperm(len(inputs.test_labels), generator=torch.Generator().manual_seed(3))]
    inputs.targets = {"permuted": (inputs.test_features, permuted, None)}
    results = evaluate_baselines(inputs, FAST)
    for name, record in results.items():
        assert set(record["target_top1"]) == {"permuted"}, name
        without_targets = {key: value for key, value in record.items() if key != "target_top1"}
        expected = {key: value for key, value in baseline_results[name].items() if key != "target_top1"}
        assert without_targets == expected, name


def test_evaluate_baselines_rules_recorded(baseline_results):
    assert baseline_results["tip_adapter_unsup"]["selected_by"]["beta"] == "pseudo-label hold-out"
    assert baseline_results["tip_adapter_unsup"]["selected_by"]["alpha"] == "fixed in advance"
    assert baseline_results["up_adapter_label_free"]["selected_by"]["eta, epochs"] == "pseudo-label hold-out"
    assert baseline_results["tip_adapter_8shot"]["selected_by"]["alpha, beta"] == "labelled val split"
    assert baseline_results["upl"]["selected_by"] == "fixed in advance"
    for name in UNSUPERVISED:
        assert baseline_results[name]["labels_read"] == "none (pseudo-labels only)", name


def test_evaluate_baselines_oracle_labelled_and_not_below(baseline_results):
    for name in ("tip_adapter_unsup", "tip_adapter_8shot", "up_adapter_label_free"):
        oracle = baseline_results[name]["oracle"]
        assert "oracle" in oracle["note"]
        assert oracle["test_top1"] >= baseline_results[name]["test_top1"], name
    assert baseline_results["upl"]["oracle"] is None


def test_evaluate_baselines_adapters_beat_zero_shot(tiny_clip, baseline_results):
    # Simulated image clusters are far tighter than the text alignment, so labelled shots and a
    # probe on the confident images gain clearly; the label-free adapters must not lose.
    inputs = _inputs(tiny_clip)
    zero_shot = accuracy(zero_shot_logits(inputs.test_features, inputs.text_weights, 100.0), inputs.test_labels)
    for name in ("tip_adapter_8shot", "tip_adapter_f_8shot", "linear_probe_pseudo"):
        assert baseline_results[name]["test_top1"] > zero_shot + 5.0, name
    for name in ("tip_adapter_unsup", "tip_adapter_f_unsup", "up_adapter_label_free"):
        assert baseline_results[name]["test_top1"] >= zero_shot, name


def test_evaluate_baselines_seeded(tiny_clip, baseline_results):
    again = evaluate_baselines(_inputs(tiny_clip), FAST)
    assert again == baseline_results


def test_evaluate_baselines_seed_changes_shots(tiny_clip, baseline_results):
    other = evaluate_baselines(_inputs(tiny_clip, seed=1), replace(FAST, methods=("coop_8shot",)))
    assert other["coop_8shot"]["epoch_losses"] != baseline_results["coop_8shot"]["epoch_losses"]


def test_unsupervised_baselines_ignore_train_labels(tiny_clip, baseline_results):
    # Poison: permuted train labels must leave every unsupervised result, hold-out scores included,
    # unchanged, while the supervised ones (the control) do change.
    clean = _inputs(tiny_clip)
    poisoned_labels = clean.train_labels[torch.randperm(len(clean.train_labels),
                                                        generator=torch.Generator().manual_seed(5))]
    poisoned = evaluate_baselines(_inputs(tiny_clip, train_labels=poisoned_labels), FAST)
    for name in UNSUPERVISED:
        assert poisoned[name]["target_top1"], name  # the comparison below covers the target numbers
        assert poisoned[name] == baseline_results[name], name
    assert any(poisoned[name] != baseline_results[name] for name in SUPERVISED)


def test_unsupervised_baselines_run_without_train_labels(tiny_clip):
    inputs = _inputs(tiny_clip)
    inputs.train_labels = None
    results = evaluate_baselines(inputs, replace(FAST, methods=("tip_adapter_unsup", "linear_probe_pseudo")))
    assert set(results) == {"tip_adapter_unsup", "linear_probe_pseudo"}


def test_supervised_baseline_without_val_uses_fixed_defaults(tiny_clip):
    inputs = _inputs(tiny_clip)
    inputs.val_features, inputs.val_labels = None, None
    record = evaluate_baselines(inputs, replace(FAST, methods=("tip_adapter_8shot",)))["tip_adapter_8shot"]
    assert record["selected_by"]["alpha, beta"].startswith("fixed in advance")
    assert record["hyperparameters"]["alpha"] == tip.INIT_ALPHA
    assert record["hyperparameters"]["beta"] == tip.INIT_BETA


def test_evaluate_baselines_rejects_unknown_method(tiny_clip):
    with pytest.raises(ValueError, match="unknown baseline"):
        evaluate_baselines(_inputs(tiny_clip), replace(FAST, methods=("tip_adapter",)))


def test_evaluate_baselines_rejects_width_mismatch(tiny_clip):
    inputs = _inputs(tiny_clip)
    inputs.test_features = inputs.test_features[:, :8]
    with pytest.raises(ValueError, match="test_features"):
        evaluate_baselines(inputs, FAST)


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda f, y, s: (f[:, :8], y, s), r"targets\['shifted'\] features must have shape \[N, 32\]"),
        (lambda f, y, s: (f, y[:-1], s), r"targets\['shifted'\] labels must have shape \[75\]"),
        (lambda f, y, s: (f, y, torch.tensor([0, 5])), r"targets\['shifted'\] class_subset .* \[0, 5\)"),
    ],
)
def test_evaluate_baselines_rejects_bad_target(tiny_clip, change, message):
    inputs = _inputs(tiny_clip)
    inputs.targets = {"shifted": change(*inputs.targets["shifted"])}
    with pytest.raises(ValueError, match=message):
        evaluate_baselines(inputs, FAST)
