"""Cross-rank agreement before a collective: every rank of a group raises the same error, or none does.

A public collective entry (``dsp.switch``, ``ulysses_attention``, ``zeco.sp_gla``, ...) validates its
arguments on each rank; a rank that raised alone would leave its peers waiting in the next
collective until the timeout, and ranks that disagree on shapes would hang or compute garbage. So
every rank first runs :func:`exchange`: ONE all-gather of a fixed 24-byte header per rank,

    [status, signature digest, value]        int64 x 3, on :func:`longseq.comm.collective_device`

``status`` is 0, or the code of this rank's own argument error; the digest is a 63-bit hash of what
must match on every rank (dtypes, the sizes that are not sharded, options, device type); ``value``
is one integer the caller wants from every rank anyway (a piece length, a local size), so a size
exchange the call needed rides in the same message. When every status is 0 and every digest equal,
that is all; otherwise (the cold path only) an ``all_gather_object`` of the readable details builds
one message, and every rank raises it with the same exception type (``ValueError``, or
``TypeError`` when every failing rank raised one).

The header is fixed in size, so ranks that disagree on anything still meet in the same collective;
it runs on every call (no cache that one rank could leave while another keeps it). Its bytes are
control bytes in the ledger (``CommRecord.control_sent``), not payload, so the volume formulas of
the methods hold unchanged. Every rank of the group must call it (a rank outside the group raises
locally first, :func:`longseq.comm.require_member`); with one rank it only raises the local error.
"""
from __future__ import annotations

import hashlib
from typing import Any, Callable, Optional, Sequence

import torch

from . import comm

__all__ = ["exchange", "local_error", "digest"]

_TYPES = {1: ValueError, 2: TypeError}
_CODES = {ValueError: 1, TypeError: 2}


def local_error(validate: Callable[[], Any]) -> tuple[Any, Optional[BaseException]]:
    """``(validate(), None)``, or ``(None, the ValueError / TypeError it raised)``."""
    try:
        return validate(), None
    except (ValueError, TypeError) as e:
        return None, e


def digest(signature: Any) -> int:
    """A 63-bit hash of ``repr(signature)`` (non-negative int64)."""
    return int.from_bytes(hashlib.blake2b(repr(signature).encode(), digest_size=8).digest(), "little") >> 1


def _describe(sig: Any) -> str:
    if isinstance(sig, dict):
        return ", ".join(f"{k}={v!r}" for k, v in sig.items())
    return repr(sig)


def _message(what: str, details: Sequence[tuple]) -> tuple[type, str]:
    errors = [(t, e) for _, t, e in details if e]
    if errors and len({e for _, e in errors}) == 1 and len(errors) == len(details):
        return _TYPES.get(errors[0][0], ValueError), errors[0][1]      # every rank: the same argument error
    if errors:
        kind = _TYPES.get(errors[0][0], ValueError) if len({t for t, _ in errors}) == 1 else ValueError
        lines = "\n".join(f"  rank {r}: " + (f"error: {e}" if e else "ok") for r, (_, _, e) in enumerate(details))
        return kind, f"{what}: rank(s) {[r for r, (_, _, e) in enumerate(details) if e]} got bad arguments:\n{lines}"
    sigs = [s for s, _, _ in details]
    if all(isinstance(s, dict) for s in sigs):
        fields = [f for f in sigs[0] if any(s.get(f) != sigs[0].get(f) for s in sigs)]
        fields += [f for s in sigs for f in s if f not in sigs[0] and f not in fields]
        rows = "\n".join(f"  rank {r}: " + ", ".join(f"{f}={s.get(f)!r}" for f in fields) for r, s in enumerate(sigs))
        return ValueError, (f"{what}: the ranks of the group disagree on {', '.join(fields)} (every rank must pass "
                            f"the same dtypes, devices, options and sizes of the dims that are not sharded):\n{rows}")
    rows = "\n".join(f"  rank {r}: {_describe(s)}" for r, s in enumerate(sigs))
    return ValueError, (f"{what}: the ranks of the group disagree (every rank must pass the same dtype and the same "
                        f"sizes of the dims that are not sharded, and valid arguments):\n{rows}")


def exchange(group: Any, what: str, signature: Any, error: Optional[BaseException] = None, *, tag: str,
             value: int = 0) -> list[int]:
    """Every rank's ``value`` (in group-rank order), after making sure that every rank of ``group``
    has the same ``signature`` and no rank an ``error``; else raise the same exception on every
    rank (module docstring). ``error``: this rank's own argument error (an exception) or None."""
    P = comm.group_size(group)
    if P == 1:
        if error is not None:
            raise error
        return [int(value)]
    status = _CODES.get(type(error), 1) if error is not None else 0
    header = torch.tensor([status, digest(signature), int(value)], dtype=torch.int64,
                          device=comm.collective_device(group))
    everyone = comm.all_gather(header, group, dim=0, tag=tag, control=True).view(P, 3).tolist()
    if all(s == 0 for s, _, _ in everyone) and len({d for _, d, _ in everyone}) == 1:
        return [v for _, _, v in everyone]
    mine = (signature, status, None if error is None else str(error))
    kind, msg = _message(what, comm.all_gather_object(mine, group, tag=tag + ".detail", control=True))
    raise kind(msg)
