"""Tables and figures of the study, built from the result JSON files under the results folder only.

Layout read: ``<results>/<experiment>/<dataset>/<file>.json`` (see results/README.md). Run files
(schema ``upa.run/1``) and simulation files (``upa.simulation/1``) hold numbers; "not run"
records (``upa.not_run/1``) hold the reason a dataset was skipped.

Rules every table follows:

- Peers' published numbers (``upa/reference/published_numbers.csv``, one source per row) sit in
  their own rows beside the study's.
- Only results that ``reproduction`` marks true (trained weights on a real benchmark dataset)
  enter a main table next to the published numbers. Results from random weights, generated or
  embedded data go to a separate "not a reproduction" table whose rows carry their
  ``provenance_label``.
- A cell the study has not run reads "not run [n]", and note [n] under the table gives the reason.
- Cells are the mean over seeds, with "± sample standard deviation" when there are two or more.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

import numpy as np
import pandas as pd

log = logging.getLogger(__name__)

RUN_SCHEMAS = ("upa.run/1", "upa.simulation/1")
NOT_RUN_SCHEMA = "upa.not_run/1"
PUBLISHED_CSV = "published_numbers.csv"

# NOTE: the few-shot labels read 8-shot, the default of RunConfig.shots; a run with another
# --shots keeps these labels, and its result file records the shots actually used.
METHOD_LABELS = {
    "zero_shot": "Zero-shot CLIP",
    "zero_shot_single": "Zero-shot CLIP, single template",
    "zero_shot_ensemble": "Zero-shot CLIP, template ensemble",
    "training_free": "Prototypes without fine-tuning",
    "up_adapter": "UP-Adapter (this study)",
    "up_adapter_label_free": "UP-Adapter, η chosen on a pseudo-label hold-out",
    "tip_adapter_unsup": "Tip-Adapter on pseudo-labels",
    "tip_adapter_f_unsup": "Tip-Adapter-F on pseudo-labels",
    "upl": "UPL (prompt learning on pseudo-labels)",
    "linear_probe_pseudo": "Linear probe on pseudo-labels",
    "tip_adapter_8shot": "Tip-Adapter, 8-shot supervised",
    "tip_adapter_f_8shot": "Tip-Adapter-F, 8-shot supervised",
    "coop_8shot": "CoOp, 8-shot supervised",
}
METHOD_ORDER = tuple(METHOD_LABELS)
ORACLE_LABEL = "oracle: tuned on test accuracy, not a result"
ACCURACY_METHODS = ("zero_shot_single", "zero_shot_ensemble", "zero_shot", "training_free", "up_adapter")

RECOGNITION_COLUMNS = ("ImageNet", "Caltech101", "OxfordPets", "StanfordCars", "Flowers102", "Food101",
                       "FGVCAircraft", "SUN397", "DTD", "EuroSAT", "UCF101")
DOMAIN_COLUMNS = ("ImageNet", "ImageNetV2", "ImageNetSketch", "ImageNetA", "ImageNetR")
AVERAGE = "Average"


# --------------------------------------------------------------------------------------------
# Reading results


def _experiment_dirs(results_dir: Path, experiment: str | None) -> list[Path]:
    if experiment is not None:
        return [results_dir / experiment]
    return sorted(path for path in results_dir.iterdir() if path.is_dir()) if results_dir.is_dir() else []


def load_records(results_dir: str | Path, experiment: str | None = None) -> tuple[list[dict], list[dict]]:
    """Read ``<results_dir>/<experiment>/<dataset>/*.json`` and return (run records, not-run records).

    Each record gains ``_path`` and ``_experiment`` (the folder it was found in). A file that is
    not valid JSON raises ValueError naming it; a JSON file of another schema is skipped with a
    warning.
    """
    runs, skipped = [], []
    for folder in _experiment_dirs(Path(results_dir), experiment):
        for path in sorted(folder.glob("*/*.json")):
            try:
                record = json.loads(path.read_text())
            except json.JSONDecodeError as error:
                raise ValueError(f"result file {path} is not valid JSON ({error}); delete or repair it") from error
            schema = record.get("schema") if isinstance(record, dict) else None
            if schema in RUN_SCHEMAS:
                runs.append({**record, "_path": str(path), "_experiment": folder.name})
            elif schema == NOT_RUN_SCHEMA:
                skipped.append({**record, "_path": str(path), "_experiment": folder.name})
            else:
                log.warning("skipping %s: schema %r is not one of %s", path, schema, RUN_SCHEMAS + (NOT_RUN_SCHEMA,))
    return runs, skipped


def _method_values(metrics: dict) -> dict[str, tuple[float, float | None]]:
    """Map method -> (top-1, oracle top-1 or None) from one target's metrics.

    A value is a number, or a record with ``test_top1`` and an optional ``oracle`` record. A
    key ``<method>_oracle`` contains the oracle of ``<method>``.
    """
    values: dict[str, list] = {}
    for name, value in metrics.items():
        if name.endswith("_oracle"):
            values.setdefault(name[: -len("_oracle")], [None, None])[1] = _number(value)
            continue
        if isinstance(value, dict):
            oracle = value.get("oracle")
            entry = values.setdefault(name, [None, None])
            entry[0] = _number(value.get("test_top1"))
            if entry[1] is None and isinstance(oracle, dict):
                entry[1] = _number(oracle.get("test_top1"))
        else:
            values.setdefault(name, [None, None])[0] = _number(value)
    return {name: (top1, oracle) for name, (top1, oracle) in values.items() if top1 is not None}


def _number(value) -> float | None:
    if isinstance(value, dict):
        value = value.get("test_top1")
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def runs_frame(records: Iterable[dict]) -> pd.DataFrame:
    """Flatten run records into one row per (file, evaluated dataset, method)."""
    rows = []
    for record in records:
        config = record.get("config", {})
        simulation = config.get("simulation", {})
        dataset = config.get("dataset", record.get("data", {}).get("dataset", "unknown"))
        weights = record.get("weights", {})
        pseudo = record.get("pseudo_labels", {})
        losses = record.get("training", {}).get("epoch_losses") or []
        base = {
            "experiment": record["_experiment"],
            "dataset": dataset,
            "arch": config.get("arch", weights.get("arch", "none")),
            "weights": config.get("weights", weights.get("kind", "none")),
            "reproduction": bool(record.get("reproduction", False)),
            "provenance": record.get("provenance_label", "unknown provenance"),
            "seed": record.get("seed", config.get("seed")),
            "k": config.get("k"), "beta": config.get("beta"), "eta": config.get("eta"),
            "epochs": config.get("epochs"), "n_views": config.get("n_views"),
            "prompts": config.get("prompts"), "prototype_views": config.get("prototype_views"),
            "fill_shortfall": config.get("fill_shortfall"),
            "text_noise": simulation.get("text_noise"), "image_noise": simulation.get("image_noise"),
            "precision": pseudo.get("precision_of_selected_percent"),
            "selected": pseudo.get("selected"),
            "final_loss": losses[-1] if losses else None,
            "path": record["_path"],
        }
        metric_sets = dict(record.get("metrics", {}))
        if isinstance(record.get("baselines"), dict):
            metric_sets.setdefault("test", {}).update(record["baselines"])
        for target, metrics in metric_sets.items():
            column = dataset if target == "test" else target
            for name, (top1, oracle) in _method_values(metrics).items():
                rows.append({**base, "target": column, "method": name, "top1": top1, "oracle": oracle})
    columns = ["experiment", "dataset", "target", "method", "top1", "oracle", "arch", "weights", "reproduction",
               "provenance", "seed", "k", "beta", "eta", "epochs", "n_views", "prompts", "prototype_views",
               "fill_shortfall", "text_noise", "image_noise", "precision", "selected", "final_loss", "path"]
    return pd.DataFrame(rows, columns=columns)


def load_published() -> pd.DataFrame:
    """Read the peers' published top-1 accuracies shipped with upa, one source per row."""
    text = resources.files("upa").joinpath("reference", PUBLISHED_CSV).read_text()
    from io import StringIO

    frame = pd.read_csv(StringIO(text))
    frame["column"] = frame["dataset"].map(_published_column)
    return frame


def _published_column(name: str) -> str:
    if name.lower().startswith("average"):
        return AVERAGE
    from upa.data import get_spec

    try:
        return get_spec(name).name
    except ValueError:
        return name


# --------------------------------------------------------------------------------------------
# Cells and notes


def format_cell(values: Sequence[float]) -> str:
    """Format seed values as "mean" (one seed) or "mean ± sample std" (two or more), in percent."""
    values = [float(v) for v in values if v is not None and not math.isnan(float(v))]
    if not values:
        return ""
    mean = float(np.mean(values))
    if len(values) == 1:
        return f"{mean:.2f}"
    return f"{mean:.2f} ± {float(np.std(values, ddof=1)):.2f}"


@dataclass
class Notes:
    """Numbered footnotes of one table; the same text gets the same number."""

    texts: list[str] = field(default_factory=list)

    def mark(self, text: str) -> str:
        if text not in self.texts:
            self.texts.append(text)
        return f"[{self.texts.index(text) + 1}]"

    def lines(self) -> list[str]:
        return [f"[{i}] {text}" for i, text in enumerate(self.texts, start=1)]


@dataclass
class Table:
    """A table of the study: a stable key (the book's tests look for it), a title and notes."""

    key: str
    title: str
    frame: pd.DataFrame
    notes: list[str] = field(default_factory=list)

    @property
    def caption(self) -> str:
        return f"Table {self.key}: {self.title}"

    def to_markdown(self) -> str:
        body = self.frame.to_markdown() if len(self.frame) else "(empty)"
        notes = "\n".join(f"- {note}" for note in self.notes)
        return f"**{self.caption}**\n\n{body}\n\n{notes}\n"


@dataclass
class Figure:
    """A matplotlib figure with a stable key and a caption that states its provenance."""

    key: str
    caption: str
    figure: object

    @property
    def title(self) -> str:
        return f"Figure {self.key}: {self.caption}"


def method_label(name: str) -> str:
    return METHOD_LABELS.get(name, name.replace("_", " "))


def _ordered_methods(names: Iterable[str]) -> list[str]:
    names = set(names)
    known = [name for name in METHOD_ORDER if name in names]
    return known + sorted(names - set(known))


def _not_run_reason(skipped: list[dict], experiment: str, dataset: str, reproduction: bool) -> str | None:
    """Join the recorded reasons why a dataset was not run in ``experiment``, with backbone and weights."""
    reasons = [f"{record['reason']} ({record['arch']}, weights {record['weights']})" for record in skipped
               if record["_experiment"] == experiment and record["dataset"] == dataset
               and (record["weights"] != "random") == reproduction]
    return "; ".join(dict.fromkeys(reasons)) or None


# --------------------------------------------------------------------------------------------
# Accuracy tables with published rows


def _published_rows(published: pd.DataFrame, columns: Sequence[str], with_average: bool) -> pd.DataFrame:
    wanted = list(columns) + ([AVERAGE] if with_average else [])
    subset = published[published["column"].isin(wanted)]
    rows = {}
    for (method_name, backbone, setting, source), group in subset.groupby(
            ["method", "backbone", "setting", "source"], sort=False):
        label = (f"published", f"{method_name} ({backbone}, {setting})")
        row = rows.setdefault(label, {column: "—" for column in wanted} | {"source": source})
        for _, entry in group.iterrows():
            row[entry["column"]] = f"{entry['top1']:.2f}"
    frame = pd.DataFrame.from_dict(rows, orient="index")
    frame.index = pd.MultiIndex.from_tuples(frame.index, names=["numbers", "method"]) if len(frame) else frame.index
    return frame


def _group_label(group: pd.DataFrame, reproduction: bool) -> str:
    arch, weights = group["arch"].iloc[0], group["weights"].iloc[0]
    if reproduction:
        return f"this study, reproduction: {arch}, weights {weights}"
    labels = "; ".join(dict.fromkeys(group["provenance"]))
    return f"this study, NOT a reproduction: {labels}"


def _study_rows(runs: pd.DataFrame, skipped: list[dict], experiment: str, columns: Sequence[str],
                reproduction: bool, notes: Notes, with_average: bool) -> tuple[dict, bool]:
    """Build one row per (backbone and weights group, method) with cells "mean ± std" or "not run [n]"."""
    rows, has_oracle = {}, False
    for (arch, weights), group in runs.groupby(["arch", "weights"], sort=True):
        label = _group_label(group, reproduction)
        for name in _ordered_methods(group["method"]):
            cells = group[group["method"] == name]
            row = {}
            means = []
            for column in columns:
                values = cells[cells["target"] == column]
                if len(values):
                    row[column] = format_cell(values["top1"].tolist())
                    means.append(float(values["top1"].mean()))
                    oracle = values["oracle"].dropna()
                    if len(oracle):
                        has_oracle = True
                        row[(column, ORACLE_LABEL)] = format_cell(oracle.tolist())
                else:
                    reason = _not_run_reason(skipped, experiment, column, reproduction) or (
                        f"no {arch} ({weights}) result for this dataset under results/{experiment}/<dataset>/")
                    row[column] = "not run " + notes.mark(reason)
            if with_average:
                row[AVERAGE] = (f"{np.mean(means):.2f}" if len(means) == len(columns)
                                else f"incomplete ({len(means)} of {len(columns)})")
            rows[(label, method_label(name))] = row
    return rows, has_oracle


def _placeholder_row(skipped, experiment, columns, notes: Notes, with_average: bool) -> dict:
    row = {}
    for column in columns:
        reason = _not_run_reason(skipped, experiment, column, True) or (
            f"no result from trained weights on the real dataset under results/{experiment}/<dataset>/; "
            "run the gpu profile (see the Reproduce chapter)")
        row[column] = "not run " + notes.mark(reason)
    if with_average:
        row[AVERAGE] = "not run"
    return {("this study, reproduction", "every method"): row}


def _assemble(published: pd.DataFrame, study: dict, columns: Sequence[str], has_oracle: bool) -> pd.DataFrame:
    study_frame = pd.DataFrame.from_dict(study, orient="index")
    if len(study_frame):
        study_frame.index = pd.MultiIndex.from_tuples(study_frame.index, names=["numbers", "method"])
    frame = pd.concat([published, study_frame]) if len(published) else study_frame
    ordered = []
    for column in list(columns) + [AVERAGE]:
        if column in frame.columns:
            ordered.append(column)
        if has_oracle and (column, ORACLE_LABEL) in frame.columns:
            ordered.append((column, ORACLE_LABEL))
    if "source" in frame.columns:
        ordered.append("source")
    frame = frame.reindex(columns=ordered).fillna("")
    if has_oracle:
        frame.columns = pd.MultiIndex.from_tuples(
            [column if isinstance(column, tuple) else (column, "top-1" if column in columns else "")
             for column in frame.columns])
    return frame


def accuracy_tables(results_dir: str | Path, experiment: str, columns: Sequence[str], key: str, title: str,
                    with_average: bool = True) -> tuple[Table, Table]:
    """Build the main table (published rows and reproductions) and the "not a reproduction" table.

    ``columns`` are dataset names in order; each result contributes its test split under its
    own dataset and every evaluated target under the target's name. The main table lists a
    dataset outside ``columns`` only if a reproduction covers it. An "oracle" column appears
    next to a dataset only where some result carries an oracle value.
    """
    records, skipped = load_records(results_dir, experiment)
    runs = runs_frame(records)
    published = load_published()

    repro = runs[runs["reproduction"].astype(bool)]
    main_columns = list(columns) + sorted(set(repro["target"]) - set(columns))
    notes = Notes()
    study, oracle_main = _study_rows(repro, skipped, experiment, main_columns, True, notes, with_average)
    if not study:
        study = _placeholder_row(skipped, experiment, main_columns, notes, with_average)
    published_rows = _published_rows(published, main_columns, with_average)
    main = Table(key, title + ": published numbers and this study's reproductions",
                 _assemble(published_rows, study, main_columns, oracle_main),
                 notes.lines() + [_published_note(), _cell_note()])

    other = runs[~runs["reproduction"].astype(bool)]
    sources = list(dict.fromkeys(other["dataset"]))
    skipped_here = [record["dataset"] for record in skipped if record["_experiment"] == experiment
                    and record["weights"] == "random" and record["dataset"] not in columns]
    other_columns = list(dict.fromkeys(sources + list(other["target"]) + skipped_here))
    other_notes = Notes()
    rows, oracle_other = _study_rows(other, skipped, experiment, other_columns, False, other_notes,
                                     with_average=False)
    frame = _assemble(pd.DataFrame(), rows, other_columns, oracle_other) if rows else pd.DataFrame(
        {"result": [f"none: no result from random weights or non-benchmark data under results/{experiment}/"]})
    check = Table(f"{key}-not-reproduction",
                  title + ": results from random weights or non-benchmark data (checks of the code, "
                          "never comparable with published numbers)", frame,
                  other_notes.lines() + [_cell_note()])
    return main, check


def _published_note() -> str:
    return ("Published rows: top-1 accuracy (%) copied from the source named in each row "
            "(upa/reference/published_numbers.csv); '—' means the source reports no number for that dataset.")


def _cell_note() -> str:
    return "Study cells: top-1 accuracy (%) on the test split, mean ± sample standard deviation over seeds."


# --------------------------------------------------------------------------------------------
# Ablation tables


def _by_group(runs: pd.DataFrame) -> Iterable[tuple[str, pd.DataFrame]]:
    for _, group in runs.groupby(["arch", "weights", "dataset"], sort=True):
        yield "; ".join(dict.fromkeys(group["provenance"])), group


def _summary(runs: pd.DataFrame, by: Sequence[str], methods: Sequence[str] | None = None,
             extra: Sequence[str] = ("precision", "selected")) -> pd.DataFrame:
    """Tabulate rows ``by`` (under the provenance label) with one column per method and per extra measure."""
    tested = runs[runs["target"] == runs["dataset"]]
    frames = []
    for label, group in _by_group(tested):
        names = _ordered_methods(methods or group["method"].unique())
        rows = {}
        for keys, cells in group.groupby(list(by), sort=True, dropna=False):
            keys = keys if isinstance(keys, tuple) else (keys,)
            row = {method_label(name): format_cell(cells.loc[cells["method"] == name, "top1"].tolist())
                   for name in names}
            oracle = cells["oracle"].dropna()
            if len(oracle):
                row[ORACLE_LABEL] = format_cell(oracle.tolist())
            per_file = cells.drop_duplicates("path")
            for measure in extra:
                row[_MEASURES[measure]] = format_cell(per_file[measure].dropna().tolist())
            row["seeds"] = per_file["seed"].nunique()
            rows[(label, *keys)] = row
        frame = pd.DataFrame.from_dict(rows, orient="index")
        frame.index = pd.MultiIndex.from_tuples(frame.index, names=["provenance", *by])
        frames.append(frame)
    return pd.concat(frames) if frames else pd.DataFrame({"result": ["not run: no result file found"]})


_MEASURES = {
    "precision": "pseudo-label precision of the selected set (%)",
    "selected": "selected images",
    "final_loss": "last-epoch pseudo-label loss",
}


def _load_runs(results_dir, experiment: str) -> pd.DataFrame:
    records, _ = load_records(results_dir, experiment)
    return runs_frame(records)


def _provenance_note(runs: pd.DataFrame) -> list[str]:
    labels = list(dict.fromkeys(runs["provenance"])) if len(runs) else []
    return [f"Provenance: {label}" for label in labels] or [
        "not run: no result file found; run the notebook that writes this experiment"]


def k_ablation_table(results_dir: str | Path, experiment: str = "k_ablation") -> Table:
    runs = _load_runs(results_dir, experiment)
    notes = _provenance_note(runs) + [
        "Precision is measured against the pool's true labels after the run, for analysis only; "
        "no choice of the method reads it.", _cell_note()]
    return Table("k-ablation", "accuracy and pseudo-label precision against K (images kept per class)",
                 _summary(runs, ["k"]), notes)


def beta_eta_table(results_dir: str | Path, experiment: str = "beta_eta") -> Table:
    runs = _load_runs(results_dir, experiment)
    notes = _provenance_note(runs) + [
        "Test accuracy over the grid shows sensitivity only; the defaults β = η = 1 were fixed before "
        "any run and are not chosen from this table.", _cell_note()]
    return Table("beta-eta", "accuracy over the residual weight β and the sharpness η",
                 _summary(runs, ["beta", "eta"], extra=("precision",)), notes)


def epochs_table(results_dir: str | Path, experiment: str = "epochs") -> Table:
    runs = _load_runs(results_dir, experiment)
    return Table("epochs", "accuracy and training loss against fine-tuning epochs (0: no fine-tuning)",
                 _summary(runs, ["epochs"], extra=("final_loss",)), _provenance_note(runs) + [_cell_note()])


def backbone_table(results_dir: str | Path, experiment: str = "backbones") -> Table:
    runs = _load_runs(results_dir, experiment)
    return Table("backbones", "accuracy per backbone", _summary(runs, ["arch"]),
                 _provenance_note(runs) + [_cell_note()])


def open_choices_table(results_dir: str | Path, experiment: str = "open_choices") -> Table:
    runs = _load_runs(results_dir, experiment)
    notes = _provenance_note(runs) + [
        "prompts: text classifier for pseudo-labels and adapter; prototype_views: center crop or the "
        "augmented views; fill_shortfall: top up classes with fewer than K pseudo-labelled images; "
        "n_views: augmented views per selected image.", _cell_note()]
    return Table("open-choices", "the choices the method leaves open",
                 _summary(runs, ["prompts", "prototype_views", "fill_shortfall", "n_views"]), notes)


def simulation_frame(results_dir: str | Path, experiment: str = "simulation") -> pd.DataFrame:
    """Return one row per simulation file: noise levels, K, seed, the three accuracies and the gain."""
    runs = _load_runs(results_dir, experiment)
    if not len(runs):
        return pd.DataFrame(columns=["text_noise", "image_noise", "k", "seed", "zero_shot", "training_free",
                                     "up_adapter", "gain", "precision"])
    wide = runs.pivot_table(index=["path", "text_noise", "image_noise", "k", "seed", "precision"],
                            columns="method", values="top1").reset_index()
    wide["gain"] = wide["up_adapter"] - wide["zero_shot"]
    return wide.drop(columns="path")


def simulation_table(results_dir: str | Path, experiment: str = "simulation") -> Table:
    frame = simulation_frame(results_dir, experiment)
    notes = ["Provenance: simulated CLIP-like features (upa.simulation); a simulation, not a measurement "
             "on images or a reproduction.", "Cells: mean over seeds, percentage points."]
    if not len(frame):
        return Table("simulation", "SIMULATION: gain of UP-Adapter over zero-shot",
                     pd.DataFrame({"result": ["not run: no simulation file found"]}), notes)
    summary = frame.groupby(["text_noise", "image_noise", "k"]).agg(
        zero_shot=("zero_shot", "mean"), up_adapter=("up_adapter", "mean"), gain=("gain", "mean"),
        precision=("precision", "mean"), seeds=("seed", "nunique")).round(2)
    summary.columns = ["zero-shot top-1 (%)", "UP-Adapter top-1 (%)", "gain (points)",
                       "pseudo-label precision (%)", "seeds"]
    return Table("simulation", "SIMULATION: gain of UP-Adapter over zero-shot on simulated features",
                 summary, notes)


# --------------------------------------------------------------------------------------------
# Figures


def _plt():
    import matplotlib

    if matplotlib.get_backend().lower() not in ("module://matplotlib_inline.backend_inline", "inline"):
        matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import seaborn as sns

    sns.set_theme(style="whitegrid", context="notebook")
    return plt, sns


def _tested(runs: pd.DataFrame, methods: Sequence[str]) -> pd.DataFrame:
    tested = runs[(runs["target"] == runs["dataset"]) & runs["method"].isin(methods)].copy()
    tested["method"] = tested["method"].map(method_label)
    return tested


def _label_provenance(figure, runs: pd.DataFrame) -> None:
    """Write the provenance on the figure itself, in red when a number is not a reproduction."""
    import textwrap

    labels = list(dict.fromkeys(runs["provenance"]))
    reproduction = bool(runs["reproduction"].astype(bool).all())
    text = "\n".join(textwrap.fill(label, 110) for label in labels)
    figure.suptitle(text, fontsize="small", color="black" if reproduction else "darkred")
    figure.tight_layout()


def _k_ticks(axis, values: pd.Series) -> None:
    ticks = sorted(int(k) for k in values.unique())
    axis.set_xticks(ticks, labels=[str(k) for k in ticks])
    axis.minorticks_off()


def _empty_figure(key: str, caption: str) -> Figure:
    plt, _ = _plt()
    figure, axis = plt.subplots(figsize=(6, 1.5))
    axis.axis("off")
    axis.text(0.5, 0.5, "not run: no result file found", ha="center", va="center")
    return Figure(key, caption, figure)


def k_ablation_figure(results_dir: str | Path, experiment: str = "k_ablation") -> Figure:
    runs = _load_runs(results_dir, experiment)
    caption = "accuracy and pseudo-label precision against K. " + " ".join(_provenance_note(runs))
    tested = _tested(runs, ACCURACY_METHODS)
    if not len(tested):
        return _empty_figure("k-ablation", caption)
    plt, sns = _plt()
    figure, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    sns.lineplot(data=tested, x="k", y="top1", hue="method", marker="o", errorbar="sd", ax=left)
    left.set(xscale="log", xlabel="K (images per class, log scale)", ylabel="test top-1 (%)")
    _k_ticks(left, tested["k"])
    per_file = tested.drop_duplicates("path")
    sns.lineplot(data=per_file, x="k", y="precision", marker="o", errorbar="sd", ax=right, color="black")
    right.set(xscale="log", xlabel="K (images per class, log scale)", ylabel="precision of selected pseudo-labels (%)")
    _k_ticks(right, per_file["k"])
    _label_provenance(figure, runs)
    return Figure("k-ablation", caption, figure)


def beta_eta_figure(results_dir: str | Path, experiment: str = "beta_eta") -> Figure:
    runs = _load_runs(results_dir, experiment)
    caption = ("test top-1 (%) over β (rows) and η (columns), mean over seeds; for sensitivity only, "
               "no default is chosen from it. " + " ".join(_provenance_note(runs)))
    tested = runs[(runs["target"] == runs["dataset"]) & runs["method"].isin(["training_free", "up_adapter"])]
    if not len(tested):
        return _empty_figure("beta-eta", caption)
    plt, sns = _plt()
    methods = [m for m in ("training_free", "up_adapter") if m in set(tested["method"])]
    figure, axes = plt.subplots(1, len(methods), figsize=(5.5 * len(methods), 4.2), squeeze=False)
    for axis, name in zip(axes[0], methods):
        grid = tested[tested["method"] == name].pivot_table(index="beta", columns="eta", values="top1", aggfunc="mean")
        sns.heatmap(grid, annot=True, fmt=".1f", cmap="viridis", ax=axis, cbar_kws={"label": "top-1 (%)"})
        axis.set(title=method_label(name), xlabel="η (sharpness)", ylabel="β (residual weight)")
    _label_provenance(figure, runs)
    return Figure("beta-eta", caption, figure)


def epochs_figure(results_dir: str | Path, experiment: str = "epochs") -> Figure:
    runs = _load_runs(results_dir, experiment)
    caption = "test top-1 against fine-tuning epochs. " + " ".join(_provenance_note(runs))
    tested = _tested(runs, ACCURACY_METHODS)
    if not len(tested):
        return _empty_figure("epochs", caption)
    plt, sns = _plt()
    figure, axis = plt.subplots(figsize=(6.5, 4))
    sns.lineplot(data=tested, x="epochs", y="top1", hue="method", marker="o", errorbar="sd", ax=axis)
    axis.set(xlabel="epochs", ylabel="test top-1 (%)")
    _label_provenance(figure, runs)
    return Figure("epochs", caption, figure)


def backbone_figure(results_dir: str | Path, experiment: str = "backbones") -> Figure:
    runs = _load_runs(results_dir, experiment)
    caption = "test top-1 per backbone. " + " ".join(_provenance_note(runs))
    tested = _tested(runs, ACCURACY_METHODS)
    if not len(tested):
        return _empty_figure("backbones", caption)
    plt, sns = _plt()
    figure, axis = plt.subplots(figsize=(8, 4))
    sns.barplot(data=tested, x="arch", y="top1", hue="method", errorbar="sd", ax=axis)
    axis.set(xlabel="backbone", ylabel="test top-1 (%)")
    axis.legend(fontsize="small", loc="upper left", bbox_to_anchor=(1.01, 1.0))
    _label_provenance(figure, runs)
    return Figure("backbones", caption, figure)


def simulation_figures(results_dir: str | Path, experiment: str = "simulation") -> tuple[Figure, Figure]:
    """Gain against zero-shot accuracy (noise grid) and gain against K, both labelled as simulation."""
    frame = simulation_frame(results_dir, experiment)
    label = "SIMULATION on simulated CLIP-like features (upa.simulation), not a measurement on images. "
    if not len(frame):
        return (_empty_figure("simulation-gain", label), _empty_figure("simulation-k", label))
    plt, sns = _plt()
    k_main = frame["k"].mode().iloc[0]
    # One point per noise setting (mean over seeds), joined in order of text noise.
    noise_grid = (frame[frame["k"] == k_main].groupby(["image_noise", "text_noise"], as_index=False)
                  [["zero_shot", "gain"]].mean().sort_values(["image_noise", "text_noise"]))
    noise_grid["image noise"] = noise_grid["image_noise"].map("{:g}".format)
    first, axis = plt.subplots(figsize=(6.5, 4.2))
    sns.lineplot(data=noise_grid, x="zero_shot", y="gain", hue="image noise", marker="o", sort=False, ax=axis)
    axis.axhline(0, color="grey", linewidth=1)
    axis.set(xlabel="zero-shot top-1 (%)", ylabel="UP-Adapter − zero-shot (points)",
             title=f"SIMULATION, K = {k_main}")
    first.tight_layout()

    middle = frame["text_noise"].value_counts().idxmax()
    k_grid = frame[frame["text_noise"] == middle].copy()
    k_grid["image noise"] = k_grid["image_noise"].map("{:g}".format)
    second, axis = plt.subplots(figsize=(6.5, 4.2))
    sns.lineplot(data=k_grid, x="k", y="gain", hue="image noise", marker="o", errorbar="sd", ax=axis)
    axis.axhline(0, color="grey", linewidth=1)
    axis.set(xscale="log", xlabel="K (log scale)", ylabel="UP-Adapter − zero-shot (points)",
             title=f"SIMULATION, text noise {middle:g}")
    _k_ticks(axis, k_grid["k"])
    second.tight_layout()
    return (Figure("simulation-gain", label + "Each point is one noise setting, mean over seeds; tighter "
                   "clusters (smaller image noise) and weaker zero-shot accuracy change the gain.", first),
            Figure("simulation-k", label + "Gain against K at the most common text noise; bands: sd over seeds.",
                   second))


# --------------------------------------------------------------------------------------------
# Display and collection


def show(item: Table | Figure) -> None:
    """Display a table (caption, styled frame, notes) or a figure (caption, image) in a notebook."""
    from IPython.display import Markdown, display

    if isinstance(item, Table):
        display(item.frame.style.set_caption(item.caption))
        if item.notes:
            display(Markdown("\n".join(f"- {note}" for note in item.notes)))
        return
    plt, _ = _plt()
    display(Markdown(f"**{item.title}**"))
    display(item.figure)
    plt.close(item.figure)


def all_tables(results_dir: str | Path) -> list[Table]:
    """Build every table of the study with its default columns."""
    recognition = accuracy_tables(results_dir, "recognition", RECOGNITION_COLUMNS, "recognition",
                                  "Top-1 accuracy on the recognition datasets")
    domain = accuracy_tables(results_dir, "domain_generalisation", DOMAIN_COLUMNS, "domain-generalisation",
                             "Top-1 accuracy under domain shift (adapted on the source, tested on each target)",
                             with_average=False)
    return [*recognition, *domain, k_ablation_table(results_dir), beta_eta_table(results_dir),
            epochs_table(results_dir), backbone_table(results_dir), open_choices_table(results_dir),
            simulation_table(results_dir)]


def all_figures(results_dir: str | Path) -> list[Figure]:
    return [k_ablation_figure(results_dir), beta_eta_figure(results_dir), epochs_figure(results_dir),
            backbone_figure(results_dir), *simulation_figures(results_dir)]


def collect(results_dir: str | Path, out_dir: str | Path | None = None) -> list[Path]:
    """Write every table as CSV and Markdown and every figure as PNG; return the written paths."""
    out = Path(out_dir) if out_dir is not None else Path(results_dir) / "summary"
    out.mkdir(parents=True, exist_ok=True)
    written = []
    sections = []
    for table in all_tables(results_dir):
        path = out / f"{table.key}.csv"
        table.frame.to_csv(path)
        written.append(path)
        sections.append(table.to_markdown())
    plt, _ = _plt()
    for item in all_figures(results_dir):
        path = out / f"{item.key}.png"
        item.figure.savefig(path, dpi=120, bbox_inches="tight")
        plt.close(item.figure)
        written.append(path)
        sections.append(f"**{item.title}**\n\n![{item.key}]({path.name})\n")
    summary = out / "tables.md"
    summary.write_text("# Study tables, collected from the result files\n\n" + "\n".join(sections))
    written.append(summary)
    return written
