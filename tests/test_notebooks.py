"""Study notebooks: parameters cells, parameter checks, and the study runner's failure handling.

The end-to-end test executes every notebook through ``upa.study`` on generated images with a tiny
open_clip model and checks that each overridden parameter reaches the result files.
"""

from __future__ import annotations

import ast
import json
import shutil
from pathlib import Path

import nbformat
import pytest
from papermill.exceptions import PapermillExecutionError

from upa import notebook_params, study
from upa.notebook_params import ParameterError, validate_parameters

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))


def parameters_source(path: Path) -> str:
    cells = [cell for cell in nbformat.read(path, as_version=4).cells
             if "parameters" in cell.metadata.get("tags", [])]
    assert len(cells) == 1, f"{path.name} has {len(cells)} parameters cells"
    return cells[0].source


def assigned_literals(source: str) -> dict:
    values = {}
    for node in ast.parse(source).body:
        assert isinstance(node, ast.Assign), f"the parameters cell may only assign values: {ast.unparse(node)}"
        values[node.targets[0].id] = ast.literal_eval(node.value)
    return values


def test_notebooks_match_declarations():
    assert {path.stem for path in NOTEBOOKS} == set(notebook_params.NOTEBOOKS)
    assert set(study.NOTEBOOK_ORDER) == set(notebook_params.NOTEBOOKS)
    assert set(study.PROMISES) == set(notebook_params.NOTEBOOKS)


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda path: path.stem)
def test_notebook_parameters_cell_declares_defaults(path):
    values = assigned_literals(parameters_source(path))
    declared = notebook_params.declared(path.stem)
    assert list(values) == list(declared)
    assert values["profile"] == "demo"
    for name, parameter in declared.items():
        demo = notebook_params.profile_default(path.stem, parameter, "demo")
        gpu = notebook_params.profile_default(path.stem, parameter, "gpu")
        if name != "profile":
            assert values[name] == (demo if demo == gpu else None), name


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda path: path.stem)
def test_notebook_states_outputs_and_holds_no_method_code(path):
    notebook = nbformat.read(path, as_version=4)
    top = notebook.cells[0]
    assert top.cell_type == "markdown"
    assert "Produces" in top.source
    assert "results/" in top.source
    for promised in study.PROMISES[path.stem]["tables"]:
        assert f"Table {promised}" in top.source
    for promised in study.PROMISES[path.stem]["figures"]:
        assert f"Figure {promised}" in top.source
    code = "\n".join(cell.source for cell in notebook.cells if cell.cell_type == "code")
    assert "validate_parameters(globals()" in code
    assert "def " not in code
    assert "upa.method" not in code
    assert "import torch" not in code


def test_validate_parameters_resolves_profile_defaults():
    resolved = validate_parameters({"profile": "gpu", "backbone": None, "beta": 2}, "k_ablation")
    assert resolved["backbone"] == "RN50"
    assert resolved["weights"] == "pretrained:openai"
    assert resolved["beta"] == 2.0
    assert isinstance(resolved["beta"], float)
    assert resolved["k_values"] == [1, 2, 4, 8, 16, 32, 64]


def test_validate_parameters_rejects_unknown_name():
    with pytest.raises(ParameterError, match="unknown parameter.*bakbone"):
        validate_parameters({"profile": "demo", "bakbone": "RN50"}, "k_ablation")


def test_validate_parameters_rejects_wrong_type():
    with pytest.raises(ParameterError, match="'backbone'.*must be a str, got int 50"):
        validate_parameters({"backbone": 50}, "k_ablation")
    with pytest.raises(ParameterError, match="'seeds'.*list of int.*str '1'"):
        validate_parameters({"seeds": [0, "1"]}, "recognition")
    with pytest.raises(ParameterError, match="'overwrite'.*bool"):
        validate_parameters({"overwrite": 1}, "simulation")


def test_validate_parameters_rejects_impossible_values():
    with pytest.raises(ParameterError, match="'k_values'.*>= 1, got \\[0\\]"):
        validate_parameters({"k_values": [0, 4]}, "k_ablation")
    with pytest.raises(ParameterError, match="'etas'.*> 0"):
        validate_parameters({"etas": [0.0, 1.0]}, "beta_eta_epochs")
    with pytest.raises(ParameterError, match="'profile'.*demo.*gpu.*'laptop'"):
        validate_parameters({"profile": "laptop"}, "recognition")
    with pytest.raises(ParameterError, match="'seeds'.*twice"):
        validate_parameters({"seeds": [1, 1]}, "recognition")


def test_validate_parameters_ignores_kernel_names():
    namespace = {"In": [], "Out": {}, "get_ipython": print, "_": None, "json": json, "profile": "demo"}
    assert validate_parameters(namespace, "simulation")["profile"] == "demo"


def test_runner_rejects_unknown_backbone_before_work(tmp_path):
    from upa import sweeps

    params = validate_parameters({"backbones": ["ViT-S-32", "ViT-Q-99"], "data_root": str(tmp_path / "data"),
                                  "results_dir": str(tmp_path / "results")}, "backbones")
    with pytest.raises(ValueError, match="unknown backbone 'ViT-Q-99'"):
        sweeps.run_backbones(params)
    assert not (tmp_path / "data").exists()
    assert not (tmp_path / "results").exists()


def write_notebook(path: Path, cells: list) -> Path:
    notebook = nbformat.v4.new_notebook()
    notebook.cells = cells
    notebook.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nbformat.write(notebook, path)
    return path


def tagged_parameters(source: str):
    cell = nbformat.v4.new_code_cell(source)
    cell.metadata["tags"] = ["parameters"]
    return cell


def test_study_rejects_notebook_without_parameters_cell(tmp_path):
    write_notebook(tmp_path / "good.ipynb", [tagged_parameters("x = 1")])
    write_notebook(tmp_path / "untagged.ipynb", [nbformat.v4.new_code_cell("x = 1")])
    with pytest.raises(study.StudyError, match="untagged.ipynb has 0 cells tagged 'parameters'"):
        study.run_study(book_root=tmp_path, notebooks_dir=tmp_path, executed_dir=tmp_path / "out",
                        results_dir=tmp_path / "results", build=False, collect=False)
    assert not (tmp_path / "out").exists()


def test_study_fails_on_raising_notebook(tmp_path):
    write_notebook(tmp_path / "planted.ipynb", [
        tagged_parameters("profile = 'demo'"),
        nbformat.v4.new_code_cell("raise RuntimeError('planted failure')"),
    ])
    with pytest.raises(PapermillExecutionError, match="planted failure"):
        study.run_study(book_root=tmp_path, notebooks_dir=tmp_path, executed_dir=tmp_path / "out",
                        results_dir=tmp_path / "results", build=False, collect=False)


def test_study_main_exits_nonzero_on_raising_notebook(tmp_path):
    write_notebook(tmp_path / "planted.ipynb", [
        tagged_parameters("profile = 'demo'"),
        nbformat.v4.new_code_cell("raise RuntimeError('planted failure')"),
    ])
    code = study.main(["--book-root", str(tmp_path), "--notebooks-dir", str(tmp_path),
                       "--executed-dir", str(tmp_path / "out"), "--results-dir", str(tmp_path / "results"),
                       "--no-book"])
    assert code != 0


def test_notebook_stops_on_unknown_parameter_before_work(tmp_path):
    results = tmp_path / "results"
    with pytest.raises(PapermillExecutionError, match="unknown parameter.*bogus"):
        study.run_study(book_root=ROOT, only=["simulation"], executed_dir=tmp_path / "out", results_dir=results,
                        overrides={"simulation": {"bogus": 1}}, build=False, collect=False)
    assert not results.exists()


# Every image notebook runs on the generated colour folder with the tiny model, one seed, one
# view and two epochs, so the whole study with the book build takes about two minutes on 2 cores.
_TINY_RUN = {"seeds": [0], "k": 3, "n_views": 1, "epochs": 2, "num_workers": 0, "extract_batch_size": 32}
STUDY_OVERRIDES = {
    "recognition": {**_TINY_RUN, "datasets": ["Folder"], "seeds": [7]},
    "domain_generalisation": {**_TINY_RUN, "source": "Folder", "targets": ["ImageNetR"]},
    "k_ablation": {**_TINY_RUN, "dataset": "Folder", "k_values": [1, 2]},
    "beta_eta_epochs": {**_TINY_RUN, "dataset": "Folder", "betas": [0.5, 2.0], "etas": [2.0],
                        "epoch_values": [0, 2]},
    "backbones": {**_TINY_RUN, "dataset": "Folder"},
    "open_choices": {**_TINY_RUN, "dataset": "Folder", "prompt_choices": ["single"],
                     "prototype_view_choices": ["center", "augmented"], "fill_shortfall_choices": ["fill"],
                     "n_views_values": [1, 2]},
    "simulation": {"seeds": [0], "text_noises": [1.5], "image_noises": [0.5], "k_values": [4, 8], "k": 4,
                   "epochs": 2, "num_classes": 4, "train_per_class": 20, "test_per_class": 20, "dim": 16},
}
_BUILT: dict = {}
# Result folder of the generated "Folder" dataset: upa.experiments.result_path appends the data
# folder's name, here the "colours" folder that build_study_once writes.
FOLDER_RESULTS = "Folder-colours"


def build_study_once(base: Path) -> dict:
    """Execute every notebook and build the book once per test session; test_book.py shares it."""
    if "study" in _BUILT:
        return _BUILT["study"]
    from conftest import TINY_ARCH, TINY_CONFIG, write_colour_folder

    configs = base / "model_configs"
    configs.mkdir(parents=True)
    (configs / f"{TINY_ARCH}.json").write_text(json.dumps(TINY_CONFIG))
    data = write_colour_folder(base / "colours")
    book = base / "book"
    book.mkdir()
    for name in ("_config.yml", "_toc.yml", "references.bib"):
        shutil.copy(ROOT / name, book / name)
    shutil.copytree(ROOT / "book", book / "book", ignore=shutil.ignore_patterns("executed", "_build"))

    overrides = {name: dict(values) for name, values in STUDY_OVERRIDES.items()}
    overrides["backbones"]["backbones"] = [TINY_ARCH]
    run = study.run_study(
        profile="demo", book_root=book, notebooks_dir=ROOT / "notebooks", data_root=data,
        results_dir=base / "results", cache_dir=base / "cache", device="cpu", backbone=TINY_ARCH,
        model_config_dir=str(configs), overrides=overrides,
    )
    _BUILT["study"] = {"run": run, "results": base / "results", "book": book, "arch": TINY_ARCH}
    return _BUILT["study"]


@pytest.fixture(scope="session")
def built_study(tmp_path_factory) -> dict:
    return build_study_once(tmp_path_factory.mktemp("study"))


def load_results(folder: Path) -> list[dict]:
    return [json.loads(path.read_text()) for path in sorted(folder.glob("*.json"))
            if not path.name.startswith("not-run__")]


@pytest.mark.slow
def test_overrides_reach_result_files(built_study):
    results = built_study["results"]
    arch = built_study["arch"]

    recognition = load_results(results / "recognition" / FOLDER_RESULTS)
    assert sorted(record["seed"] for record in recognition) == [7]
    assert {record["config"]["arch"] for record in recognition} == {arch}
    assert {record["config"]["k"] for record in recognition} == {3}
    imagenet_skipped = json.loads((results / "recognition" / "ImageNet" / f"not-run__{arch}__random.json").read_text())
    assert "runs Folder only" in imagenet_skipped["reason"]

    domain = load_results(results / "domain_generalisation" / FOLDER_RESULTS)
    assert [record["config"]["eval_datasets"] for record in domain] == [[]]
    assert (results / "domain_generalisation" / "ImageNetR" / f"not-run__{arch}__random.json").exists()

    assert sorted(record["config"]["k"] for record in load_results(results / "k_ablation" / FOLDER_RESULTS)) == [1, 2]
    grid = load_results(results / "beta_eta" / FOLDER_RESULTS)
    assert sorted((r["config"]["beta"], r["config"]["eta"]) for r in grid) == [(0.5, 2.0), (2.0, 2.0)]
    assert sorted(r["config"]["epochs"] for r in load_results(results / "epochs" / FOLDER_RESULTS)) == [0, 2]
    assert {r["config"]["arch"] for r in load_results(results / "backbones" / FOLDER_RESULTS)} == {arch}
    # The choice grid uses the overridden choices; the views ablation keeps the defaults of the rest.
    choices = load_results(results / "open_choices" / FOLDER_RESULTS)
    settings = {(r["config"]["prompts"], r["config"]["prototype_views"], r["config"]["fill_shortfall"],
                 r["config"]["n_views"]) for r in choices}
    assert settings == {("single", "center", True, 1), ("single", "augmented", True, 1),
                        ("ensemble", "center", False, 1), ("ensemble", "center", False, 2)}

    simulated = load_results(results / "simulation" / "simulated")
    assert {r["config"]["simulation"]["text_noise"] for r in simulated} == {1.5}
    assert {r["config"]["k"] for r in simulated} == {4, 8}
    assert all(r["reproduction"] is False for r in simulated)
    assert all("simulat" in r["provenance_label"] for r in simulated)


@pytest.mark.slow
def test_executed_notebooks_have_no_errors(built_study):
    for name, path in built_study["run"].executed.items():
        notebook = nbformat.read(path, as_version=4)
        outputs = [output for cell in notebook.cells if cell.cell_type == "code" for output in cell.outputs]
        assert not [output for output in outputs if output.output_type == "error"], name
        assert any("injected-parameters" in cell.metadata.get("tags", []) for cell in notebook.cells), name
