"""The layout's promises: the article's classes at the article's size, modules short enough
to read, a reader's guide that points at real code and real tests, and the article's names
importable from the package."""

from __future__ import annotations

import ast
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from conftest import ROOT

PACKAGE = ROOT / "transformer"

# Lines of code of the reference (harvardnlp's the_annotated_transformer.py, 2022), counted
# as ``code_lines`` counts ours: no blank lines, comments or docstrings. The reference's
# ``run_epoch`` is a function; ours is ``Trainer.run_epoch``.
REFERENCE = {
    ("model/attention.py", "MultiHeadedAttention"): 29,
    ("model/architecture.py", "SublayerConnection"): 7,
    ("training/loss.py", "LabelSmoothing"): 20,
    ("data/batching.py", "Batch"): 16,
    ("training/schedule.py", "rate"): 6,
    ("inference/search.py", "greedy_decode"): 14,
    ("training/trainer.py", "run_epoch"): 49,
}
MAX_MODULE_LINES = 400


def _docstring_lines(node: ast.AST) -> set[int]:
    lines = set()
    for n in ast.walk(node):
        body = getattr(n, "body", None)
        if isinstance(n, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and body:
            first = body[0]
            if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant) and isinstance(first.value.value, str):
                lines.update(range(first.lineno, first.end_lineno + 1))
    return lines


def code_lines(source: str, name: str) -> int:
    """Lines of code of the class or function ``name`` (found anywhere in ``source``)."""
    tree = ast.parse(source)
    node = next(n for n in ast.walk(tree)
                if isinstance(n, (ast.ClassDef, ast.FunctionDef)) and n.name == name)
    docs = _docstring_lines(node)
    lines = source.splitlines()[node.lineno - 1:node.end_lineno]
    return sum(1 for i, line in enumerate(lines, node.lineno)
               if line.strip() and not line.strip().startswith("#") and i not in docs)


def test_code_lines_counts_code_only():
    source = textwrap.dedent('''
        class A:
            """A docstring
            over two lines."""

            # a comment
            def f(self):
                """One more."""
                return 1  # code with a comment
    ''')
    assert code_lines(source, "A") == 3  # class, def, return
    assert code_lines(source, "f") == 2


@pytest.mark.parametrize("where", REFERENCE, ids=[name for _, name in REFERENCE])
def test_the_articles_classes_keep_the_articles_size(where):
    path, name = where
    ours = code_lines((PACKAGE / path).read_text(encoding="utf-8"), name)
    assert ours <= 1.5 * REFERENCE[where], f"{path}: {name} has {ours} lines of code, the reference {REFERENCE[where]}"


def modules() -> list[Path]:
    return sorted(PACKAGE.rglob("*.py"))


def test_every_module_is_short_and_says_what_it_is():
    for path in modules():
        text = path.read_text(encoding="utf-8")
        name = path.relative_to(ROOT)
        assert len(text.splitlines()) <= MAX_MODULE_LINES, f"{name} is over {MAX_MODULE_LINES} lines"
        assert ast.get_docstring(ast.parse(text)), f"{name} has no module docstring"


def test_every_folder_is_a_package():
    """setuptools' package finder (and so ``pip install .``) skips folders without one."""
    folders = {path.parent for path in modules()}
    assert all((folder / "__init__.py").is_file() for folder in folders), sorted(map(str, folders))


def defined_names(path: Path) -> set[str]:
    """Top-level names of a module (imports included), and the names of its classes' methods."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    names = set()
    for node in tree.body:
        if isinstance(node, (ast.ClassDef, ast.FunctionDef)):
            names.add(node.name)
            for item in getattr(node, "body", []) if isinstance(node, ast.ClassDef) else []:
                if isinstance(item, ast.FunctionDef):
                    names.add(item.name)
        elif isinstance(node, ast.Assign):
            names.update(t.id for t in node.targets if isinstance(t, ast.Name))
        elif isinstance(node, ast.ImportFrom):
            names.update(a.asname or a.name for a in node.names)
    return names


def guide_references() -> list[tuple[str, str]]:
    """(file, name) for every "`file.py`: `name`, `name` (`method`)" in the guide's tables;
    a dotted name (``Encoder.norm``) is checked by its first part."""
    refs = []
    for line in (ROOT / "docs" / "guide.md").read_text(encoding="utf-8").splitlines():
        if not line.startswith("|"):
            continue
        for cell in line.split("|"):
            for file, names in re.findall(r"`([\w/]+\.py)`: ((?:`[\w.]+`(?: \([^)]*\))?(?:, )?)+)", cell):
                refs += [(file, n) for n in re.findall(r"`([\w.]+)`", names)]
    return refs


def test_the_guide_points_at_code_and_tests_that_exist():
    refs = guide_references()
    assert len(refs) > 60  # the tables were read
    missing = []
    for file, name in refs:
        path = ROOT / "tests" / file if file.startswith("test_") else PACKAGE / file
        if not path.is_file() or name.split(".")[0] not in defined_names(path):
            missing.append(f"{file}: {name}")
    assert not missing, missing


def test_the_articles_names_come_from_the_package_and_config_needs_no_torch():
    script = textwrap.dedent("""
        import sys
        import transformer.config
        assert "torch" not in sys.modules, "importing the config loaded torch"
        from transformer import (make_model, EncoderDecoder, MultiHeadedAttention, LabelSmoothing, rate, Batch,
                                 subsequent_mask, greedy_decode, beam_search, Translator)
        model = make_model(11, 11, N=1, d_model=32, d_ff=64, h=4)
        assert isinstance(model, EncoderDecoder) and model.d_model == 32 and model.tgt_vocab == 11
        assert rate(1, 512, 1.0, 4000) > 0 and subsequent_mask(3).shape == (1, 3, 3)
    """)
    result = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
