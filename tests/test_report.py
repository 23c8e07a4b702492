"""Report tables from hand-written result files: values, "not run" cells and provenance rules."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest

from upa import report

RANDOM_LABEL = "randomly initialised ViT-B-32 on Digits (embedded demo data): not a reproduction of the paper"


def write_run(results: Path, experiment: str, dataset: str, seed: int, metrics: dict, *, arch: str = "RN50",
              weights: str = "pretrained:openai", reproduction: bool = True, label: str | None = None,
              name: str | None = None, **config) -> Path:
    """Write a minimal run record with the fields the report reads."""
    precision = config.pop("precision", 80.0)
    record = {
        "schema": "upa.run/1",
        "provenance_label": label or f"{arch} {weights} on {dataset} (real benchmark dataset)",
        "reproduction": reproduction,
        "config": {"dataset": dataset, "arch": arch, "weights": weights, "k": 16, "beta": 1.0, "eta": 1.0,
                   "epochs": 20, "n_views": 10, "prompts": "ensemble", "prototype_views": "center",
                   "fill_shortfall": False, "seed": seed, **config},
        "seed": seed,
        "metrics": metrics,
        "pseudo_labels": {"selected": 160, "precision_of_selected_percent": precision},
        "training": {"epoch_losses": [1.0, 0.5]},
        "weights": {"arch": arch, "random_init": weights == "random"},
        "data": {"dataset": dataset},
    }
    path = results / experiment / dataset / (name or f"{arch}__{weights.split(':')[-1]}__seed{seed}.json")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record))
    return path


def write_not_run(results: Path, experiment: str, dataset: str, reason: str, arch="ViT-B-32", weights="random"):
    path = results / experiment / dataset / f"not-run__{arch}__{weights}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"schema": "upa.not_run/1", "experiment": experiment, "dataset": dataset,
                                "arch": arch, "weights": weights, "profile": "demo", "reason": reason}))


@pytest.fixture
def recognition_results(tmp_path) -> Path:
    results = tmp_path / "results"
    for seed, (zs, up) in enumerate([(60.0, 62.0), (60.0, 64.0)]):
        write_run(results, "recognition", "ImageNet", seed,
                  {"test": {"zero_shot_single": 58.0, "zero_shot_ensemble": zs, "training_free": 61.0,
                            "up_adapter": up}})
    write_run(results, "recognition", "Digits", 0,
              {"test": {"zero_shot_ensemble": 11.0, "up_adapter": 99.5}},
              arch="ViT-B-32", weights="random", reproduction=False, label=RANDOM_LABEL)
    write_not_run(results, "recognition", "Caltech101", "the demo profile runs Digits only")
    return results


def test_format_cell_mean_and_sample_std():
    assert report.format_cell([62.0, 64.0]) == "63.00 ± 1.41"
    assert report.format_cell([61.0]) == "61.00"
    assert report.format_cell([]) == ""


def test_recognition_table_mean_std_per_method(recognition_results):
    main, _ = report.accuracy_tables(recognition_results, "recognition", report.RECOGNITION_COLUMNS,
                                     "recognition", "Top-1")
    study = main.frame.loc["this study, reproduction: RN50, weights pretrained:openai"]
    assert study.loc["UP-Adapter (this study)", "ImageNet"] == "63.00 ± 1.41"
    assert study.loc["Zero-shot CLIP, template ensemble", "ImageNet"] == "60.00 ± 0.00"
    assert study.loc["Zero-shot CLIP, single template", "ImageNet"] == "58.00 ± 0.00"


def test_recognition_table_published_rows(recognition_results):
    main, _ = report.accuracy_tables(recognition_results, "recognition", report.RECOGNITION_COLUMNS,
                                     "recognition", "Top-1")
    published = main.frame.loc["published"]
    zero_shot = [label for label in published.index if label.startswith("Zero-shot CLIP (RN50, zero-shot (CoOp")]
    assert len(zero_shot) == 1
    assert published.loc[zero_shot[0], "ImageNet"] == "60.32"
    assert published.loc[zero_shot[0], "EuroSAT"] == "37.52"
    assert published.loc[zero_shot[0], "source"] == "gaopengcuhk/Tip-Adapter exp.log"
    up_adapter = [label for label in published.index if label.startswith("UP-Adapter")]
    assert published.loc[up_adapter[0], "ImageNet"] == "63.58"
    assert published.loc[up_adapter[0], "Caltech101"] == "—"


def test_recognition_table_not_run_cell_gives_reason(recognition_results):
    main, _ = report.accuracy_tables(recognition_results, "recognition", report.RECOGNITION_COLUMNS,
                                     "recognition", "Top-1")
    cell = main.frame.loc[("this study, reproduction: RN50, weights pretrained:openai", "UP-Adapter (this study)"),
                          "Caltech101"]
    assert cell.startswith("not run [")
    number = cell.split("[")[1].rstrip("]")
    note = [line for line in main.notes if line.startswith(f"[{number}]")]
    assert len(note) == 1
    assert "no RN50 (pretrained:openai) result for this dataset under results/recognition/" in note[0]
    assert main.frame.loc[("this study, reproduction: RN50, weights pretrained:openai", "UP-Adapter (this study)"),
                          "Average"] == "incomplete (1 of 11)"


def test_random_weights_never_in_reproduction_table(recognition_results):
    main, check = report.accuracy_tables(recognition_results, "recognition", report.RECOGNITION_COLUMNS,
                                         "recognition", "Top-1")
    assert "Digits" not in main.frame.columns
    assert not main.frame.astype(str).apply(lambda column: column.str.contains("99.50")).any().any()
    assert check.frame.loc[(f"this study, NOT a reproduction: {RANDOM_LABEL}", "UP-Adapter (this study)"),
                           "Digits"] == "99.50"
    assert "not a reproduction" in check.title or "never comparable" in check.title


def test_reproduction_table_placeholder_uses_not_run_reason(tmp_path):
    results = tmp_path / "results"
    write_run(results, "recognition", "Digits", 0, {"test": {"up_adapter": 50.0}}, arch="ViT-B-32",
              weights="random", reproduction=False, label=RANDOM_LABEL)
    write_not_run(results, "recognition", "ImageNet", "the demo profile runs Digits only",
                  weights="pretrained:openai")
    main, _ = report.accuracy_tables(results, "recognition", report.RECOGNITION_COLUMNS, "recognition", "Top-1")
    placeholder = main.frame.loc[("this study, reproduction", "every method")]
    assert placeholder["ImageNet"].startswith("not run [")
    assert any("the demo profile runs Digits only (ViT-B-32, weights pretrained:openai)" in note
               for note in main.notes)
    assert any("run the gpu profile" in note for note in main.notes)


def test_extra_methods_become_rows_and_oracle_column_appears(tmp_path):
    results = tmp_path / "results"
    write_run(results, "recognition", "ImageNet", 0, {"test": {
        "up_adapter": 63.0,
        "upl": 61.5,
        "tip_adapter_unsup": {"test_top1": 62.0, "oracle": {"test_top1": 65.0}},
    }})
    main, _ = report.accuracy_tables(results, "recognition", report.RECOGNITION_COLUMNS, "recognition", "Top-1")
    group = "this study, reproduction: RN50, weights pretrained:openai"
    frame = main.frame
    assert isinstance(frame.columns, pd.MultiIndex)
    assert frame.loc[(group, "UPL (prompt learning on pseudo-labels)"), ("ImageNet", "top-1")] == "61.50"
    assert frame.loc[(group, "Tip-Adapter on pseudo-labels"), ("ImageNet", "top-1")] == "62.00"
    assert frame.loc[(group, "Tip-Adapter on pseudo-labels"), ("ImageNet", report.ORACLE_LABEL)] == "65.00"
    assert frame.loc[(group, "UP-Adapter (this study)"), ("ImageNet", report.ORACLE_LABEL)] == ""


def test_oracle_column_absent_without_oracle(recognition_results):
    main, _ = report.accuracy_tables(recognition_results, "recognition", report.RECOGNITION_COLUMNS,
                                     "recognition", "Top-1")
    assert not isinstance(main.frame.columns, pd.MultiIndex)
    assert not any("oracle" in str(column) for column in main.frame.columns)


def test_domain_table_targets_and_missing_target(tmp_path):
    results = tmp_path / "results"
    write_run(results, "domain_generalisation", "ImageNet", 0,
              {"test": {"up_adapter": 63.0}, "ImageNetV2": {"up_adapter": 55.0}})
    write_not_run(results, "domain_generalisation", "ImageNetA", "data not found: imagenet-adversarial missing",
                  arch="RN50", weights="pretrained:openai")
    main, _ = report.accuracy_tables(results, "domain_generalisation", report.DOMAIN_COLUMNS, "domain-generalisation",
                                     "Shift", with_average=False)
    row = main.frame.loc[("this study, reproduction: RN50, weights pretrained:openai", "UP-Adapter (this study)")]
    assert row["ImageNet"] == "63.00"
    assert row["ImageNetV2"] == "55.00"
    assert row["ImageNetA"].startswith("not run [")
    assert any("imagenet-adversarial missing" in note for note in main.notes)
    published = main.frame.loc["published"]
    dpe = [label for label in published.index if label.startswith("DPE")]
    assert published.loc[dpe[0], "ImageNetA"] == "30.15"


def test_k_ablation_table_values_and_provenance(tmp_path):
    results = tmp_path / "results"
    for k, precision, accuracy in [(1, 90.0, 20.0), (4, 70.0, 30.0)]:
        for seed in (0, 1):
            write_run(results, "k_ablation", "Digits", seed, {"test": {"up_adapter": accuracy + seed}},
                      arch="ViT-B-32", weights="random", reproduction=False, label=RANDOM_LABEL, k=k,
                      precision=precision + 2 * seed, name=f"k{k}_seed{seed}.json")
    table = report.k_ablation_table(results)
    row = table.frame.loc[(RANDOM_LABEL, 4)]
    assert row["UP-Adapter (this study)"] == "30.50 ± 0.71"
    assert row["pseudo-label precision of the selected set (%)"] == "71.00 ± 1.41"
    assert row["seeds"] == 2
    assert f"Provenance: {RANDOM_LABEL}" in table.notes


def test_ablation_table_without_results_says_not_run(tmp_path):
    table = report.beta_eta_table(tmp_path / "results")
    assert table.frame.iloc[0, 0].startswith("not run")


def test_simulation_frame_gain(tmp_path):
    path = tmp_path / "results" / "simulation" / "simulated" / "a.json"
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps({
        "schema": "upa.simulation/1", "provenance_label": "simulated", "reproduction": False, "seed": 0,
        "config": {"simulation": {"text_noise": 2.0, "image_noise": 0.5}, "k": 16, "seed": 0},
        "metrics": {"test": {"zero_shot": 60.0, "training_free": 61.0, "up_adapter": 63.5}},
        "pseudo_labels": {"precision_of_selected_percent": 95.0}, "data": {"dataset": "simulated"},
        "weights": {"kind": "none"},
    }))
    frame = report.simulation_frame(tmp_path / "results")
    assert len(frame) == 1
    assert frame.loc[0, "gain"] == pytest.approx(3.5)
    assert frame.loc[0, "precision"] == 95.0


def test_load_records_rejects_invalid_json(tmp_path):
    path = tmp_path / "results" / "recognition" / "ImageNet" / "broken.json"
    path.parent.mkdir(parents=True)
    path.write_text("{not json")
    with pytest.raises(ValueError, match="broken.json"):
        report.load_records(tmp_path / "results")


def test_collect_writes_every_table_and_figure(recognition_results, tmp_path):
    written = report.collect(recognition_results, tmp_path / "summary")
    names = {path.name for path in written}
    for table in ("recognition", "recognition-not-reproduction", "domain-generalisation", "k-ablation",
                  "beta-eta", "epochs", "backbones", "open-choices", "simulation"):
        assert f"{table}.csv" in names
    for figure in ("k-ablation", "beta-eta", "epochs", "backbones", "simulation-gain", "simulation-k"):
        assert f"{figure}.png" in names
    summary = (tmp_path / "summary" / "tables.md").read_text()
    assert "63.00 ± 1.41" in summary
