"""Grid and seed runners behind the study notebooks.

Each ``run_<notebook>`` function takes the resolved parameters of one notebook (see
``upa.notebook_params``), plans every run, checks the plan before any work starts, runs what is
missing through :func:`upa.experiments.run_and_save` with ``skip_existing`` and returns a
:class:`SweepOutcome`. A rerun with the same parameters keeps the existing result files, so an
interrupted study resumes where it stopped.

A dataset that the profile does not cover or whose folder is missing is not run. The reason is
written as a "not run" record next to where the result would be, and the report shows it
under the table. :func:`run_simulation` runs the method on simulated features
(``upa.simulation``) instead of images and labels every file it writes as a simulation.
"""

from __future__ import annotations

import itertools
import json
import logging
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch

from upa import data as data_module
from upa import demo_data, method
from upa.config import RunConfig, validate
from upa.experiments import ResultExistsError, result_path, run_and_save, slug, write_result
from upa.provenance import environment
from upa.simulation import SimulationConfig, simulate_clip_features

log = logging.getLogger(__name__)

NOT_RUN_SCHEMA = "upa.not_run/1"
SIMULATION_SCHEMA = "upa.simulation/1"
SIMULATION_DATASET = "simulated"
SIMULATION_LABEL = "simulated CLIP-like features (upa.simulation): a simulation, not a measurement on images"

# Experiment folders under the results directory, one per table or ablation.
EXPERIMENTS = {
    "recognition": "recognition",
    "domain_generalisation": "domain_generalisation",
    "k_ablation": "k_ablation",
    "beta_eta": "beta_eta",
    "epochs": "epochs",
    "backbones": "backbones",
    "open_choices": "open_choices",
    "simulation": "simulation",
}

# Builders of the embedded datasets; the demo profile writes them on first use.
_EMBEDDED_BUILDERS = {"Digits": demo_data.build_digits, "DigitsShifted": demo_data.build_digits_shifted}

# Config fields already in the file name of ``result_path`` or not affecting results.
_NAMED_FIELDS = {"dataset", "arch", "weights", "k", "beta", "eta", "seed"}
_UNNAMED_FIELDS = {"data_root", "cache_dir", "hf_cache_dir", "allow_pickle", "extract_batch_size",
                   "num_workers", "eval_datasets", "baselines", "shots", "upl_epochs", "coop_epochs"}


@dataclass
class SweepOutcome:
    """Record of a runner's work: one row per planned run (status ran, kept or not run) and the wall time."""

    experiment: str
    rows: list[dict] = field(default_factory=list)
    wall_s: float = 0.0

    def frame(self):
        import pandas as pd

        return pd.DataFrame(self.rows, columns=["status", "dataset", "backbone", "setting", "seconds", "file"])

    def count(self, status: str) -> int:
        return sum(row["status"] == status for row in self.rows)

    def summary(self) -> str:
        return (f"{self.experiment}: {self.count('ran')} run, {self.count('kept')} kept from earlier, "
                f"{self.count('not run')} not run; {self.wall_s:.0f} s wall time")


# --------------------------------------------------------------------------------------------
# Setup and planning


def prepare(params: Mapping[str, Any]) -> torch.device:
    """Register extra open_clip model configs and resolve the device of a notebook's parameters."""
    from upa.cli import resolve_device

    if params.get("model_config_dir"):
        import open_clip

        folder = Path(params["model_config_dir"])
        if not folder.is_dir():
            raise FileNotFoundError(f"model_config_dir {folder} is not a folder of open_clip model config JSON files")
        open_clip.add_model_config(folder)
    return resolve_device(params.get("device", "auto"))


def check_names(params: Mapping[str, Any], datasets: Sequence[str], archs: Sequence[str]) -> None:
    """Reject unknown dataset and backbone names and impossible settings before any data is written.

    Registers ``model_config_dir`` first, so its backbones count as known.
    """
    prepare(params)
    for dataset in datasets:
        data_module.get_spec(dataset)
    for arch in archs:
        validate(base_config(params, datasets[0], arch))


def base_config(params: Mapping[str, Any], dataset: str, arch: str | None = None) -> RunConfig:
    """Build the RunConfig a notebook's parameters describe for one dataset and backbone."""
    return RunConfig(
        dataset=data_module.get_spec(dataset).name,
        data_root=str(params["data_root"]),
        arch=arch or params["backbone"],
        weights=params["weights"],
        k=params["k"],
        beta=params["beta"],
        eta=params["eta"],
        epochs=params["epochs"],
        n_views=params["n_views"],
        cache_dir=str(params["cache_dir"]),
        hf_cache_dir=params.get("hf_cache_dir"),
        extract_batch_size=params["extract_batch_size"],
        num_workers=params["num_workers"],
        baselines=tuple(params.get("baselines", ())),
        shots=params.get("shots", RunConfig.shots),
        upl_epochs=params.get("upl_epochs", RunConfig.upl_epochs),
        coop_epochs=params.get("coop_epochs", RunConfig.coop_epochs),
    )


def sweep_result_path(config: RunConfig, results_dir: str | Path, experiment: str) -> Path:
    """Return the result file of ``config``: ``result_path``'s name plus every other setting off its default.

    ``result_path`` names backbone, weights, K, β, η and seed only. An ablation of epochs or
    prompts needs the varied setting in the name too, because otherwise its runs would share one file.
    """
    default = RunConfig()
    extras = [
        f"{name}-{slug(str(value))}" for name, value in config.as_dict().items()
        if name not in _NAMED_FIELDS | _UNNAMED_FIELDS and value != getattr(default, name)
    ]
    path = result_path(config, results_dir, experiment)
    if not extras:
        return path
    stem, seed_part = path.stem.rsplit("__", 1)
    return path.with_name(f"{stem}__{'_'.join(extras)}__{seed_part}{path.suffix}")


def ensure_dataset(params: Mapping[str, Any], dataset: str, splits: Sequence[str]) -> str | None:
    """Build an embedded dataset if needed and return why ``dataset`` cannot run, or None if it can.

    A missing folder or split file is returned as the reason with ``missing_data="skip"`` and
    raised with ``missing_data="error"``.
    """
    spec = data_module.get_spec(dataset)
    if spec.name in _EMBEDDED_BUILDERS:
        _EMBEDDED_BUILDERS[spec.name](params["data_root"])
    try:
        for split in splits:
            data_module.load_split(params["data_root"], spec.name, split)
    except FileNotFoundError as error:
        if params.get("missing_data", "skip") == "error":
            raise
        log.warning("%s is not run: %s", spec.name, error)
        return f"data not found: {error}"
    return None


def _not_run_path(results_dir: str | Path, experiment: str, dataset: str, arch: str, weights: str) -> Path:
    weights_part = slug(weights.split(":", 1)[-1] if ":" in weights else weights)[:40]
    return Path(results_dir) / experiment / dataset / f"not-run__{slug(arch)}__{weights_part}.json"


def record_not_run(results_dir: str | Path, experiment: str, dataset: str, arch: str, weights: str,
                   reason: str, profile: str) -> Path:
    """Write why ``dataset`` was not run for this backbone and weights; the report shows the reason."""
    record = {
        "schema": NOT_RUN_SCHEMA,
        "experiment": experiment,
        "dataset": dataset,
        "arch": arch,
        "weights": weights,
        "profile": profile,
        "reason": reason,
        "created_utc": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    return write_result(record, _not_run_path(results_dir, experiment, dataset, arch, weights), overwrite=True)


def _clear_not_run(results_dir, experiment: str, datasets: Iterable[str], arch: str, weights: str) -> None:
    for dataset in datasets:
        _not_run_path(results_dir, experiment, dataset, arch, weights).unlink(missing_ok=True)


def _setting(config: RunConfig, varied: Sequence[str]) -> str:
    return ", ".join(f"{name}={getattr(config, name)}" for name in varied)


def run_configs(configs: Sequence[RunConfig], params: Mapping[str, Any], experiment: str,
                varied: Sequence[str] = (), outcome: SweepOutcome | None = None) -> SweepOutcome:
    """Run each config unless its result file exists with the same config, and record the outcome.

    Every config is validated and every output path computed before the first run starts.
    ``varied`` names the settings shown in the outcome rows.
    """
    outcome = outcome or SweepOutcome(experiment)
    device = prepare(params)
    for config in configs:
        validate(config)
    planned = [(config, sweep_result_path(config, params["results_dir"], experiment)) for config in configs]
    start = time.perf_counter()
    for config, path in planned:
        existed = path.exists() and not params.get("overwrite", False)
        run_start = time.perf_counter()
        run_and_save(config, device, output=path, overwrite=params.get("overwrite", False),
                     skip_existing=True, progress=False)
        _clear_not_run(params["results_dir"], experiment, (config.dataset, *config.eval_datasets),
                       config.arch, config.weights)
        outcome.rows.append({
            "status": "kept" if existed else "ran", "dataset": config.dataset, "backbone": config.arch,
            "setting": _setting(config, ("seed", *varied)), "seconds": round(time.perf_counter() - run_start, 1),
            "file": str(path),
        })
    outcome.wall_s += time.perf_counter() - start
    log.info(outcome.summary())
    return outcome


def _add_not_run(outcome: SweepOutcome, params, experiment, dataset, arch, reason) -> None:
    path = record_not_run(params["results_dir"], experiment, dataset, arch, params["weights"], reason,
                          params["profile"])
    outcome.rows.append({"status": "not run", "dataset": dataset, "backbone": arch, "setting": reason,
                         "seconds": 0.0, "file": str(path)})


def _seeded(configs: Iterable[RunConfig], seeds: Sequence[int]) -> list[RunConfig]:
    return [config.replace(seed=seed) for config in configs for seed in seeds]


# --------------------------------------------------------------------------------------------
# One runner per notebook


def run_recognition(params: Mapping[str, Any]) -> SweepOutcome:
    """Run every dataset of ``params["datasets"]`` for each seed.

    Each of the 11 benchmark datasets missing from ``params["datasets"]`` is recorded as not run, with the reason.
    """
    from upa.notebook_params import RECOGNITION_DATASETS

    experiment = EXPERIMENTS["recognition"]
    outcome = SweepOutcome(experiment)
    check_names(params, params["datasets"], [params["backbone"]])
    requested = [data_module.get_spec(name).name for name in params["datasets"]]
    for name in RECOGNITION_DATASETS:
        if name not in requested:
            reason = (f"the {params['profile']} profile runs {', '.join(requested)} only"
                      + ("; run profile='gpu' with the CoOp datasets under data_root" if params["profile"] == "demo"
                         else "; add it to the datasets parameter"))
            _add_not_run(outcome, params, experiment, name, params["backbone"], reason)

    configs = []
    for name in requested:
        reason = ensure_dataset(params, name, ("train", "test"))
        if reason:
            _add_not_run(outcome, params, experiment, name, params["backbone"], reason)
        else:
            configs.append(base_config(params, name))
    return run_configs(_seeded(configs, params["seeds"]), params, experiment, outcome=outcome)


def run_domain_generalisation(params: Mapping[str, Any]) -> SweepOutcome:
    """Adapt on ``source`` and evaluate on each target whose data is present; absent targets are not run."""
    experiment = EXPERIMENTS["domain_generalisation"]
    outcome = SweepOutcome(experiment)
    check_names(params, [params["source"], *params["targets"]], [params["backbone"]])
    source = data_module.get_spec(params["source"]).name
    targets = []
    for name in params["targets"]:
        target = data_module.get_spec(name).name
        reason = ensure_dataset(params, target, ("test",))
        if reason:
            _add_not_run(outcome, params, experiment, target, params["backbone"], reason)
        else:
            targets.append(target)
    reason = ensure_dataset(params, source, ("train", "test"))
    if not reason:
        _check_same_classes(params["data_root"], source, targets)
    if reason:
        _add_not_run(outcome, params, experiment, source, params["backbone"], reason)
        for target in targets:
            _add_not_run(outcome, params, experiment, target, params["backbone"],
                         f"the source dataset {source} is not available, so nothing was adapted")
        return outcome
    config = base_config(params, source).replace(eval_datasets=tuple(targets))
    return run_configs(_seeded([config], params["seeds"]), params, experiment, outcome=outcome)


def _check_same_classes(data_root, source: str, targets: Sequence[str]) -> None:
    """Reject targets whose class names differ from the source's: the adapter predicts the source classes."""
    classes = data_module.load_split(data_root, source, "test").classnames
    for target in targets:
        target_classes = data_module.load_split(data_root, target, "test").classnames
        if target_classes != classes:
            raise ValueError(
                f"target {target} has {len(target_classes)} classes that differ from the {len(classes)} "
                f"classes of the source {source}; a domain-shift target must share the source's class names"
            )


def _single_dataset(params, outcomes: Sequence[SweepOutcome], arch: str | None = None) -> RunConfig | None:
    """Return the run config of ``params["dataset"]``, or None after recording it as not run in each outcome."""
    check_names(params, [params["dataset"]], [arch or params["backbone"]])
    dataset = data_module.get_spec(params["dataset"]).name
    reason = ensure_dataset(params, dataset, ("train", "test"))
    if reason:
        for outcome in outcomes:
            _add_not_run(outcome, params, outcome.experiment, dataset, arch or params["backbone"], reason)
        return None
    return base_config(params, dataset, arch)


def run_k_ablation(params: Mapping[str, Any]) -> SweepOutcome:
    """Run each K of ``k_values``, largest first so smaller K reuse the cached augmented views."""
    experiment = EXPERIMENTS["k_ablation"]
    outcome = SweepOutcome(experiment)
    base = _single_dataset(params, [outcome])
    if base is None:
        return outcome
    configs = [base.replace(k=k) for k in sorted(params["k_values"], reverse=True)]
    return run_configs(_seeded(configs, params["seeds"]), params, experiment, ("k",), outcome)


def run_beta_eta_epochs(params: Mapping[str, Any]) -> tuple[SweepOutcome, SweepOutcome]:
    """Run the β × η grid and the epochs ablation on one dataset; returns both outcomes."""
    grid_outcome = SweepOutcome(EXPERIMENTS["beta_eta"])
    epochs_outcome = SweepOutcome(EXPERIMENTS["epochs"])
    base = _single_dataset(params, [grid_outcome, epochs_outcome])
    if base is None:
        return grid_outcome, epochs_outcome
    grid = [base.replace(beta=beta, eta=eta) for beta, eta in itertools.product(params["betas"], params["etas"])]
    run_configs(_seeded(grid, params["seeds"]), params, grid_outcome.experiment, ("beta", "eta"), grid_outcome)
    epochs = [base.replace(epochs=value) for value in params["epoch_values"]]
    run_configs(_seeded(epochs, params["seeds"]), params, epochs_outcome.experiment, ("epochs",), epochs_outcome)
    return grid_outcome, epochs_outcome


def run_backbones(params: Mapping[str, Any]) -> SweepOutcome:
    """Run one dataset with each backbone of ``backbones`` (any open_clip model name)."""
    experiment = EXPERIMENTS["backbones"]
    outcome = SweepOutcome(experiment)
    check_names(params, [params["dataset"]], params["backbones"])
    configs = []
    for arch in params["backbones"]:
        config = _single_dataset(params, [outcome], arch)
        if config is not None:
            configs.append(config)
    return run_configs(_seeded(configs, params["seeds"]), params, experiment, ("arch",), outcome)


def run_open_choices(params: Mapping[str, Any]) -> SweepOutcome:
    """Run the choices the method leaves open: prompts × prototype views × K shortfall rule, then n_views."""
    experiment = EXPERIMENTS["open_choices"]
    outcome = SweepOutcome(experiment)
    base = _single_dataset(params, [outcome])
    if base is None:
        return outcome
    choices = itertools.product(params["prompt_choices"], params["prototype_view_choices"],
                                params["fill_shortfall_choices"])
    configs = [base.replace(prompts=prompts, prototype_views=views, fill_shortfall=rule == "fill")
               for prompts, views, rule in choices]
    configs += [base.replace(n_views=n) for n in params["n_views_values"]]
    unique = list(dict.fromkeys(configs))
    return run_configs(_seeded(unique, params["seeds"]), params, experiment,
                       ("prompts", "prototype_views", "fill_shortfall", "n_views"), outcome)


# --------------------------------------------------------------------------------------------
# Simulation


def simulate_run(simulation: SimulationConfig, k: int, beta: float, eta: float, epochs: int,
                 features=None) -> dict:
    """Run zero-shot, training-free prototypes and UP-Adapter on simulated features; return metrics.

    ``features`` may pass a ``simulate_clip_features(simulation)`` draw to reuse. The training
    generator is seeded with ``simulation.seed``.
    """
    if features is None:
        features = simulate_clip_features(simulation)
    scale = simulation.logit_scale
    text = features.text_weights
    probs = method.zero_shot_logits(features.train_features, text, scale).softmax(dim=1)
    selection = method.select_confident(probs, k)
    prototypes = method.class_prototypes(features.train_features[selection.indices], selection.labels,
                                         simulation.num_classes, fallback=text)
    losses: list[float] = []
    adapted = prototypes
    if epochs > 0:
        training = method.AdapterTraining(epochs=epochs)
        adapted, losses = method.train_prototype_adapter(
            features.train_features[selection.indices], selection.labels, text, prototypes, scale, beta, eta,
            training, torch.Generator().manual_seed(simulation.seed), progress=False,
        )
    test = features.test_features
    logits = {
        "zero_shot": method.zero_shot_logits(test, text, scale),
        "training_free": method.up_adapter_logits(test, text, prototypes, scale, beta, eta),
        "up_adapter": method.up_adapter_logits(test, text, adapted, scale, beta, eta),
    }
    true_selected = features.train_labels[selection.indices]
    precision = 100.0 * (true_selected == selection.labels).float().mean().item()
    return {
        "metrics": {"test": {name: round(method.accuracy(value, features.test_labels), 4)
                             for name, value in logits.items()}},
        "pseudo_labels": {
            "pool_size": len(features.train_labels),
            "selected": len(selection.indices),
            "short_classes": int((selection.counts < k).sum()),
            "precision_of_selected_percent": round(precision, 4),
        },
        "training": {"epoch_losses": [round(x, 6) for x in losses], "logit_scale": scale},
    }


def _simulation_path(results_dir, text_noise, image_noise, k, beta, eta, epochs, seed) -> Path:
    name = f"tn{text_noise:g}_in{image_noise:g}_k{k}_b{beta:g}_e{eta:g}_ep{epochs}__seed{seed}.json"
    return Path(results_dir) / EXPERIMENTS["simulation"] / SIMULATION_DATASET / name


def _simulation_plan(params: Mapping[str, Any]) -> list[tuple[float, float, int]]:
    """(text noise, image noise, K): the noise grid at K = ``k``, then K at the middle text noise."""
    noise_grid = [(t, i, params["k"]) for t, i in itertools.product(params["text_noises"], params["image_noises"])]
    middle = sorted(params["text_noises"])[len(params["text_noises"]) // 2]
    k_grid = [(middle, i, k) for i, k in itertools.product(params["image_noises"], params["k_values"])]
    return list(dict.fromkeys(noise_grid + k_grid))


def run_simulation(params: Mapping[str, Any]) -> SweepOutcome:
    """Run the method on simulated features over noise levels and K; one labelled JSON file per run."""
    outcome = SweepOutcome(EXPERIMENTS["simulation"])
    start = time.perf_counter()
    drawn: dict[SimulationConfig, Any] = {}
    env = environment(torch.device("cpu"))
    for seed in params["seeds"]:
        for text_noise, image_noise, k in _simulation_plan(params):
            simulation = SimulationConfig(
                num_classes=params["num_classes"], train_per_class=params["train_per_class"],
                test_per_class=params["test_per_class"], dim=params["dim"], image_noise=image_noise,
                text_noise=text_noise, modality_gap=params["modality_gap"], seed=seed,
            )
            config = {"simulation": simulation.as_dict(), "k": k, "beta": params["beta"], "eta": params["eta"],
                      "epochs": params["epochs"], "seed": seed}
            path = _simulation_path(params["results_dir"], text_noise, image_noise, k, params["beta"],
                                    params["eta"], params["epochs"], seed)
            status = _keep_or_run_simulation(path, config, params, simulation, drawn, env)
            outcome.rows.append({"status": status, "dataset": SIMULATION_DATASET, "backbone": "none",
                                 "setting": f"text_noise={text_noise:g}, image_noise={image_noise:g}, k={k}, "
                                            f"seed={seed}", "seconds": 0.0, "file": str(path)})
    outcome.wall_s = time.perf_counter() - start
    log.info(outcome.summary())
    return outcome


def _keep_or_run_simulation(path: Path, config: dict, params, simulation, drawn: dict, env: dict) -> str:
    overwrite = params.get("overwrite", False)
    if path.exists() and not overwrite:
        if json.loads(path.read_text()).get("config") != config:
            raise ResultExistsError(f"result file {path} exists but was made with another config; "
                                    f"delete it or set overwrite=True")
        return "kept"
    if simulation not in drawn:
        drawn[simulation] = simulate_clip_features(simulation)
    result = simulate_run(simulation, config["k"], config["beta"], config["eta"], config["epochs"],
                          drawn[simulation])
    record = {
        "schema": SIMULATION_SCHEMA,
        "provenance_label": SIMULATION_LABEL,
        "reproduction": False,
        "config": config,
        "seed": config["seed"],
        **result,
        "weights": {"kind": "none", "arch": "none", "random_init": False,
                    "note": "no model: features are drawn from upa.simulation's generative model"},
        "data": {"dataset": SIMULATION_DATASET, "kind": "simulated features"},
        "environment": env,
    }
    write_result(record, path, overwrite=True)
    return "ran"
