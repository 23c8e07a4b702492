"""Every peer baseline on the same cached features, with each hyper-parameter's rule recorded.

``evaluate_baselines`` runs the methods named in ``BaselineSettings.methods`` and returns, per
method, the test top-1 accuracy, the hyper-parameters used, the rule that chose them (see
``upa.protocol``) and, in a separate "oracle" entry, the best test accuracy over the same grid.
Each trained model is also scored, unchanged, on every domain-shift target.

Which labels each method reads:

| method | train labels | val labels | selection (pseudo-labels) |
|---|---|---|---|
| tip_adapter_unsup, tip_adapter_f_unsup, upl, linear_probe_pseudo, up_adapter_label_free | never | never | yes |
| tip_adapter_8shot, tip_adapter_f_8shot | 8 per class, drawn from the train split | α, β search | no |
| coop_8shot | 8 per class, drawn from the train split | never | no |

Test and target labels are read only to compute the reported accuracies. The oracle column
reads the test labels only, and no hyper-parameter is chosen on a target.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from upa import method as up
from upa import protocol
from upa.baselines import tip_adapter as tip
from upa.baselines.linear_probe import INVERSE_REGULARISATION, fit_linear_probe
from upa.baselines.prompt_learner import PromptLearner, PromptTraining, train_prompt_learner
from upa.method import AdapterTraining, Selection

log = logging.getLogger(__name__)

UNSUPERVISED = ("tip_adapter_unsup", "tip_adapter_f_unsup", "upl", "linear_probe_pseudo", "up_adapter_label_free")
SUPERVISED = ("tip_adapter_8shot", "tip_adapter_f_8shot", "coop_8shot")
METHODS = UNSUPERVISED + SUPERVISED
VIEW_CHOICES = ("center", "augmented")

# features [N_t, D], labels [N_t] and class_subset [C_t] or None of one domain-shift target.
EvaluationSet = tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]
Predictor = Callable[[torch.Tensor], torch.Tensor]


@dataclass
class BaselineInputs:
    """Cached features and everything else the baselines share.

    train_features [N, D] (center view) of the train split, the unlabeled pool; train_labels [N]
    are read only by the supervised few-shot baselines. val_features [N_val, D] and val_labels
    may be None, and the supervised baselines then keep Tip-Adapter's initial α and β.
    test_features [N', D], test_labels [N']; test_class_subset [C'] or None (ImageNet-A/-R).
    text_weights [C, D] is the zero-shot classifier the selection was made with; logit_scale is
    the model's s. selection contains the pseudo-labelled top-K images. view_fn(indices [M]) returns
    augmented features [M, V, D] of train images. clip is a ``upa.features.LoadedCLIP`` (model and
    tokenizer drive the prompt learner; only upl and coop_8shot need it). targets maps the name
    of a domain-shift target to its (features [N_t, D], labels [N_t], class_subset [C_t] or None).
    Each method's trained model is evaluated on every target without retraining.
    """

    train_features: torch.Tensor
    train_labels: torch.Tensor | None
    val_features: torch.Tensor | None
    val_labels: torch.Tensor | None
    test_features: torch.Tensor
    test_labels: torch.Tensor
    test_class_subset: torch.Tensor | None
    text_weights: torch.Tensor
    logit_scale: float
    selection: Selection
    view_fn: Callable[[torch.Tensor], torch.Tensor]
    clip: Any
    classnames: Sequence[str]
    device: str | torch.device = "cpu"
    seed: int = 0
    targets: dict[str, EvaluationSet] = field(default_factory=dict)


@dataclass(frozen=True)
class BaselineSettings:
    """Hyper-parameters of the baselines. Each default's source is in the method's docstring.

    residual_weight is the residual weight fixed in advance for the unsupervised cache methods
    (Tip-Adapter's α, UP-Adapter's β). Pass the run's β so the methods share it. up_etas and
    up_epochs form UP-Adapter's label-free grid (up_epochs None: 0 and adapter_training.epochs);
    default_eta, the run's η, wins ties on that grid.
    tip_search_scale and tip_search_steps give Tip-Adapter's (β, α) search grid.
    """

    methods: tuple[str, ...] = METHODS
    shots: int = 8
    residual_weight: float = 1.0
    holdout_fraction: float = protocol.HOLDOUT_FRACTION
    tip_search_scale: tuple[float, float] = tip.SEARCH_SCALE
    tip_search_steps: tuple[int, int] = tip.SEARCH_STEPS
    adapter_training: AdapterTraining = AdapterTraining()
    up_etas: tuple[float, ...] = (1.0, 2.0, 4.0, 8.0)
    up_epochs: tuple[int, ...] | None = None
    default_eta: float = 1.0
    prototype_views: str = "center"
    n_ctx: int = 16
    upl_training: PromptTraining = PromptTraining(epochs=50)
    coop_training: PromptTraining = PromptTraining(epochs=200)
    prompt_views: str = "augmented"
    linear_probe_c: float = INVERSE_REGULARISATION
    oracle: bool = True
    progress: bool = True

    def as_dict(self) -> dict:
        return asdict(self)


class _ViewStore:
    """Augmented views [M, V, D] fetched through view_fn once per train image and reused."""

    def __init__(self, view_fn: Callable[[torch.Tensor], torch.Tensor]):
        self._view_fn = view_fn
        self._rows: dict[int, torch.Tensor] = {}

    def __call__(self, indices: torch.Tensor) -> torch.Tensor:
        missing = [i for i in indices.tolist() if i not in self._rows]
        if missing:
            fetched = self._view_fn(torch.tensor(sorted(set(missing)), dtype=torch.long))
            for i, row in zip(sorted(set(missing)), fetched):
                self._rows[i] = row
        return torch.stack([self._rows[i] for i in indices.tolist()])


@dataclass
class _Context:
    """Inputs on the compute device plus the shared view store."""

    inputs: BaselineInputs
    settings: BaselineSettings
    device: torch.device
    train: torch.Tensor
    test: torch.Tensor
    text: torch.Tensor
    views: _ViewStore
    targets: dict[str, EvaluationSet]
    num_classes: int = field(init=False)

    def __post_init__(self):
        self.num_classes = self.text.shape[0]

    def accuracy(self, logits: torch.Tensor) -> float:
        return round(up.accuracy(logits, self.inputs.test_labels, self.inputs.test_class_subset), 4)

    def evaluate(self, predict: Predictor) -> dict:
        """Score one trained model on the test split and on every target.

        predict maps features [M, D] to logits [M, C]. Returns test_top1 and target_top1 by target name.
        """
        test_top1 = self.accuracy(predict(self.test))
        target_top1 = {
            name: round(up.accuracy(predict(features), labels, class_subset), 4)
            for name, (features, labels, class_subset) in self.targets.items()
        }
        return {"test_top1": test_top1, "target_top1": target_top1}

    def generator(self) -> torch.Generator:
        """A fresh CPU generator per use, so a method's numbers do not depend on which others ran."""
        return torch.Generator().manual_seed(self.inputs.seed)

    def selection_views(self, selection: Selection) -> torch.Tensor:
        return self.views(selection.indices).to(self.device)


def _record(scores, hyperparameters, selected_by, labels_read, choice=None, oracle=None, **extra) -> dict:
    """Build a method's record from the test_top1 and target_top1 that ``_Context.evaluate`` returns."""
    record = {
        **scores,
        "hyperparameters": hyperparameters,
        "selected_by": selected_by,
        "labels_read": labels_read,
    }
    if choice is not None:
        record["selection_scores"] = choice.as_dict()
    record["oracle"] = None if oracle is None else {
        "test_top1": round(oracle.score, 4),
        "hyperparameters": oracle.params,
        "note": protocol.ORACLE,
    }
    record.update(extra)
    return record


def _tip_grid(settings: BaselineSettings) -> tuple[list[float], list[float]]:
    betas = tip.search_grid(settings.tip_search_scale[0], settings.tip_search_steps[0])
    alphas = tip.search_grid(settings.tip_search_scale[1], settings.tip_search_steps[1])
    return alphas, betas


def _tip_predictor(ctx: _Context, keys, values, alpha: float, beta: float) -> Predictor:
    def predict(features: torch.Tensor) -> torch.Tensor:
        return tip.tip_adapter_logits(features, ctx.text, keys, values, ctx.inputs.logit_scale, alpha, beta)

    return predict


def _choose_from_table(table: torch.Tensor, alphas, betas, rule) -> protocol.GridChoice:
    """Turn a [β, α] accuracy table into a choice; β-major order mirrors Tip-Adapter's own search."""
    grid = [{"alpha": round(a, 6), "beta": round(b, 6)} for b in betas for a in alphas]
    return protocol.choose_best(grid, table.flatten().tolist(), rule)


# ---- Tip-Adapter, unsupervised ------------------------------------------------------------


def _sharpness_holdout(ctx: _Context, keys_for: Callable[[Selection], torch.Tensor]) -> protocol.GridChoice:
    """Choose the sharpness β by the cache term's agreement with hold-out pseudo-labels; ties keep β = 1."""
    _, betas = _tip_grid(ctx.settings)
    fitted: dict[str, torch.Tensor] = {}

    def score(params, fit, holdout):
        if "keys" not in fitted:
            fitted["keys"] = keys_for(fit)
            fitted["values"] = tip.cache_values(fit.labels, ctx.num_classes).to(ctx.device)
        affinity = tip.cache_affinity(ctx.train[holdout.indices], fitted["keys"], params["beta"])
        return protocol.branch_accuracy(affinity @ fitted["values"], holdout.labels)

    grid = [{"beta": round(b, 6)} for b in betas]
    return protocol.select_on_pseudo_holdout(
        grid, score, ctx.inputs.selection, ctx.settings.holdout_fraction, ctx.generator(),
        default={"beta": tip.INIT_BETA},
    )


def _sharpness_oracle(ctx: _Context, keys, values, alpha) -> protocol.GridChoice | None:
    if not ctx.settings.oracle:
        return None
    _, betas = _tip_grid(ctx.settings)
    betas = betas + [tip.INIT_BETA]  # the hold-out grid includes its default too
    table = tip.grid_accuracies(ctx.test, ctx.inputs.test_labels, ctx.text, keys, values,
                                ctx.inputs.logit_scale, [alpha], betas, ctx.inputs.test_class_subset)
    return _choose_from_table(table, [alpha], betas, protocol.ORACLE)


def run_tip_adapter_unsup(ctx: _Context) -> dict:
    """Training-free Tip-Adapter with the cache built from the pseudo-labelled selection.

    Keys: mean of the selection's cached augmented views, normalised (Tip-Adapter's recipe);
    values: one-hot pseudo-labels with C columns. α = ``residual_weight``, fixed in advance. β
    (sharpness): pseudo-label hold-out over Tip-Adapter's β range (200 values in [0.1, 7),
    configs/imagenet.yaml), scored by the cache term alone; ties keep the initial β = 1.
    """
    selection = ctx.inputs.selection
    alpha = ctx.settings.residual_weight
    choice = _sharpness_holdout(ctx, lambda part: tip.cache_keys(ctx.views(part.indices)).to(ctx.device))
    keys = tip.cache_keys(ctx.selection_views(selection))
    values = tip.cache_values(selection.labels, ctx.num_classes).to(ctx.device)
    beta = choice.params["beta"]
    return _record(
        ctx.evaluate(_tip_predictor(ctx, keys, values, alpha, beta)), {"alpha": alpha, "beta": beta},
        {"alpha": protocol.FIXED, "beta": choice.rule}, "none (pseudo-labels only)", choice,
        _sharpness_oracle(ctx, keys, values, alpha), cache_size=len(selection.indices),
    )


def run_tip_adapter_f_unsup(ctx: _Context) -> dict:
    """Tip-Adapter-F with keys trained on the pseudo-labelled selection.

    Training: AdamW lr 1e-3, eps 1e-4, cosine, 20 epochs, batch 256 (``adapter_training``;
    Tip-Adapter's main.py), at α = ``residual_weight`` and Tip-Adapter's initial β = 1. After
    training, β is chosen by the pseudo-label hold-out (keys trained on the fit part, cache term
    scored on the hold-out part), then the keys are retrained on the whole selection.
    """
    selection = ctx.inputs.selection
    alpha = ctx.settings.residual_weight

    def trained_keys(part: Selection) -> tuple[torch.Tensor, list[float]]:
        views = ctx.selection_views(part)
        values = tip.cache_values(part.labels, ctx.num_classes)
        return tip.train_cache_keys(
            views, part.labels, ctx.text, tip.cache_keys(views), values, ctx.inputs.logit_scale,
            alpha, tip.INIT_BETA, ctx.settings.adapter_training, ctx.generator(), ctx.settings.progress,
        )

    choice = _sharpness_holdout(ctx, lambda part: trained_keys(part)[0])
    keys, losses = trained_keys(selection)
    values = tip.cache_values(selection.labels, ctx.num_classes).to(ctx.device)
    beta = choice.params["beta"]
    return _record(
        ctx.evaluate(_tip_predictor(ctx, keys, values, alpha, beta)),
        {"alpha": alpha, "beta": beta, "train_beta": tip.INIT_BETA, **_training_dict(ctx.settings.adapter_training)},
        {"alpha": protocol.FIXED, "beta": choice.rule, "training": protocol.FIXED},
        "none (pseudo-labels only)", choice, _sharpness_oracle(ctx, keys, values, alpha),
        epoch_losses=[round(x, 6) for x in losses],
    )


# ---- Tip-Adapter, supervised few-shot -----------------------------------------------------


def _few_shot(ctx: _Context) -> torch.Tensor:
    if ctx.inputs.train_labels is None:
        raise ValueError("the few-shot baselines need train_labels; pass the train split's labels or drop them "
                         f"from BaselineSettings.methods ({', '.join(SUPERVISED)})")
    return tip.sample_few_shot(ctx.inputs.train_labels, ctx.settings.shots, ctx.generator(), ctx.num_classes)


def _alpha_beta_on_val(ctx: _Context, keys, values) -> tuple[dict, dict | str, protocol.GridChoice | None]:
    inputs = ctx.inputs
    if inputs.val_features is None or inputs.val_labels is None:
        log.warning("no labelled val split: the few-shot Tip-Adapter keeps its initial alpha and beta")
        return {"alpha": tip.INIT_ALPHA, "beta": tip.INIT_BETA}, protocol.FIXED + " (no val split)", None
    alphas, betas = _tip_grid(ctx.settings)
    table = tip.grid_accuracies(inputs.val_features.to(ctx.device).float(), inputs.val_labels, ctx.text, keys,
                                values, inputs.logit_scale, alphas, betas)
    choice = _choose_from_table(table, alphas, betas, protocol.LABELLED_VAL)
    return choice.params, protocol.LABELLED_VAL, choice


def _alpha_beta_oracle(ctx: _Context, keys, values) -> protocol.GridChoice | None:
    if not ctx.settings.oracle:
        return None
    alphas, betas = _tip_grid(ctx.settings)
    table = tip.grid_accuracies(ctx.test, ctx.inputs.test_labels, ctx.text, keys, values, ctx.inputs.logit_scale,
                                alphas, betas, ctx.inputs.test_class_subset)
    return _choose_from_table(table, alphas, betas, protocol.ORACLE)


def _few_shot_tip(ctx: _Context, train_keys: bool) -> dict:
    shots = _few_shot(ctx)
    labels = ctx.inputs.train_labels[shots]
    views = ctx.views(shots).to(ctx.device)
    keys = tip.cache_keys(views)
    values = tip.cache_values(labels, ctx.num_classes).to(ctx.device)
    extra: dict = {"cache_size": len(shots)}
    if train_keys:
        keys, losses = tip.train_cache_keys(
            views, labels, ctx.text, keys, values, ctx.inputs.logit_scale, tip.INIT_ALPHA, tip.INIT_BETA,
            ctx.settings.adapter_training, ctx.generator(), ctx.settings.progress,
        )
        extra["epoch_losses"] = [round(x, 6) for x in losses]
    params, rule, choice = _alpha_beta_on_val(ctx, keys, values)
    scores = ctx.evaluate(_tip_predictor(ctx, keys, values, params["alpha"], params["beta"]))
    hyperparameters = dict(params, shots=ctx.settings.shots)
    if train_keys:
        hyperparameters.update(train_alpha=tip.INIT_ALPHA, train_beta=tip.INIT_BETA,
                               **_training_dict(ctx.settings.adapter_training))
    labels_read = f"{ctx.settings.shots} labelled train images per class" + (
        "; val labels for the alpha/beta search" if choice is not None else "")
    return _record(scores, hyperparameters, {"alpha, beta": rule, "shots": protocol.FIXED},
                   labels_read, choice, _alpha_beta_oracle(ctx, keys, values), **extra)


def run_tip_adapter_8shot(ctx: _Context) -> dict:
    """Training-free Tip-Adapter with a cache of ``shots`` labelled train images per class.

    Shots drawn from the train split with a generator seeded by the run seed. α, β: Tip-Adapter's
    grid search (20 α in [0.1, 3), 200 β in [0.1, 7); configs/imagenet.yaml) on the labelled val
    split; without a val split, the initial α = 1.17, β = 1 of the same config.
    """
    return _few_shot_tip(ctx, train_keys=False)


def run_tip_adapter_f_8shot(ctx: _Context) -> dict:
    """Tip-Adapter-F on ``shots`` labelled images per class: keys trained, then α, β searched on val.

    Training as in Tip-Adapter's main.py (AdamW lr 1e-3, eps 1e-4, cosine, 20 epochs, batch 256,
    at α = 1.17, β = 1), keeping the last epoch rather than the best-test epoch.
    """
    return _few_shot_tip(ctx, train_keys=True)


# ---- Prompt learning: UPL and CoOp --------------------------------------------------------


def _prompt_run(ctx: _Context, indices: torch.Tensor, labels: torch.Tensor, training: PromptTraining):
    clip = ctx.inputs.clip
    if clip is None:
        raise ValueError("upl and coop_8shot need BaselineInputs.clip (a LoadedCLIP with model and tokenizer)")
    learner = PromptLearner(clip.model, clip.tokenizer, ctx.inputs.classnames, ctx.settings.n_ctx,
                            generator=ctx.generator())
    if ctx.settings.prompt_views == "augmented":
        features = ctx.views(indices)
    else:
        features = ctx.inputs.train_features[indices]
    losses = train_prompt_learner(learner, features, labels, ctx.inputs.logit_scale, training,
                                  ctx.generator(), ctx.settings.progress)
    with torch.no_grad():
        text = learner.class_embeddings().to(ctx.device)

    def predict(features: torch.Tensor) -> torch.Tensor:
        return up.zero_shot_logits(features, text, ctx.inputs.logit_scale)

    hyperparameters = {"n_ctx": ctx.settings.n_ctx, "views": ctx.settings.prompt_views, **asdict(training)}
    return ctx.evaluate(predict), hyperparameters, [round(x, 6) for x in losses]


def run_upl(ctx: _Context) -> dict:
    """UPL: the CoOp prompt learner trained on the pseudo-labelled selection.

    16 context vectors, SGD lr 0.002, momentum 0.9, weight decay 5e-4, batch 32, one warm-up
    epoch at 1e-5, cosine, 50 epochs (UPL's rn50_ep50.yaml), all fixed in advance. The selection
    is the study's (one backbone, the run's prompts), not UPL*'s multi-backbone ensemble.
    """
    selection = ctx.inputs.selection
    scores, hyperparameters, losses = _prompt_run(ctx, selection.indices, selection.labels,
                                                  ctx.settings.upl_training)
    return _record(scores, hyperparameters, protocol.FIXED, "none (pseudo-labels only)", epoch_losses=losses)


def run_coop_8shot(ctx: _Context) -> dict:
    """CoOp on ``shots`` labelled train images per class, the same learner as UPL.

    Recipe as UPL's but 200 epochs (CoOp's rn50.yaml for 8 and 16 shots), fixed in advance; the
    epoch count is ``coop_training.epochs``.
    """
    shots = _few_shot(ctx)
    labels = ctx.inputs.train_labels[shots]
    scores, hyperparameters, losses = _prompt_run(ctx, shots, labels, ctx.settings.coop_training)
    hyperparameters["shots"] = ctx.settings.shots
    return _record(scores, hyperparameters, protocol.FIXED, f"{ctx.settings.shots} labelled train images per class",
                   epoch_losses=losses)


# ---- Linear probe -------------------------------------------------------------------------


def run_linear_probe_pseudo(ctx: _Context) -> dict:
    """Logistic regression on the selected images' center features and pseudo-labels.

    C (inverse L2 strength) = 0.316, fixed in advance (the openai/CLIP README's linear-probe
    example; see ``upa.baselines.linear_probe``); the
    test prediction is the probe alone, without the zero-shot term.
    """
    selection = ctx.inputs.selection
    probe = fit_linear_probe(ctx.inputs.train_features[selection.indices], selection.labels, ctx.num_classes,
                             ctx.inputs.seed, ctx.settings.linear_probe_c)
    return _record(ctx.evaluate(probe), {"C": ctx.settings.linear_probe_c}, protocol.FIXED,
                   "none (pseudo-labels only)")


# ---- UP-Adapter with label-free selection ---------------------------------------------------


def _up_grid(settings: BaselineSettings) -> list[dict]:
    epochs = settings.up_epochs if settings.up_epochs is not None else (0, settings.adapter_training.epochs)
    return [{"eta": float(eta), "epochs": int(n)} for n in sorted(set(epochs)) for eta in sorted(settings.up_etas)]


def _fit_prototypes(ctx: _Context, params: dict, part: Selection) -> torch.Tensor:
    """Prototypes of ``part``, fine-tuned for params["epochs"] epochs (0: training-free)."""
    if ctx.settings.prototype_views == "augmented":
        source = ctx.selection_views(part)
    else:
        source = ctx.train[part.indices]
    prototypes = up.class_prototypes(source, part.labels, ctx.num_classes, fallback=ctx.text)
    if params["epochs"] == 0:
        return prototypes
    training = AdapterTraining(**{**asdict(ctx.settings.adapter_training), "epochs": params["epochs"]})
    weights, _ = up.train_prototype_adapter(
        ctx.selection_views(part), part.labels, ctx.text, prototypes, ctx.inputs.logit_scale,
        ctx.settings.residual_weight, params["eta"], training, ctx.generator(), progress=False,
    )
    return weights


def run_up_adapter_label_free(ctx: _Context) -> dict:
    """UP-Adapter with η and the epoch count chosen on the pseudo-label hold-out.

    β = ``residual_weight``, fixed in advance. Grid: η in ``up_etas`` × epochs in ``up_epochs``
    (0 = training-free prototypes), ordered fewest epochs, then smallest η, first. Score: the
    prototype branch's agreement with the hold-out pseudo-labels; ties keep the run's own
    setting (η = ``default_eta``, ``adapter_training.epochs``). Training recipe:
    ``adapter_training`` (Tip-Adapter-F's, see ``upa.method.AdapterTraining``).
    """
    beta = ctx.settings.residual_weight
    grid = _up_grid(ctx.settings)

    def score(params, fit, holdout):
        weights = _fit_prototypes(ctx, params, fit)
        branch = beta * up.prototype_affinity(ctx.train[holdout.indices], weights, params["eta"])
        return protocol.branch_accuracy(branch, holdout.labels)

    def predictor(params) -> Predictor:
        weights = _fit_prototypes(ctx, params, ctx.inputs.selection)

        def predict(features: torch.Tensor) -> torch.Tensor:
            return up.up_adapter_logits(features, ctx.text, weights, ctx.inputs.logit_scale, beta, params["eta"])

        return predict

    def test_top1(params):
        return ctx.accuracy(predictor(params)(ctx.test))

    default = {"eta": float(ctx.settings.default_eta), "epochs": int(ctx.settings.adapter_training.epochs)}
    choice = protocol.select_on_pseudo_holdout(grid, score, ctx.inputs.selection, ctx.settings.holdout_fraction,
                                               ctx.generator(), default)
    oracle_points = grid if default in grid else grid + [default]
    oracle = protocol.oracle_grid(oracle_points, test_top1) if ctx.settings.oracle else None
    hyperparameters = {"beta": beta, **choice.params, "prototype_views": ctx.settings.prototype_views,
                       **_training_dict(ctx.settings.adapter_training, with_epochs=False)}
    return _record(ctx.evaluate(predictor(choice.params)), hyperparameters,
                   {"beta": protocol.FIXED, "eta, epochs": choice.rule, "training": protocol.FIXED},
                   "none (pseudo-labels only)", choice, oracle)


def _training_dict(training: AdapterTraining, with_epochs: bool = True) -> dict:
    record = asdict(training)
    if not with_epochs:
        record.pop("epochs")
    return record


RUNNERS: dict[str, Callable[[_Context], dict]] = {
    "tip_adapter_unsup": run_tip_adapter_unsup,
    "tip_adapter_f_unsup": run_tip_adapter_f_unsup,
    "tip_adapter_8shot": run_tip_adapter_8shot,
    "tip_adapter_f_8shot": run_tip_adapter_f_8shot,
    "upl": run_upl,
    "coop_8shot": run_coop_8shot,
    "linear_probe_pseudo": run_linear_probe_pseudo,
    "up_adapter_label_free": run_up_adapter_label_free,
}


def _validate(inputs: BaselineInputs, settings: BaselineSettings) -> None:
    unknown = [name for name in settings.methods if name not in RUNNERS]
    if unknown:
        raise ValueError(f"unknown baseline(s) {unknown}; valid names: {', '.join(METHODS)}")
    for name, value, choices in (("prototype_views", settings.prototype_views, VIEW_CHOICES),
                                 ("prompt_views", settings.prompt_views, VIEW_CHOICES)):
        if value not in choices:
            raise ValueError(f"BaselineSettings.{name} must be one of {choices}, got {value!r}")
    if settings.shots < 1:
        raise ValueError(f"BaselineSettings.shots must be >= 1, got {settings.shots}")
    num_classes, width = inputs.text_weights.shape
    for name in ("train_features", "test_features", "val_features"):
        features = getattr(inputs, name)
        if features is not None and (features.ndim != 2 or features.shape[1] != width):
            raise ValueError(f"BaselineInputs.{name} must have shape [N, {width}] to match text_weights "
                             f"[{num_classes}, {width}], got {tuple(features.shape)}")
    for name, (features, labels, class_subset) in inputs.targets.items():
        _validate_target(name, features, labels, class_subset, num_classes, width)
    if len(inputs.classnames) != num_classes:
        raise ValueError(f"BaselineInputs.classnames has {len(inputs.classnames)} names but text_weights has "
                         f"{num_classes} rows")
    if len(inputs.selection.counts) != num_classes:
        raise ValueError(f"the selection covers {len(inputs.selection.counts)} classes but text_weights has "
                         f"{num_classes}")


def _validate_target(name, features, labels, class_subset, num_classes: int, width: int) -> None:
    where = f"BaselineInputs.targets[{name!r}]"
    if features.ndim != 2 or features.shape[1] != width:
        raise ValueError(f"{where} features must have shape [N, {width}] to match text_weights "
                         f"[{num_classes}, {width}], got {tuple(features.shape)}")
    if labels.shape != (features.shape[0],):
        raise ValueError(f"{where} labels must have shape [{features.shape[0]}], one per feature row, "
                         f"got {tuple(labels.shape)}")
    if class_subset is not None and (len(class_subset) == 0 or class_subset.min() < 0
                                     or class_subset.max() >= num_classes):
        raise ValueError(f"{where} class_subset must list class indices in [0, {num_classes}), "
                         f"got {class_subset.tolist()}")


def evaluate_baselines(inputs: BaselineInputs, settings: BaselineSettings = BaselineSettings()) -> dict[str, dict]:
    """Run each baseline in ``settings.methods`` and return its record, keyed by method name.

    A record contains test_top1 (percent), target_top1 (percent per name in
    ``inputs.targets``, empty without targets), hyperparameters, selected_by (the rule behind each
    hyper-parameter), labels_read, selection_scores where a grid was scored, and oracle. The
    oracle is the best test accuracy over the same grid, or None, and is never a reported result.
    """
    _validate(inputs, settings)
    device = torch.device(inputs.device)
    ctx = _Context(
        inputs=inputs,
        settings=settings,
        device=device,
        train=inputs.train_features.to(device).float(),
        test=inputs.test_features.to(device).float(),
        text=inputs.text_weights.to(device).float(),
        views=_ViewStore(inputs.view_fn),
        targets={name: (features.to(device).float(), labels, class_subset)
                 for name, (features, labels, class_subset) in inputs.targets.items()},
    )
    results: dict[str, dict] = {}
    for name in settings.methods:
        log.info("baseline %s", name)
        results[name] = RUNNERS[name](ctx)
        log.info("baseline %s: test top-1 %.2f %%, targets %s", name, results[name]["test_top1"],
                 results[name]["target_top1"])
    return results
