"""Declared parameters of the study notebooks and their check before any work starts.

Each notebook has one cell tagged ``parameters``. papermill inserts an ``injected-parameters``
cell after it, so the notebook's globals hold the declared defaults overwritten by the injected
values. :func:`validate_parameters` compares those globals with the declaration in
``NOTEBOOKS``: an unknown name, a value of the wrong type or an impossible value raises
:class:`ParameterError` naming the parameter, what it accepts and the value received.

A parameter whose notebook value is None takes the default of the chosen profile:

- ``demo``: the embedded Digits data, randomly initialised encoders, a CPU-sized grid.
- ``gpu``: the real datasets in the CoOp layout and OpenAI's pretrained weights.
"""

from __future__ import annotations

import types
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from upa.baselines import METHODS as BASELINE_METHODS
from upa.config import RunConfig

PROFILES = ("demo", "gpu")
_RUN_DEFAULTS = RunConfig()

# The 11 datasets of the recognition table, in the column order of CoOp and Tip-Adapter.
RECOGNITION_DATASETS = (
    "ImageNet", "Caltech101", "OxfordPets", "StanfordCars", "Flowers102", "Food101",
    "FGVCAircraft", "SUN397", "DTD", "EuroSAT", "UCF101",
)
DOMAIN_SHIFT_TARGETS = ("ImageNetV2", "ImageNetSketch", "ImageNetA", "ImageNetR")
K_VALUES = (1, 2, 4, 8, 16, 32, 64)
PAPER_BACKBONES = ("RN50", "RN101", "ViT-B-32", "ViT-B-16")

# Names a kernel defines on its own; they are never parameters.
_KERNEL_NAMES = frozenset({"In", "Out", "get_ipython", "exit", "quit", "open"})


class ParameterError(ValueError):
    """A notebook parameter that is unknown, of the wrong type, or impossible."""


@dataclass(frozen=True)
class Parameter:
    """One notebook parameter.

    ``kind`` is one of "str", "int", "float", "bool", "list[str]", "list[int]", "list[float]".
    ``defaults`` maps a profile to the value used when the notebook leaves the parameter at
    None. A parameter without a profile default must be set, unless it is ``optional``.
    ``check`` returns an error text for an impossible value, or None.
    """

    name: str
    kind: str
    help: str
    defaults: Mapping[str, Any] = field(default_factory=dict)
    optional: bool = False
    check: Callable[[Any], str | None] | None = None


def _at_least(minimum: float) -> Callable[[Any], str | None]:
    def check(value):
        values = value if isinstance(value, list) else [value]
        bad = [v for v in values if v < minimum]
        return f"every value must be >= {minimum}, got {bad}" if bad else None
    return check


def _above(minimum: float) -> Callable[[Any], str | None]:
    def check(value):
        values = value if isinstance(value, list) else [value]
        bad = [v for v in values if v <= minimum]
        return f"every value must be > {minimum}, got {bad}" if bad else None
    return check


def _one_of(choices: tuple) -> Callable[[Any], str | None]:
    def check(value):
        values = value if isinstance(value, list) else [value]
        bad = [v for v in values if v not in choices]
        return f"must be one of {list(choices)}, got {bad}" if bad else None
    return check


def _non_empty_unique(value) -> str | None:
    if not value:
        return "must list at least one value"
    if len(set(value)) != len(value):
        return f"lists a value twice: {value}"
    return None


def _all(*checks: Callable[[Any], str | None]) -> Callable[[Any], str | None]:
    def check(value):
        for single in checks:
            error = single(value)
            if error:
                return error
        return None
    return check


def _both(value: Any) -> dict[str, Any]:
    return {"demo": value, "gpu": value}


def _common() -> list[Parameter]:
    """Parameters every image notebook shares: profile, paths, model and run settings."""
    return [
        Parameter("profile", "str", "demo (embedded Digits, random-init encoder, CPU) or gpu (real data, "
                  "pretrained weights)", _both("demo"), check=_one_of(PROFILES)),
        Parameter("data_root", "str", "folder holding the datasets in the CoOp layout", _both("../data")),
        Parameter("results_dir", "str", "folder the result JSON files go to", _both("../results")),
        Parameter("cache_dir", "str", "feature cache folder, shared by all notebooks", _both("../.cache/upa")),
        Parameter("hf_cache_dir", "str", "Hugging Face hub cache for pretrained tags (None: the environment's)",
                  optional=True),
        Parameter("model_config_dir", "str", "extra folder of open_clip model config JSON files to register "
                  "(None: open_clip's own configs only)", optional=True),
        Parameter("device", "str", "auto, cpu, cuda or cuda:N", _both("auto")),
        Parameter("weights", "str", "random, pretrained:TAG or file:PATH",
                  {"demo": "random", "gpu": "pretrained:openai"}),
        # Every number is a mean ± std over three seeds, in the demo profile too.
        Parameter("seeds", "list[int]", "seeds of augmentation and training", _both([0, 1, 2]),
                  check=_all(_non_empty_unique, _at_least(0))),
        Parameter("k", "int", "pseudo-labelled images kept per class", _both(16), check=_at_least(1)),
        Parameter("beta", "float", "residual weight of the affinity term", _both(_RUN_DEFAULTS.beta),
                  check=_at_least(0)),
        Parameter("eta", "float", "sharpness of the affinity", _both(_RUN_DEFAULTS.eta), check=_above(0)),
        Parameter("epochs", "int", "fine-tuning epochs of the prototype layer", _both(20), check=_at_least(0)),
        Parameter("n_views", "int", "augmented views cached per selected image", {"demo": 2, "gpu": 10},
                  check=_at_least(1)),
        Parameter("num_workers", "int", "DataLoader worker processes", {"demo": 2, "gpu": 8}, check=_at_least(0)),
        Parameter("extract_batch_size", "int", "images per batch during feature extraction",
                  {"demo": 64, "gpu": 256}, check=_at_least(1)),
        Parameter("overwrite", "bool", "replace existing result files instead of keeping them", _both(False)),
        Parameter("missing_data", "str", "what a missing dataset folder does: skip (recorded as not run) or error",
                  _both("skip"), check=_one_of(("skip", "error"))),
    ]


def _backbone(demo: str = "ViT-B-32", gpu: str = "RN50") -> Parameter:
    return Parameter("backbone", "str", "open_clip model name", {"demo": demo, "gpu": gpu})


def _dataset(demo: str = "Digits", gpu: str = "ImageNet") -> Parameter:
    return Parameter("dataset", "str", "dataset the ablation adapts to", {"demo": demo, "gpu": gpu})


def _baselines() -> list[Parameter]:
    """Parameters of the peer baselines, shared by the notebooks whose tables show them."""
    return [
        Parameter("baselines", "list[str]", "peer baselines run on the same cached features",
                  _both(list(BASELINE_METHODS)), check=_one_of(BASELINE_METHODS)),
        Parameter("shots", "int", "labelled train images per class for the supervised baselines", _both(8),
                  check=_at_least(1)),
        # The demo runs the prompt learners for 2 epochs so that the chapter fits a CPU; the gpu
        # profile uses UPL's 50 and CoOp's 200.
        Parameter("upl_epochs", "int", "UPL prompt-learning epochs", {"demo": 2, "gpu": 50}, check=_at_least(1)),
        Parameter("coop_epochs", "int", "CoOp prompt-learning epochs", {"demo": 2, "gpu": 200},
                  check=_at_least(1)),
    ]


_RECOGNITION = [
    *_common(),
    _backbone(),
    Parameter("datasets", "list[str]", "datasets to adapt to, one run each",
              {"demo": ["Digits"], "gpu": list(RECOGNITION_DATASETS)}, check=_non_empty_unique),
    *_baselines(),
]

_DOMAIN = [
    *_common(),
    _backbone(),
    Parameter("source", "str", "dataset the adapter is trained on", {"demo": "Digits", "gpu": "ImageNet"}),
    Parameter("targets", "list[str]", "test-only datasets evaluated with the adapted model",
              {"demo": ["DigitsShifted"], "gpu": list(DOMAIN_SHIFT_TARGETS)}, check=_non_empty_unique),
    *_baselines(),
]

_K_ABLATION = [
    *_common(),
    _backbone(),
    _dataset(),
    Parameter("k_values", "list[int]", "values of K to run", _both(list(K_VALUES)),
              check=_all(_non_empty_unique, _at_least(1))),
]

_BETA_ETA = [
    *_common(),
    _backbone(),
    _dataset(),
    Parameter("betas", "list[float]", "residual weights of the heat map",
              {"demo": [1.0, 4.0, 18.72], "gpu": [0.0, 1.0, 4.0, 8.0, 18.72, 32.0]},
              check=_all(_non_empty_unique, _at_least(0))),
    Parameter("etas", "list[float]", "sharpness values of the heat map",
              {"demo": [0.5, 1.0, 4.0], "gpu": [0.5, 1.0, 2.0, 4.0, 8.0]},
              check=_all(_non_empty_unique, _above(0))),
    Parameter("epoch_values", "list[int]", "training epochs of the epochs ablation",
              {"demo": [0, 1, 5, 20, 50], "gpu": [0, 1, 5, 10, 20, 50]},
              check=_all(_non_empty_unique, _at_least(0))),
]

_BACKBONES = [
    *_common(),
    _dataset(),
    Parameter("backbones", "list[str]", "open_clip model names, one run each",
              {"demo": ["ViT-S-32", "ViT-B-32"], "gpu": list(PAPER_BACKBONES)}, check=_non_empty_unique),
]

_OPEN_CHOICES = [
    *_common(),
    _backbone(),
    _dataset(),
    Parameter("prompt_choices", "list[str]", "text classifiers for pseudo-labels and adapter",
              _both(["single", "ensemble"]), check=_all(_non_empty_unique, _one_of(("single", "ensemble")))),
    Parameter("prototype_view_choices", "list[str]", "prototype sources: center crop or augmented views",
              _both(["center", "augmented"]), check=_all(_non_empty_unique, _one_of(("center", "augmented")))),
    Parameter("fill_shortfall_choices", "list[str]", "K shortfall rules: keep (fewer images) or fill",
              _both(["keep", "fill"]), check=_all(_non_empty_unique, _one_of(("keep", "fill")))),
    Parameter("n_views_values", "list[int]", "augmented views per image in the augmentation ablation",
              {"demo": [1, 2, 4], "gpu": [1, 5, 10, 20]}, check=_all(_non_empty_unique, _at_least(1))),
]

_SIMULATION = [
    Parameter("profile", "str", "demo or gpu; the simulation needs neither data nor weights, so both "
              "profiles run the same grid", _both("demo"), check=_one_of(PROFILES)),
    Parameter("results_dir", "str", "folder the result JSON files go to", _both("../results")),
    Parameter("overwrite", "bool", "replace existing result files instead of keeping them", _both(False)),
    Parameter("seeds", "list[int]", "seeds of the simulated features and of training", _both([0, 1, 2]),
              check=_all(_non_empty_unique, _at_least(0))),
    Parameter("text_noises", "list[float]", "text noise levels (larger: worse zero-shot accuracy)",
              _both([1.0, 2.0, 3.0, 4.0, 6.0]), check=_all(_non_empty_unique, _at_least(0))),
    Parameter("image_noises", "list[float]", "image noise levels (larger: looser clusters)",
              _both([0.25, 0.5, 1.0, 2.0]), check=_all(_non_empty_unique, _at_least(0))),
    Parameter("k_values", "list[int]", "values of K", _both(list(K_VALUES)),
              check=_all(_non_empty_unique, _at_least(1))),
    Parameter("k", "int", "K used in the noise grid", _both(16), check=_at_least(1)),
    Parameter("beta", "float", "residual weight", _both(_RUN_DEFAULTS.beta), check=_at_least(0)),
    Parameter("eta", "float", "sharpness", _both(_RUN_DEFAULTS.eta), check=_above(0)),
    Parameter("epochs", "int", "fine-tuning epochs", _both(20), check=_at_least(0)),
    Parameter("num_classes", "int", "simulated classes", _both(10), check=_at_least(2)),
    Parameter("train_per_class", "int", "unlabeled pool images per class", _both(100), check=_at_least(1)),
    Parameter("test_per_class", "int", "test images per class", _both(100), check=_at_least(1)),
    Parameter("dim", "int", "feature width D", _both(128), check=_at_least(2)),
    Parameter("modality_gap", "float", "norm of the image and text offsets", _both(2.0), check=_at_least(0)),
]

NOTEBOOKS: dict[str, list[Parameter]] = {
    "recognition": _RECOGNITION,
    "domain_generalisation": _DOMAIN,
    "k_ablation": _K_ABLATION,
    "beta_eta_epochs": _BETA_ETA,
    "backbones": _BACKBONES,
    "open_choices": _OPEN_CHOICES,
    "simulation": _SIMULATION,
}


def declared(notebook: str) -> dict[str, Parameter]:
    """Return the parameters of ``notebook`` by name."""
    if notebook not in NOTEBOOKS:
        raise ParameterError(f"unknown notebook {notebook!r}; declared notebooks: {', '.join(NOTEBOOKS)}")
    return {parameter.name: parameter for parameter in NOTEBOOKS[notebook]}


def profile_default(notebook: str, parameter: Parameter, profile: str) -> Any:
    value = parameter.defaults.get(profile)
    return list(value) if isinstance(value, list) else value


def _type_error(parameter: Parameter, value: Any) -> str | None:
    """Return why ``value`` does not fit ``parameter.kind``, or None if it fits."""
    def scalar_ok(kind: str, item: Any) -> bool:
        if kind == "str":
            return isinstance(item, str)
        if kind == "bool":
            return isinstance(item, bool)
        if kind == "int":
            return isinstance(item, int) and not isinstance(item, bool)
        if kind == "float":
            return isinstance(item, (int, float)) and not isinstance(item, bool)
        raise AssertionError(f"undeclared kind {kind}")

    if parameter.kind.startswith("list["):
        inner = parameter.kind[5:-1]
        if not isinstance(value, (list, tuple)):
            return f"must be a list of {inner}, got {type(value).__name__} {value!r}"
        bad = [item for item in value if not scalar_ok(inner, item)]
        if bad:
            return f"must be a list of {inner}, but contains {', '.join(f'{type(b).__name__} {b!r}' for b in bad)}"
        return None
    if not scalar_ok(parameter.kind, value):
        return f"must be a {parameter.kind}, got {type(value).__name__} {value!r}"
    return None


def _user_names(namespace: Mapping[str, Any]) -> dict[str, Any]:
    """Keep the names a parameters or injected-parameters cell can have set."""
    return {
        name: value for name, value in namespace.items()
        if not name.startswith("_") and name not in _KERNEL_NAMES
        and not isinstance(value, (types.ModuleType, types.FunctionType, types.BuiltinFunctionType, type))
    }


def validate_parameters(namespace: Mapping[str, Any], notebook: str) -> dict[str, Any]:
    """Check a notebook's globals against its declaration and return the resolved parameters.

    Call it right after the parameters cell (and papermill's injected cell) with ``globals()``.
    None values take the profile default. Lists come back as lists, floats as floats.
    Raises ParameterError listing every problem found.
    """
    parameters = declared(notebook)
    assigned = _user_names(namespace)
    problems = []

    unknown = sorted(set(assigned) - set(parameters))
    if unknown:
        problems.append(
            f"unknown parameter(s) {', '.join(unknown)}; notebook {notebook} accepts: {', '.join(parameters)}"
        )
    profile = assigned.get("profile", "demo")
    if profile not in PROFILES:
        problems.append(f"parameter 'profile' must be one of {list(PROFILES)}, got {profile!r}")
        profile = "demo"

    resolved = {}
    for name, parameter in parameters.items():
        value = assigned.get(name)
        if value is None:
            value = profile_default(notebook, parameter, profile)
        if value is None:
            if not parameter.optional:
                problems.append(f"parameter {name!r} ({parameter.help}) has no default in profile {profile}; set it")
            resolved[name] = None
            continue
        error = _type_error(parameter, value)
        if error is None and parameter.check is not None:
            error = parameter.check(list(value) if isinstance(value, tuple) else value)
        if error:
            problems.append(f"parameter {name!r} ({parameter.help}) {error}")
        resolved[name] = _normalise(parameter, value)

    if problems:
        raise ParameterError(f"invalid parameters for notebook {notebook}:\n- " + "\n- ".join(problems))
    return resolved


def _normalise(parameter: Parameter, value: Any) -> Any:
    if parameter.kind == "float":
        return float(value)
    if parameter.kind == "list[float]":
        return [float(item) for item in value]
    if parameter.kind.startswith("list["):
        return list(value)
    return value


def describe(resolved: Mapping[str, Any], notebook: str) -> list[dict[str, Any]]:
    """Return one row per parameter (name, value, meaning) for display in the notebook."""
    parameters = declared(notebook)
    return [{"parameter": name, "value": resolved[name], "meaning": parameters[name].help} for name in parameters]


def parameters_cell(notebook: str) -> str:
    """Render the source of ``notebook``'s ``parameters`` cell from its declarations.

    A parameter whose default is the same in both profiles shows that value; one that differs
    shows None and names both defaults in its comment. Use it to rewrite the cell after a
    declaration changes: ``python -m upa.notebook_params NOTEBOOK.ipynb ...``.
    """
    lines = ["# Parameters (papermill overrides them). None takes the profile's default, shown in the comment."]
    for name, parameter in declared(notebook).items():
        demo = profile_default(notebook, parameter, "demo")
        gpu = profile_default(notebook, parameter, "gpu")
        comment = parameter.help
        if name == "profile":
            value = "demo"
        elif demo == gpu:
            value = demo
        else:
            value = None
            comment += f"; demo: {demo!r}, gpu: {gpu!r}"
        lines.append(f"{name} = {value!r}  # {comment}")
    return "\n".join(lines)


def _rewrite_parameters_cells(paths: list[str]) -> None:
    import json
    from pathlib import Path

    for path in map(Path, paths):
        notebook = json.loads(path.read_text())
        cells = [cell for cell in notebook["cells"] if "parameters" in cell.get("metadata", {}).get("tags", [])]
        if len(cells) != 1:
            raise SystemExit(f"{path}: expected exactly one cell tagged 'parameters', found {len(cells)}")
        source = parameters_cell(path.stem)
        cells[0]["source"] = source.splitlines(keepends=True)
        path.write_text(json.dumps(notebook, indent=1, ensure_ascii=False) + "\n")


if __name__ == "__main__":
    import sys

    _rewrite_parameters_cells(sys.argv[1:])
