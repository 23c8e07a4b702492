"""The built book: every toc page exists and shows each table and figure its chapter promises."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

from upa import study
from test_notebooks import build_study_once

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="session")
def book_html(tmp_path_factory) -> Path:
    built = build_study_once(tmp_path_factory.mktemp("study"))
    return built["run"].book_html


def toc_files() -> list[str]:
    toc = yaml.safe_load((ROOT / "_toc.yml").read_text())
    files = [toc["root"]]
    for part in toc["parts"]:
        files += [chapter["file"] for chapter in part["chapters"]]
    return files


def test_toc_lists_every_notebook_chapter():
    chapters = {name.removeprefix("book/executed/") for name in toc_files() if name.startswith("book/executed/")}
    assert chapters == set(study.PROMISES)


def test_config_renders_executed_copies_only():
    config = yaml.safe_load((ROOT / "_config.yml").read_text())
    assert config["execute"]["execute_notebooks"] == "off"
    assert config["only_build_toc_files"] is True


@pytest.mark.slow
def test_book_builds_every_toc_page(book_html):
    for name in toc_files():
        assert (book_html / f"{name}.html").is_file(), name


@pytest.mark.slow
@pytest.mark.parametrize("chapter", sorted(study.PROMISES))
def test_book_chapter_shows_promised_tables_and_figures(book_html, chapter):
    html = (book_html / "book" / "executed" / f"{chapter}.html").read_text()
    for key in study.PROMISES[chapter]["tables"]:
        caption = re.search(rf"<caption>Table {re.escape(key)}:", html)
        assert caption, f"Table {key} missing from {chapter}"
        assert "</table>" in html[caption.end():], f"Table {key} has no table body"
    for key in study.PROMISES[chapter]["figures"]:
        start = html.find(f"Figure {key}:")
        assert start >= 0, f"Figure {key} missing from {chapter}"
        following = html[start:]
        next_title = re.search(r"(Figure|Table) [a-z-]+:", following[len(f"Figure {key}:"):])
        end = len(following) if next_title is None else next_title.start() + len(f"Figure {key}:")
        assert "<img" in following[:end], f"Figure {key} has no image"


@pytest.mark.slow
def test_book_labels_demo_numbers(book_html):
    html = (book_html / "book" / "executed" / "recognition.html").read_text()
    assert "NOT a reproduction" in html
    assert "randomly initialised" in html
    simulation = (book_html / "book" / "executed" / "simulation.html").read_text()
    assert "SIMULATION" in simulation


@pytest.mark.slow
def test_book_method_page_explains_defaults(book_html):
    html = (book_html / "book" / "method.html").read_text()
    assert "init_alpha" in html
    assert "upa.method.up_adapter_logits" in html
