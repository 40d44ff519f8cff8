"""The communication ledger: every collective longseq issues is recorded here.

One ``Ledger`` per process (``LEDGER``). Each call through :mod:`longseq.comm` appends a
:class:`CommRecord` (op, tag, group size, dtype, elements and bytes sent and received by *this*
rank, counting only data that leaves or reaches the rank, never its own piece or padding).
Running totals by (op, tag) are always kept, at the cost of a dict update per collective;
full records are kept only inside a ``with LEDGER.recording() as rec:`` scope.

Volume conventions (per rank, P = group size, n = elements of this rank's input):
  all_to_all      sent = elements sent to the other P-1 ranks; recv likewise
  all_gather      sent = n·(P-1) (its piece reaches every peer); recv = sum of the peers' pieces
  reduce_scatter  sent = n - own chunk; recv = own chunk·(P-1)
  all_reduce      sent = recv = 2·n·(P-1)/P (bandwidth-optimal ring), rounded down
  send / recv     the message; broadcast: the source sends n·(P-1), the others receive n

Control bytes: what a collective moves to keep the ranks in agreement rather than as the method's
data (the cross-rank check headers of :mod:`longseq.agree`, the detail exchange of a failed check)
is recorded with ``control=True``: its bytes go to ``control_sent`` / ``control_recv`` and its
payload elements are 0, so payload totals (``bytes_sent``, the formulas in DESIGN.md) never include
them. ``Recording.control()`` / ``.payload()`` select the two kinds.
"""
from __future__ import annotations

import contextlib
import dataclasses
from collections import defaultdict
from typing import Iterable, Iterator

import torch

__all__ = ["CommRecord", "Ledger", "LEDGER", "summarize", "format_table", "recording", "human_bytes"]


@dataclasses.dataclass(frozen=True)
class CommRecord:
    """One collective as seen by one rank."""

    op: str
    tag: str
    group_size: int
    dtype: str
    elements_sent: int
    elements_recv: int
    element_size: int
    control_sent: int = 0      # bytes of agreement headers (not payload), see the module docstring
    control_recv: int = 0

    @property
    def control(self) -> bool:
        return bool(self.control_sent or self.control_recv)

    @property
    def bytes_sent(self) -> int:
        return self.elements_sent * self.element_size

    @property
    def bytes_recv(self) -> int:
        return self.elements_recv * self.element_size


class Recording(list):
    """The records of one ``Ledger.recording()`` scope (a list of :class:`CommRecord`)."""

    def filter(self, op: str | None = None, tag: str | None = None, tag_prefix: str | None = None) -> "Recording":
        return Recording(
            r
            for r in self
            if (op is None or r.op == op)
            and (tag is None or r.tag == tag)
            and (tag_prefix is None or r.tag.startswith(tag_prefix))
        )

    def control(self) -> "Recording":
        """The records of agreement headers only (``control=True``)."""
        return Recording(r for r in self if r.control)

    def payload(self) -> "Recording":
        """The records that move the methods' data (every record but the control ones)."""
        return Recording(r for r in self if not r.control)

    @property
    def control_bytes_sent(self) -> int:
        return sum(r.control_sent for r in self)

    @property
    def control_bytes_recv(self) -> int:
        return sum(r.control_recv for r in self)

    def count(self, op: str | None = None, **kw) -> int:  # type: ignore[override]
        return len(self.filter(op=op, **kw))

    @property
    def bytes_sent(self) -> int:
        return sum(r.bytes_sent for r in self)

    @property
    def bytes_recv(self) -> int:
        return sum(r.bytes_recv for r in self)

    @property
    def elements_sent(self) -> int:
        return sum(r.elements_sent for r in self)

    @property
    def elements_recv(self) -> int:
        return sum(r.elements_recv for r in self)


class Ledger:
    """Per-process record of collectives; see the module docstring for the volume rules."""

    def __init__(self) -> None:
        self._scopes: list[Recording] = []
        self.totals: dict[tuple[str, str], list[int]] = defaultdict(lambda: [0, 0, 0])  # calls, B sent, B recv
        self.enabled = True

    def record(self, op: str, tag: str, group_size: int, dtype: torch.dtype, sent: int, recv: int, *,
               control: bool = False) -> None:
        """``sent`` / ``recv``: elements of ``dtype``; ``control``: they are agreement headers, recorded
        as control bytes with no payload (module docstring)."""
        if not self.enabled:
            return
        elem = torch.empty((), dtype=dtype).element_size() if not isinstance(dtype, int) else dtype
        name = str(dtype).replace("torch.", "")
        if control:
            rec = CommRecord(op, tag, int(group_size), name, 0, 0, elem, int(sent) * elem, int(recv) * elem)
        else:
            rec = CommRecord(op, tag, int(group_size), name, int(sent), int(recv), elem)
        t = self.totals[(op, tag)]
        t[0] += 1
        t[1] += rec.bytes_sent
        t[2] += rec.bytes_recv
        for scope in self._scopes:
            scope.append(rec)

    @contextlib.contextmanager
    def recording(self) -> Iterator[Recording]:
        """Collect every record made inside the ``with`` block (scopes may nest)."""
        scope = Recording()
        self._scopes.append(scope)
        try:
            yield scope
        finally:
            self._scopes.remove(scope)

    def reset(self) -> None:
        self.totals.clear()


LEDGER = Ledger()


def recording() -> contextlib.AbstractContextManager[Recording]:
    """Shorthand for ``LEDGER.recording()``."""
    return LEDGER.recording()


def summarize(records: Iterable[CommRecord]) -> dict[tuple[str, str], dict[str, int]]:
    """Totals by (op, tag): calls, elements and bytes sent and received."""
    out: dict[tuple[str, str], dict[str, int]] = {}
    for r in records:
        s = out.setdefault((r.op, r.tag), dict(calls=0, elements_sent=0, elements_recv=0, bytes_sent=0, bytes_recv=0))
        s["calls"] += 1
        s["elements_sent"] += r.elements_sent
        s["elements_recv"] += r.elements_recv
        s["bytes_sent"] += r.bytes_sent
        s["bytes_recv"] += r.bytes_recv
    return out


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    return str(n)


def format_table(summary: dict[tuple[str, str], dict[str, int]] | Iterable[CommRecord], title: str = "") -> str:
    """A fixed-width table of a :func:`summarize` result (or of records), one row per (op, tag)."""
    if not isinstance(summary, dict):
        summary = summarize(summary)
    ow = max([17] + [len(op) + 1 for op, _ in summary])
    tw = max([28] + [len(tag) + 1 for _, tag in summary])
    head = f"{'op':<{ow}} {'tag':<{tw}} {'calls':>6} {'sent':>12} {'received':>12}"
    lines = [title] if title else []
    lines += [head, "-" * len(head)]
    tot = dict(calls=0, bytes_sent=0, bytes_recv=0)
    for (op, tag), s in sorted(summary.items()):
        lines.append(f"{op:<{ow}} {tag:<{tw}} {s['calls']:>6} {human_bytes(s['bytes_sent']):>12} {human_bytes(s['bytes_recv']):>12}")
        for k in tot:
            tot[k] += s[k]
    lines.append("-" * len(head))
    lines.append(f"{'total':<{ow}} {'':<{tw}} {tot['calls']:>6} {human_bytes(tot['bytes_sent']):>12} {human_bytes(tot['bytes_recv']):>12}")
    return "\n".join(lines)
