"""Where the benchmarks read their inputs and write their results.

Paths are written as the docs name them, relative to the repository (``benchmarks/results/...``,
``configs/simulate/...``, ``docs/figures``). From a checkout (or an editable install) they resolve
against the repository, whose ``benchmarks`` and ``configs`` are links into the package. From an
installed package, inputs are found under the current directory first, then in the package's data
(``longseq/configs``, ``longseq/benchmarks/results``); results are written under the current directory.
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional, Union

__all__ = ["ROOT", "CHECKOUT", "data", "output"]

PACKAGE = Path(__file__).resolve().parents[1]        # .../longseq, in a checkout or in site-packages
CHECKOUT = (PACKAGE.parent / "setup.py").is_file()
ROOT = PACKAGE.parent if CHECKOUT else PACKAGE      # what relative paths resolve against


def data(rel: Optional[Union[str, Path]]) -> Optional[Path]:
    """An input file or folder (``None`` stays ``None``; an absolute path is kept)."""
    if rel is None:
        return None
    p = Path(str(rel))
    if p.is_absolute() or CHECKOUT:
        return ROOT / p
    return p.resolve() if p.exists() else ROOT / p


def output(rel: Optional[Union[str, Path]]) -> Optional[Path]:
    """Where a result goes (``None`` stays ``None``; an absolute path is kept)."""
    if rel is None:
        return None
    p = Path(str(rel))
    return ROOT / p if CHECKOUT else p.resolve()
