"""The vision evaluation (eval/vision/) is development tooling like loadtest/: nothing in the
server imports it and the wheel does not ship it; its metrics score what they say they do."""

from __future__ import annotations

import ast
from pathlib import Path

from eval.vision.degrade import DEGRADATIONS, in_target
from eval.vision.metrics import cer, levenshtein, reading_order, table_cells, word_recall

ROOT = Path(__file__).resolve().parents[2]


def test_no_server_module_imports_the_evaluation() -> None:
    hits = []
    for path in sorted((ROOT / "server").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import) else
                     [str(node.module)] if isinstance(node, ast.ImportFrom) and node.level == 0
                     else [])
            hits += [f"{path}: {n}" for n in names if n == "eval" or n.startswith("eval.")]
    assert hits == []


def test_the_wheel_leaves_the_evaluation_out() -> None:
    """What `[tool.setuptools.packages.find]` selects holds no `eval` package."""
    import tomllib

    from setuptools import find_namespace_packages

    find = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"][
        "packages"]["find"]
    packages = [p for where in find.get("where", ["."])
                for p in find_namespace_packages(str(ROOT / where), include=find["include"],
                                                 exclude=find.get("exclude", ()))]
    assert "server.vision" in packages
    assert [p for p in packages if p.split(".")[0] == "eval"] == []


def test_edit_distance_and_scores() -> None:
    assert levenshtein("kitten", "sitting") == 3
    assert levenshtein("", "abc") == 3 and levenshtein("abc", "") == 3
    assert levenshtein("flaw", "lawn") == 2
    assert levenshtein("मासिक", "मासिक") == 0
    assert cer("Total  283.50", "Total 283.50") == 0.0
    assert cer("Totel 283.50", "Total 283.50") == 1 / 12
    assert word_recall("a b", "a b c d") == 0.5
    assert reading_order("c b a", "a b c") == 1 / 3
    assert reading_order("a b c", "a b c") == 1.0


def test_table_cells_are_exact_at_their_row_and_column() -> None:
    truth = [["Item", "Qty"], ["Apples", "1"], ["Pears", "12"]]
    assert table_cells([["Item", "Qty"], ["Pears", "12"], ["Apples", "1"]], truth) == (6, 6)
    assert table_cells([["Item", "Qty"], ["Apples", ""], ["Pears", "12"]], truth) == (5, 6)
    assert table_cells([["Qty", "Item"]], truth) == (0, 6)


def test_the_target_set_is_the_issues() -> None:
    target = [d for d in DEGRADATIONS if in_target(d)]
    assert target and all(abs(d.rotate) <= 3 and d.noisy for d in target)
    assert {d.dpi for d in target} == {150, 200, 300}
