"""The settings of one run, with defaults and the checks made before any work starts."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

PROMPT_CHOICES = ("single", "ensemble")
PROTOTYPE_VIEW_CHOICES = ("center", "augmented")


@dataclass(frozen=True)
class RunConfig:
    """One UP-Adapter run on one dataset, optionally evaluated on shifted target datasets.

    UP-Adapter's β and η are not public and an unsupervised study cannot tune them on labels,
    so the defaults carry over Tip-Adapter's initial ImageNet values (configs/imagenet.yaml:
    residual ratio init_alpha 1.17, sharpness init_beta 1). Tip-Adapter sums its affinity over
    the K cache keys of a class, while UP-Adapter's prototype stands for all K at once, so the
    residual is scaled by K = 16: β = 1.17 × 16 = 18.72 gives the prototype term the magnitude
    of Tip-Adapter's cache term when a class's keys sit at their prototype; η = 1. The training
    recipe follows Tip-Adapter-F (see ``upa.method.AdapterTraining``).
    """

    dataset: str = "Digits"
    data_root: str = "data"
    arch: str = "ViT-B-32"
    weights: str = "random"
    k: int = 16
    beta: float = 18.72
    eta: float = 1.0
    epochs: int = 20
    lr: float = 1e-3
    batch_size: int = 256
    n_views: int = 10
    prompts: str = "ensemble"
    prototype_views: str = "center"
    fill_shortfall: bool = False
    seed: int = 0
    eval_datasets: tuple[str, ...] = ()
    baselines: tuple[str, ...] = ()
    shots: int = 8
    upl_epochs: int = 50
    coop_epochs: int = 200
    cache_dir: str = ".cache/upa"
    hf_cache_dir: str | None = None
    allow_pickle: bool = False
    precision: str = "fp32"
    extract_batch_size: int = 128
    num_workers: int = 2

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)

    def replace(self, **changes) -> "RunConfig":
        return dataclasses.replace(self, **changes)


def canonical(config: RunConfig) -> RunConfig:
    """Return the config with dataset names spelled as in the spec table ("imagenet-v2" -> "ImageNetV2")."""
    from upa.data import get_spec

    return config.replace(
        dataset=get_spec(config.dataset).name,
        eval_datasets=tuple(get_spec(name).name for name in config.eval_datasets),
    )


def _check(condition: bool, message: str) -> None:
    if not condition:
        raise ValueError(message)


def validate(config: RunConfig) -> None:
    """Reject impossible values, naming the parameter, the value and the valid range."""
    from upa.data import get_spec

    get_spec(config.dataset)
    for name in config.eval_datasets:
        get_spec(name)
    _check(isinstance(config.k, int) and config.k >= 1, f"k must be an integer >= 1, got {config.k!r}")
    _check(config.beta >= 0, f"beta (residual weight) must be >= 0, got {config.beta!r}")
    _check(config.eta > 0, f"eta (sharpness) must be > 0, got {config.eta!r}")
    _check(isinstance(config.epochs, int) and config.epochs >= 0,
           f"epochs must be an integer >= 0 (0 skips fine-tuning), got {config.epochs!r}")
    _check(config.lr > 0, f"lr must be > 0, got {config.lr!r}")
    _check(config.batch_size >= 1, f"batch_size must be >= 1, got {config.batch_size!r}")
    _check(config.n_views >= 1, f"n_views must be >= 1, got {config.n_views!r}")
    _check(config.prompts in PROMPT_CHOICES, f"prompts must be one of {PROMPT_CHOICES}, got {config.prompts!r}")
    _check(config.prototype_views in PROTOTYPE_VIEW_CHOICES,
           f"prototype_views must be one of {PROTOTYPE_VIEW_CHOICES}, got {config.prototype_views!r}")
    _check(config.precision in ("fp32", "fp16", "bf16"),
           f"precision must be fp32, fp16 or bf16, got {config.precision!r}")
    _check(config.extract_batch_size >= 1, f"extract_batch_size must be >= 1, got {config.extract_batch_size!r}")
    _check(config.num_workers >= 0, f"num_workers must be >= 0, got {config.num_workers!r}")
    _check_baselines(config)
    _check_arch(config.arch)


def _check_baselines(config: RunConfig) -> None:
    from upa.baselines import METHODS

    unknown = [name for name in config.baselines if name not in METHODS]
    _check(not unknown, f"unknown baseline(s) {unknown}; valid names: {', '.join(METHODS)}")
    _check(config.shots >= 1, f"shots must be >= 1 (labelled images per class), got {config.shots!r}")
    _check(config.upl_epochs >= 1, f"upl_epochs must be >= 1, got {config.upl_epochs!r}")
    _check(config.coop_epochs >= 1, f"coop_epochs must be >= 1, got {config.coop_epochs!r}")


def _check_arch(arch: str) -> None:
    import open_clip

    known = open_clip.list_models()
    if arch not in known:
        close = [name for name in known if name.lower().startswith(arch.lower()[:4])][:8]
        raise ValueError(
            f"unknown backbone {arch!r}: not an open_clip model config. "
            f"Similar names: {close or 'none'}; see open_clip.list_models() for all {len(known)}."
        )
