"""Every Python block of README.md and docs/*.md runs as written, or is marked as a fragment.

The marker (documented at the top of docs/architecture.md, "Code blocks in the docs") is an HTML
comment on the line before the fence::

    <!-- fragment -->          part of a larger program: it must compile, and each of its imports
                               must resolve (run alone)
    (no marker)                a whole program: it runs as written on the test pool's 2 gloo
                               processes (as ``torchrun --nproc_per_node 2 file.py`` would run it;
                               ``longseq.init_distributed()`` finds the pool's process group)

Also: every ``docs/X.md, 'Section'`` citation in the code (messages, docstrings, configs) names a
heading that exists in that file.
"""
from __future__ import annotations

import ast
import re
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
FRAGMENT = re.compile(r"^\s*<!--\s*fragment\b.*-->\s*$")
FENCE = re.compile(r"^(\s*)```python\s*$")


def blocks() -> list[tuple[str, str, bool]]:
    """(``file:line``, code, is_fragment) for every fenced python block."""
    out = []
    for doc in DOCS:
        lines = doc.read_text().splitlines()
        i = 0
        while i < len(lines):
            m = FENCE.match(lines[i])
            if not m:
                i += 1
                continue
            start, body = i, []
            i += 1
            while i < len(lines) and lines[i].strip() != "```":
                body.append(lines[i])
                i += 1
            prev = next((lines[j] for j in range(start - 1, -1, -1) if lines[j].strip()), "")
            out.append((f"{doc.relative_to(ROOT)}:{start + 1}", textwrap.dedent("\n".join(body)) + "\n",
                        bool(FRAGMENT.match(prev))))
            i += 1
    return out


BLOCKS = blocks()


def test_the_extraction_finds_both_kinds():
    assert len(BLOCKS) >= 10
    assert any(f for _, _, f in BLOCKS) and any(not f for _, _, f in BLOCKS)


@pytest.mark.parametrize("where,code", [(w, c) for w, c, frag in BLOCKS if frag], ids=lambda v: v if ":" in str(v)
                         and "\n" not in str(v) else "")
def test_a_fragment_compiles_and_its_imports_resolve(where, code):
    tree = ast.parse(code, where)              # a SyntaxError names the block
    compile(tree, where, "exec")
    for node in ast.walk(tree):
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            stmt = ast.unparse(node)
            try:
                exec(stmt, {})
            except ImportError as e:
                pytest.fail(f"{where}: `{stmt}` does not resolve: {e}")


def _run_block(code: str, where: str) -> str:
    """On each pool rank: the block in a fresh namespace, as a script."""
    import contextlib
    import io
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        exec(compile(code, where, "exec"), {"__name__": "__main__"})
    return buf.getvalue()


@pytest.mark.parametrize("where,code", [(w, c) for w, c, frag in BLOCKS if not frag],
                         ids=lambda v: v if ":" in str(v) and "\n" not in str(v) else "")
def test_a_block_runs_as_written_on_two_processes(where, code, dist_pool):
    dist_pool(2).run(_run_block, code, where)


CITATION = re.compile(r"""docs/([\w-]+\.md),? ["'`]([^"'`\n]+)["'`]""")


def citations() -> list[tuple[str, str, str]]:
    out = []
    for f in [*(ROOT / "longseq").rglob("*.py"), *(ROOT / "longseq").rglob("*.yaml"), *(ROOT / "examples").glob("*.py")]:
        for m in CITATION.finditer(f.read_text()):
            out.append((str(f.relative_to(ROOT)), m.group(1), m.group(2)))
    return out


def test_every_section_cited_in_the_code_exists():
    found = citations()
    assert any(doc == "training.md" and sec == "Data" for _, doc, sec in found), found   # the data errors cite one
    bad = []
    for where, doc, section in found:
        path = ROOT / "docs" / doc
        heads = {h.strip() for h in re.findall(r"^#+ (.+)$", path.read_text(), re.M)} if path.is_file() else set()
        if section not in heads:
            bad.append(f"{where}: docs/{doc}, {section!r}: no such heading")
    assert bad == []
