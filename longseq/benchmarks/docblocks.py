"""Generated blocks in the docs: tables a benchmark writes, pasted between markers, never by hand.

A doc holds ``<!-- generated: NAME -->`` ... ``<!-- end generated: NAME -->``; :func:`replace_block`
puts a benchmark's markdown there (``--update-docs`` of the benchmarks), :func:`read_block` reads it
back (tests/test_docs_generated.py checks each block equals the results file it came from).
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Optional

__all__ = ["replace_block", "read_block", "markers"]


def markers(name: str) -> tuple[str, str]:
    return f"<!-- generated: {name} -->", f"<!-- end generated: {name} -->"


def _pattern(name: str) -> re.Pattern:
    b, e = markers(name)
    return re.compile(re.escape(b) + r"\n(.*?)" + re.escape(e), re.S)


def read_block(doc: Path, name: str) -> Optional[str]:
    """The text between the markers of ``name`` in ``doc`` (None if the doc has no such block)."""
    m = _pattern(name).search(Path(doc).read_text())
    return None if m is None else m.group(1)


def replace_block(doc: Path, name: str, text: str) -> None:
    """Replace the block ``name`` of ``doc`` by ``text`` (``ValueError`` if the markers are missing)."""
    doc = Path(doc)
    src = doc.read_text()
    body = text if text.endswith("\n") else text + "\n"
    new, n = _pattern(name).subn(lambda m: markers(name)[0] + "\n" + body + markers(name)[1], src)
    if n != 1:
        raise ValueError(f"{doc}: expected one block '{name}' between {markers(name)}, found {n}; add the markers")
    doc.write_text(new)
