"""The whole study: execute every notebook with papermill, collect the tables, build the book.

``python -m upa.study --profile demo`` (what ``make study`` runs) executes each notebook of
``notebooks/`` into ``book/executed/``, writes the collected tables and figures to
``results/summary/`` and builds the Jupyter Book into ``_build/html``. The book renders the
executed copies and never executes anything itself, so a notebook that raises stops the study
before the build (papermill raises ``PapermillExecutionError``), and a notebook without exactly
one cell tagged ``parameters`` is rejected before any notebook runs.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

log = logging.getLogger(__name__)

# Execution order: cheap checks of the shared feature cache come first, the simulation last.
NOTEBOOK_ORDER = ("recognition", "domain_generalisation", "k_ablation", "beta_eta_epochs", "backbones",
                  "open_choices", "simulation")

# The tables and figures each executed chapter shows; the book tests look for each caption.
PROMISES: dict[str, dict[str, tuple[str, ...]]] = {
    "recognition": {"tables": ("recognition", "recognition-not-reproduction"), "figures": ()},
    "domain_generalisation": {"tables": ("domain-generalisation", "domain-generalisation-not-reproduction"),
                              "figures": ()},
    "k_ablation": {"tables": ("k-ablation",), "figures": ("k-ablation",)},
    "beta_eta_epochs": {"tables": ("beta-eta", "epochs"), "figures": ("beta-eta", "epochs")},
    "backbones": {"tables": ("backbones",), "figures": ("backbones",)},
    "open_choices": {"tables": ("open-choices",), "figures": ()},
    "simulation": {"tables": ("simulation",), "figures": ("simulation-gain", "simulation-k")},
}

# Settings the study passes to every notebook that declares them. Paths inside the project are
# made relative to the notebook folder, the kernel's working directory, so the book shows no
# local paths.
_PATH_PARAMETERS = ("data_root", "results_dir", "cache_dir", "hf_cache_dir", "model_config_dir")
_SHARED_PARAMETERS = ("profile", "device", "backbone", "weights", *_PATH_PARAMETERS)


class StudyError(RuntimeError):
    """A notebook that cannot run as part of the study, or a failed book build."""


@dataclass
class StudyRun:
    """Executed notebooks with their wall times, and the built book's folder if any."""

    executed: dict[str, Path] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)
    collected: list[Path] = field(default_factory=list)
    book_html: Path | None = None


def parameter_cells(notebook: Path) -> int:
    """Count the cells tagged ``parameters`` in a notebook file."""
    content = json.loads(notebook.read_text())
    return sum("parameters" in cell.get("metadata", {}).get("tags", []) for cell in content.get("cells", []))


def discover(notebooks_dir: Path, only: Sequence[str] | None = None) -> list[Path]:
    """List the notebooks to run, in ``NOTEBOOK_ORDER`` then by name, and check each has one parameters cell.

    Every problem found is raised together, before any notebook runs.
    """
    paths = {path.stem: path for path in sorted(Path(notebooks_dir).glob("*.ipynb"))}
    if not paths:
        raise StudyError(f"no notebook (*.ipynb) found in {notebooks_dir}")
    if only:
        unknown = sorted(set(only) - set(paths))
        if unknown:
            raise StudyError(f"--only names {unknown} are not notebooks in {notebooks_dir}; "
                             f"available: {', '.join(paths)}")
        paths = {name: path for name, path in paths.items() if name in only}
    ordered = [paths[name] for name in NOTEBOOK_ORDER if name in paths]
    ordered += [path for name, path in paths.items() if name not in NOTEBOOK_ORDER]

    problems = []
    for path in ordered:
        count = parameter_cells(path)
        if count != 1:
            problems.append(f"{path} has {count} cells tagged 'parameters'; it needs exactly one "
                            "(tag the cell that assigns the defaults, in Jupyter: View > Cell Toolbar > Tags)")
    if problems:
        raise StudyError("; ".join(problems))
    return ordered


def notebook_parameters(notebook: Path, settings: Mapping[str, object],
                        overrides: Mapping[str, object]) -> dict[str, object]:
    """Select the shared settings the notebook declares, make paths relative to it, add its overrides."""
    import papermill

    declared = papermill.inspect_notebook(str(notebook))
    parameters = {}
    for name in _SHARED_PARAMETERS:
        value = settings.get(name)
        if value is None or name not in declared:
            continue
        if name in _PATH_PARAMETERS:
            value = _path_for_notebook(Path(value), notebook)
        parameters[name] = value
    parameters.update(overrides)
    return parameters


def _path_for_notebook(path: Path, notebook: Path) -> str:
    """Express ``path`` relative to the notebook folder when it lies in the same project, else absolute."""
    path, folder = path.absolute(), notebook.parent.absolute()
    if path.is_relative_to(folder.parent):
        return os.path.relpath(path, folder)
    return str(path)


# Kernels papermill starts inherit these: no progress bars (the book would show their residue),
# and no warning that ipywidgets is missing for tqdm's notebook bars.
_KERNEL_ENVIRONMENT = {"TQDM_DISABLE": "1", "PYTHONWARNINGS": "ignore:IProgress not found"}


@contextmanager
def _kernel_environment() -> Iterator[None]:
    previous = {name: os.environ.get(name) for name in _KERNEL_ENVIRONMENT}
    os.environ.update(_KERNEL_ENVIRONMENT)
    try:
        yield
    finally:
        for name, value in previous.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def execute_notebooks(notebooks: Sequence[Path], executed_dir: Path, settings: Mapping[str, object],
                      overrides: Mapping[str, Mapping[str, object]] | None = None,
                      kernel_name: str = "python3", timeout_s: int | None = None) -> StudyRun:
    """Execute each notebook into ``executed_dir``; the first that raises stops the study.

    papermill's ``PapermillExecutionError`` propagates with the failing cell and traceback; the
    partly executed copy stays in ``executed_dir`` for inspection.
    """
    import papermill

    overrides = overrides or {}
    executed_dir.mkdir(parents=True, exist_ok=True)
    study = StudyRun()
    with _kernel_environment():
        for notebook in notebooks:
            output = executed_dir / notebook.name
            parameters = notebook_parameters(notebook, settings, overrides.get(notebook.stem, {}))
            log.info("executing %s with %s", notebook, parameters)
            start = time.perf_counter()
            papermill.execute_notebook(
                str(notebook), str(output), parameters=parameters, cwd=str(notebook.parent),
                kernel_name=kernel_name, progress_bar=False, execution_timeout=timeout_s,
            )
            study.executed[notebook.stem] = output
            study.seconds[notebook.stem] = round(time.perf_counter() - start, 1)
            log.info("%s done in %.0f s", notebook.stem, study.seconds[notebook.stem])
    return study


def jupyter_book_command() -> list[str]:
    beside = Path(sys.executable).with_name("jupyter-book")
    found = str(beside) if beside.exists() else shutil.which("jupyter-book")
    if found is None:
        raise StudyError("jupyter-book is not installed; install the study extras: pip install -e '.[study]'")
    return [found]


def build_book(book_root: Path) -> Path:
    """Build the book with warnings as errors (all reported, then the build fails); return the HTML folder."""
    command = [*jupyter_book_command(), "build", str(book_root), "--builder", "html", "-W", "--keep-going"]
    log.info("building the book: %s", " ".join(command))
    completed = subprocess.run(command, capture_output=True, text=True)
    if completed.returncode != 0:
        raise StudyError(f"the book build failed (exit code {completed.returncode}):\n"
                         f"{completed.stdout[-4000:]}\n{completed.stderr[-4000:]}")
    return book_root / "_build" / "html"


def run_study(profile: str = "demo", book_root: str | Path = ".", notebooks_dir: str | Path | None = None,
              executed_dir: str | Path | None = None, data_root: str | Path = "data",
              results_dir: str | Path = "results", cache_dir: str | Path = ".cache/upa", device: str = "auto",
              backbone: str | None = None, weights: str | None = None, hf_cache_dir: str | None = None,
              model_config_dir: str | None = None, overrides: Mapping[str, Mapping[str, object]] | None = None,
              only: Sequence[str] | None = None, build: bool = True, collect: bool = True) -> StudyRun:
    """Execute the notebooks, collect the tables and build the book; see the module docstring."""
    from upa.notebook_params import PROFILES

    if profile not in PROFILES:
        raise StudyError(f"profile must be one of {PROFILES}, got {profile!r}")
    book_root = Path(book_root)
    notebooks = discover(Path(notebooks_dir) if notebooks_dir else book_root / "notebooks", only)
    settings = {"profile": profile, "data_root": data_root, "results_dir": results_dir, "cache_dir": cache_dir,
                "device": device, "backbone": backbone, "weights": weights, "hf_cache_dir": hf_cache_dir,
                "model_config_dir": model_config_dir}
    executed = Path(executed_dir) if executed_dir else book_root / "book" / "executed"
    study = execute_notebooks(notebooks, executed, settings, overrides)
    if collect:
        from upa import report

        study.collected = report.collect(results_dir)
    if build:
        study.book_html = build_book(book_root)
    return study


def _parse_overrides(items: Sequence[str]) -> dict[str, dict[str, object]]:
    """Turn NOTEBOOK.NAME=JSON strings into per-notebook parameter overrides."""
    overrides: dict[str, dict[str, object]] = {}
    for item in items:
        target, sep, text = item.partition("=")
        notebook, dot, name = target.partition(".")
        if not sep or not dot:
            raise StudyError(f"--set {item!r}: expected NOTEBOOK.PARAMETER=JSON_VALUE, e.g. k_ablation.seeds=[0,1]")
        try:
            value = json.loads(text)
        except json.JSONDecodeError:
            value = text
        overrides.setdefault(notebook, {})[name] = value
    return overrides


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m upa.study", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--profile", default="demo", help="demo (CPU, embedded data, random weights) or gpu")
    parser.add_argument("--book-root", default=".", help="folder with _config.yml, _toc.yml and book/")
    parser.add_argument("--notebooks-dir", default=None, help="notebook folder (default: BOOK_ROOT/notebooks)")
    parser.add_argument("--executed-dir", default=None, help="executed copies (default: BOOK_ROOT/book/executed)")
    parser.add_argument("--data-root", default="data", help="datasets in the CoOp layout; demo data is written here")
    parser.add_argument("--results-dir", default="results", help="result JSON files")
    parser.add_argument("--cache-dir", default=".cache/upa", help="feature cache shared by all notebooks")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    parser.add_argument("--backbone", default=None, help="open_clip model for every notebook with one backbone")
    parser.add_argument("--weights", default=None, help="random, pretrained:TAG or file:PATH for every notebook")
    parser.add_argument("--hf-cache-dir", default=None, help="Hugging Face hub cache for pretrained tags")
    parser.add_argument("--model-config-dir", default=None, help="extra open_clip model config folder")
    parser.add_argument("--only", nargs="*", default=None, help="run only these notebooks (file stems)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="NOTEBOOK.PARAMETER=JSON",
                        help="override one parameter of one notebook, e.g. --set k_ablation.seeds=[0,1]")
    parser.add_argument("--no-book", action="store_true", help="execute and collect, but do not build the book")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    start = time.perf_counter()
    from papermill.exceptions import PapermillExecutionError

    try:
        study = run_study(
            profile=args.profile, book_root=args.book_root, notebooks_dir=args.notebooks_dir,
            executed_dir=args.executed_dir, data_root=args.data_root, results_dir=args.results_dir,
            cache_dir=args.cache_dir, device=args.device, backbone=args.backbone, weights=args.weights,
            hf_cache_dir=args.hf_cache_dir, model_config_dir=args.model_config_dir,
            overrides=_parse_overrides(args.overrides), only=args.only, build=not args.no_book,
        )
    except StudyError as error:
        print(f"upa.study: error: {error}", file=sys.stderr)
        return 2
    except PapermillExecutionError as error:
        print(f"upa.study: a notebook raised, so the book was not built. The executed copy with the "
              f"traceback is in the executed folder.\n{error}", file=sys.stderr)
        return 1
    for name, seconds in study.seconds.items():
        print(f"{name}: {seconds:.0f} s")
    print(f"study wall time {time.perf_counter() - start:.0f} s")
    if study.book_html:
        print(f"book: {study.book_html / 'index.html'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
