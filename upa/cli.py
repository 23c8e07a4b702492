"""Command line: `upa run` for one dataset, `upa demo-data` for the embedded data, `upa datasets` for the table."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

import torch

from upa.baselines import METHODS as BASELINE_METHODS
from upa.config import PROMPT_CHOICES, PROTOTYPE_VIEW_CHOICES, RunConfig

DEFAULTS = RunConfig()


def resolve_device(name: str) -> torch.device:
    """Turn "auto", "cpu", "cuda" or "cuda:N" into a device, rejecting CUDA where torch finds none."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as error:
        raise ValueError(f"invalid --device {name!r}: use auto, cpu, cuda or cuda:N") from error
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {name} was requested but torch finds no CUDA device; use --device cpu")
    return device


def _add_run_options(parser: argparse.ArgumentParser) -> None:
    data = parser.add_argument_group("data")
    data.add_argument("--dataset", default=DEFAULTS.dataset,
                      help="dataset name from `upa datasets` (case-insensitive)")
    data.add_argument("--data-root", default=DEFAULTS.data_root,
                      help="folder holding the datasets in the CoOp layout (for Folder: the dataset folder itself)")
    data.add_argument("--eval-datasets", nargs="*", default=[],
                      help="extra test-only datasets evaluated with the adapter trained on --dataset "
                           "(domain shift, e.g. ImageNetV2 ImageNetSketch ImageNetA ImageNetR)")

    model = parser.add_argument_group("model")
    model.add_argument("--arch", default=DEFAULTS.arch, help="open_clip model config name, e.g. RN50, ViT-B-32")
    model.add_argument("--weights", default=DEFAULTS.weights,
                       help="'random' (explicit random initialisation), 'pretrained:TAG' resolved offline from the "
                            "local Hugging Face cache (e.g. pretrained:openai), or 'file:PATH' to a checkpoint")
    model.add_argument("--hf-cache-dir", default=None,
                       help="Hugging Face hub cache to resolve pretrained tags in (None: HF_HUB_CACHE, "
                            "HF_HOME/hub or ~/.cache/huggingface/hub)")
    model.add_argument("--allow-pickle", action="store_true",
                       help="allow a full pickle load of a checkpoint file that torch's weights_only loader rejects; "
                            "only for files you trust")
    model.add_argument("--precision", default=DEFAULTS.precision, choices=("fp32", "fp16", "bf16"),
                       help="model weights precision")

    adapter = parser.add_argument_group("UP-Adapter")
    adapter.add_argument("--k", type=int, default=DEFAULTS.k, help="pseudo-labelled images kept per class (>= 1)")
    adapter.add_argument("--beta", type=float, default=DEFAULTS.beta, help="residual weight of the affinity term (>= 0)")
    adapter.add_argument("--eta", type=float, default=DEFAULTS.eta, help="sharpness of the affinity (> 0)")
    adapter.add_argument("--epochs", type=int, default=DEFAULTS.epochs,
                         help="fine-tuning epochs of the prototype layer (0: training-free only)")
    adapter.add_argument("--lr", type=float, default=DEFAULTS.lr, help="AdamW learning rate")
    adapter.add_argument("--batch-size", type=int, default=DEFAULTS.batch_size, help="fine-tuning batch size in images")
    adapter.add_argument("--n-views", type=int, default=DEFAULTS.n_views,
                         help="augmented views cached per selected image (RandomResizedCrop scale 0.5-1, flip)")
    adapter.add_argument("--prompts", default=DEFAULTS.prompts, choices=PROMPT_CHOICES,
                         help="text classifier used for pseudo-labels and by the adapter")
    adapter.add_argument("--prototype-views", default=DEFAULTS.prototype_views, choices=PROTOTYPE_VIEW_CHOICES,
                         help="build prototypes from the center crop or from the augmented views")
    adapter.add_argument("--fill-shortfall", action="store_true",
                         help="top up a class with fewer than k candidates from its own probability column")
    baselines = parser.add_argument_group("peer baselines (same cached features)")
    baselines.add_argument("--baselines", nargs="*", default=[], metavar="NAME",
                           help="baselines to run beside UP-Adapter, or 'all': " + ", ".join(BASELINE_METHODS))
    baselines.add_argument("--shots", type=int, default=DEFAULTS.shots,
                           help="labelled train images per class for the supervised baselines")
    baselines.add_argument("--upl-epochs", type=int, default=DEFAULTS.upl_epochs, help="UPL prompt-learning epochs")
    baselines.add_argument("--coop-epochs", type=int, default=DEFAULTS.coop_epochs, help="CoOp prompt-learning epochs")
    adapter.add_argument("--seed", type=int, default=DEFAULTS.seed, help="seed of augmentation and training")

    io = parser.add_argument_group("execution and output")
    io.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    io.add_argument("--extract-batch-size", type=int, default=DEFAULTS.extract_batch_size,
                    help="images per batch during feature extraction")
    io.add_argument("--num-workers", type=int, default=DEFAULTS.num_workers, help="DataLoader worker processes")
    io.add_argument("--cache-dir", default=DEFAULTS.cache_dir, help="feature cache folder (safetensors files)")
    io.add_argument("--results-dir", default="results", help="folder for result files")
    io.add_argument("--experiment", default="runs", help="sub-folder of --results-dir that groups runs")
    io.add_argument("--output", default=None, help="result file path (None: <results-dir>/<experiment>/<dataset>/<name from the config>.json)")
    existing = io.add_mutually_exclusive_group()
    existing.add_argument("--overwrite", action="store_true", help="replace an existing result file")
    existing.add_argument("--skip-existing", action="store_true",
                          help="keep an existing result file made with the same config and do nothing")
    io.add_argument("--quiet", action="store_true", help="no progress bars")


def config_from_args(args: argparse.Namespace) -> RunConfig:
    return RunConfig(
        dataset=args.dataset, data_root=args.data_root, arch=args.arch, weights=args.weights,
        k=args.k, beta=args.beta, eta=args.eta, epochs=args.epochs, lr=args.lr, batch_size=args.batch_size,
        n_views=args.n_views, prompts=args.prompts, prototype_views=args.prototype_views,
        fill_shortfall=args.fill_shortfall, seed=args.seed, eval_datasets=tuple(args.eval_datasets),
        baselines=BASELINE_METHODS if "all" in args.baselines else tuple(args.baselines), shots=args.shots,
        upl_epochs=args.upl_epochs, coop_epochs=args.coop_epochs,
        cache_dir=args.cache_dir, hf_cache_dir=args.hf_cache_dir, allow_pickle=args.allow_pickle,
        precision=args.precision, extract_batch_size=args.extract_batch_size, num_workers=args.num_workers,
    )


def _print_summary(result: dict, path: Path, written: bool) -> None:
    print(f"provenance: {result['provenance_label']}")
    for target, metrics in result["metrics"].items():
        cells = ", ".join(f"{name} {value:.2f}%" for name, value in metrics.items())
        print(f"top-1 on {target}: {cells}")
    pseudo = result["pseudo_labels"]
    print(f"selected {pseudo['selected']} of {pseudo['pool_size']} pool images; "
          f"pseudo-label precision of the selected set {pseudo['precision_of_selected_percent']}% (analysis only)")
    if not result["reproduction"]:
        print("NOTE: these numbers come from random weights or non-benchmark data; they test the code "
              "and are not a reproduction of the paper.")
    print(f"result written to {path}" if written else f"existing result kept at {path} (--skip-existing)")


def command_run(args: argparse.Namespace) -> int:
    from upa.experiments import run_and_save

    config = config_from_args(args)
    device = resolve_device(args.device)
    result, path, written = run_and_save(
        config, device, output=args.output, results_dir=args.results_dir, experiment=args.experiment,
        overwrite=args.overwrite, skip_existing=args.skip_existing, progress=not args.quiet,
    )
    _print_summary(result, path, written)
    return 0


def command_demo_data(args: argparse.Namespace) -> int:
    from upa.demo_data import build_digits, build_digits_shifted

    folder = build_digits(args.data_root, overwrite=args.overwrite)
    shifted = build_digits_shifted(args.data_root, overwrite=args.overwrite)
    print(f"embedded demo datasets (scikit-learn handwritten digits) ready at {folder} and {shifted}")
    return 0


def command_datasets(args: argparse.Namespace) -> int:
    from upa.data import DATASETS

    for spec in DATASETS.values():
        print(f"{spec.name:16s} {spec.folder + '/':28s} splits: {', '.join(spec.splits)}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="upa", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    commands = parser.add_subparsers(dest="command", required=True)

    run = commands.add_parser("run", help="run zero-shot CLIP, training-free prototypes and UP-Adapter on one "
                                          "dataset and write one JSON result",
                              formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    _add_run_options(run)
    run.set_defaults(handler=command_run)

    demo = commands.add_parser("demo-data", help="write the embedded demo dataset (handwritten digits) in the "
                                                 "CoOp layout", formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    demo.add_argument("--data-root", default=DEFAULTS.data_root, help="folder to write digits/ into")
    demo.add_argument("--overwrite", action="store_true", help="rebuild even if a complete copy exists")
    demo.set_defaults(handler=command_demo_data)

    datasets = commands.add_parser("datasets", help="list the datasets of the spec table")
    datasets.set_defaults(handler=command_datasets)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from upa.data import ImageLoadError
    from upa.features import StaleCacheError

    try:
        return args.handler(args)
    except (ValueError, FileNotFoundError, FileExistsError, ImageLoadError, StaleCacheError) as error:
        print(f"upa: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
