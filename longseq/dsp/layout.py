"""Layouts of DSP plans: named dims, einops-style folds and an ellipsis (pure shape arithmetic).

A layout names each dim of a tensor left to right, e.g. ``"B T S C"``; a parenthesised group is
one tensor dim that folds several named dims, row-major (``"(B T) S C"`` is a ``[B·T, S, C]``
tensor whose row ``b·T + t`` is frame t of sample b); ``...`` stands for any number of unnamed
dims that are left alone (``"(B T) ..."``: a per-frame mask of any rank).

Sizes are bound by name (``sizes``: whole sizes) and one dim may be sharded; a sharded dim
counts with this rank's local size (``tensor_split`` sizes). :func:`bind` checks a tensor against
a layout and infers at most one unknown name per group; :func:`unfold` gives every name its own
dim, :func:`fold` puts the groups back.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Callable, Mapping

import torch

__all__ = ["Layout", "parse", "LayoutError"]


class LayoutError(ValueError):
    """A tensor does not have the layout a plan gives it (the message names the sizes)."""


@dataclasses.dataclass(frozen=True)
class Layout:
    """A parsed layout: ``groups`` holds one tuple of names per tensor dim (``("...",)`` for the
    ellipsis)."""

    text: str
    groups: tuple[tuple[str, ...], ...]

    @property
    def names(self) -> list[str]:
        return [n for g in self.groups for n in g if n != "..."]

    @property
    def folded(self) -> list[str]:
        """Names that share a tensor dim with another name."""
        return [n for g in self.groups if len(g) > 1 for n in g]

    def __contains__(self, name: str) -> bool:
        return name in self.names

    def _dims(self, x: torch.Tensor) -> list[tuple[tuple[str, ...], list[int]]]:
        """``(group, tensor dims)`` per group; the ellipsis takes what the named groups leave."""
        named = len(self.groups) - (1 if ("...",) in self.groups else 0)
        if x.dim() < named or (("...",) not in self.groups and x.dim() != named):
            raise LayoutError(f"a tensor of shape {list(x.shape)} ({x.dim()} dims) cannot have the layout "
                              f"{self.text!r} ({named} dims{' or more' if named != len(self.groups) else ''})")
        out, d = [], 0
        for g in self.groups:
            n = x.dim() - named if g == ("...",) else 1
            out.append((g, list(range(d, d + n))))
            d += n
        return out


_PARSED: dict[str, Layout] = {}


def parse(text: str) -> Layout:
    """``"(B T) S C"`` -> Layout; raises LayoutError for a malformed layout or a repeated name.

    Memoised in a plain dict rather than ``functools.lru_cache``: plans parse their layouts inside
    the forward, which ``torch.compile`` traces, and Dynamo cannot trace a cache wrapper (it warns and
    traces the wrapped function on every compile); a dict lookup it traces and guards like any other."""
    lay = _PARSED.get(text)
    if lay is None:
        lay = _PARSED[text] = _parse(text)
    return lay


def _parse(text: str) -> Layout:
    groups, cur = [], None
    for tok in text.replace("(", " ( ").replace(")", " ) ").split():
        if tok == "(":
            if cur is not None:
                raise LayoutError(f"layout {text!r}: nested parentheses")
            cur = []
        elif tok == ")":
            if not cur:
                raise LayoutError(f"layout {text!r}: an empty or unopened group")
            groups.append(tuple(cur))
            cur = None
        elif cur is not None:
            if tok == "...":
                raise LayoutError(f"layout {text!r}: '...' cannot be folded")
            cur.append(tok)
        else:
            groups.append((tok,))
    if cur is not None:
        raise LayoutError(f"layout {text!r}: unclosed parenthesis")
    names = [n for g in groups for n in g]
    if len(set(names)) != len(names):
        raise LayoutError(f"layout {text!r}: a name appears twice")
    return Layout(text, tuple(groups))


def local_sizes(sizes: Mapping[str, int], sharded: str | None, local: Callable[[int], int]) -> dict[str, int]:
    """The sizes a tensor shows: the whole ones, with the ``sharded`` dim at ``local(whole)``."""
    out = dict(sizes)
    if sharded is not None and sharded in out:
        out[sharded] = local(out[sharded])
    return out


def bind(layout: Layout, x: torch.Tensor, sizes: dict[str, int], bindable: set[str], sharded: str | None,
         local: Callable[[int], int], what: str) -> list[str]:
    """Check ``x`` against ``layout`` given the whole ``sizes`` (``sharded``: the dim this tensor holds
    a local piece of, ``local(whole)`` its size) and add to ``sizes`` every name of ``bindable`` that
    it determines (single-name groups, or the one unknown name of a group). Returns the names
    still unknown (groups with two unknowns: bind them from another tensor first). Raises
    LayoutError naming ``what``, the shape and the sizes when ``x`` does not fit."""
    unknown = []
    for g, dims in layout._dims(x):
        if g == ("...",):
            continue
        n = int(x.shape[dims[0]])
        if len(g) == 1 and g[0] not in bindable:
            continue
        shown = local_sizes({k: sizes[k] for k in g if k in sizes}, sharded, local)
        missing = [k for k in g if k not in shown]
        known = math.prod(list(shown.values()))
        if len(missing) > 1:
            unknown += missing
            continue
        if not missing:
            if known != n:
                raise LayoutError(_mismatch(layout, x, g, dims[0], shown, what))
            continue
        k = missing[0]
        if known == 0 or n % known:
            raise LayoutError(_mismatch(layout, x, g, dims[0], shown, what))
        if k == sharded:
            raise LayoutError(f"{what}: the whole size of {k} is not known where it arrives sharded "
                              f"(layout {layout.text!r}, shape {list(x.shape)})")
        sizes[k] = n // known
    return unknown


def _mismatch(layout: Layout, x: torch.Tensor, g: tuple, dim: int, shown: dict, what: str) -> str:
    expr = "·".join(f"{k}={shown[k]}" if k in shown else k for k in g)
    return (f"{what} has shape {list(x.shape)}, but its layout {layout.text!r} makes dim {dim} "
            f"({' '.join(g)}) {expr} = {math.prod(shown.values()) if len(shown) == len(g) else '?'}, "
            f"not {x.shape[dim]}")


def unfold(layout: Layout, x: torch.Tensor, shown: Mapping[str, int]) -> tuple[torch.Tensor, list[str]]:
    """``x`` viewed with every name of ``layout`` on its own dim (sizes ``shown`` for the names of
    folded groups); also returns the names of the result's dims (``"..."`` for each ellipsis dim)."""
    shape, names = [], []
    for g, dims in layout._dims(x):
        if g == ("...",):
            shape += [x.shape[d] for d in dims]
            names += ["..."] * len(dims)
        else:
            shape += [x.shape[dims[0]]] if len(g) == 1 else [shown[k] for k in g]
            names += list(g)
    return x.reshape(shape), names


def fold(layout: Layout, y: torch.Tensor, shown: Mapping[str, int]) -> torch.Tensor:
    """The inverse of :func:`unfold`: every group back on one dim (sizes ``shown``)."""
    named = sum(len(g) for g in layout.groups if g != ("...",))
    ell = y.dim() - named
    shape, d = [], 0
    for g in layout.groups:
        if g == ("...",):
            shape += list(y.shape[d:d + ell])
            d += ell
        else:
            shape.append(y.shape[d] if len(g) == 1 else math.prod(shown[k] for k in g))
            d += len(g)
    return y.reshape(shape)
