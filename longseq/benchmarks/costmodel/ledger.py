"""Communication volumes for the simulator, from the real ledger of each method's real code.

Nothing here knows a formula for any method. :func:`capture` runs one training step of a
:class:`benchmarks.workloads.Workload` (warm-up step first, then the recorded one) as rank ``r`` of
``P`` on a fake process group (:mod:`benchmarks.costmodel.fakepg`), so any ``P`` up to the papers'
256 can be recorded in one CPU process, on small shapes; the records are the ones
``longseq.comm`` writes for real runs (tests compare them with gloo runs, rank by rank).

**Scaling to the target shapes.** Records are summed per (op, tag with block / layer indices
replaced by ``*``, group size, dtype): a :class:`Row` of calls, elements sent and elements received
by this rank in one step. For these methods every row, at fixed P, is a product of powers of the
workload's size factors (ST-DiT: batch B, frames T, tokens a frame S, hidden C, depth, caption
tokens N; GLA: B, sequence T, layers), e.g. a DSP switch moves ``(P-1)/P²·B·T·S·C`` elements, a
LASP-2 all-gather ``(P-1)·B·H·K·V`` (independent of T). :func:`fit_exponents` measures each row's
exponent per factor from one capture at a base shape and one with that factor doubled (and refuses
a row whose exponent is not an integer, or that appears in only one of them: a volume that is not a
monomial in the factors cannot be scaled this way); :func:`scale_rows` then gives the rows at the
target shape: ``value_target = value_base · Π (f_target / f_base)^e_f``. The test suite checks the
prediction exactly against a capture at a third shape. The per-layer GLA state shape (H, K, V)
is not scaled: GLA captures use the target model's own widths (only its depth, vocabulary and MLP
width are reduced, which no collective but the gradient sync sees).

Gradient-sync rows (tags ``grad_sync.*``) move parameters, not activations: they are scaled by the
ratio of parameter counts (target model / captured model, both counted on the meta device), and
their call count is the number of ``sync_gradients`` buckets at the target size.
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import inspect
import json
import math
import os
import re
import threading
from pathlib import Path
from typing import Iterable, Optional, Sequence

from longseq.benchmarks.workloads import Workload, build_step

__all__ = ["Row", "aggregate", "capture", "capture_roles", "fit_exponents", "scale_rows", "LedgerCache",
           "normalize_tag", "FACTORS", "factor_values", "with_factors", "doubled", "capture_workload",
           "roles", "scaled_rows", "is_grad_sync", "capture_jobs"]

ONE_TIME_OPS = ("all_gather_object",)
FACTORS = {"stdit": ("B", "T", "S", "C", "depth", "N"), "gla": ("B", "T", "depth")}


def normalize_tag(tag: str) -> str:
    """``dsp.blocks.12.temporal.in`` -> ``dsp.blocks.*.temporal.in`` (one row for all blocks)."""
    return re.sub(r"\.\d+(?=\.|$)", ".*", tag)


def is_grad_sync(tag: str) -> bool:
    return tag.startswith("grad_sync")


@dataclasses.dataclass(frozen=True)
class Row:
    """One kind of collective as one rank issues it in one step, summed over its calls."""

    op: str
    tag: str
    group_size: int
    dtype: str
    element_size: int
    calls: int
    elements_sent: int
    elements_recv: int
    stride: int = 1          # global-rank step between consecutive members of the group (USP's ring: u)

    @property
    def key(self) -> tuple:
        return (self.op, self.tag, self.group_size, self.dtype, self.stride)

    @property
    def bytes_sent(self) -> int:
        return self.elements_sent * self.element_size

    @property
    def bytes_recv(self) -> int:
        return self.elements_recv * self.element_size

    def to_json(self) -> dict:
        return dataclasses.asdict(self)

    @staticmethod
    def from_json(d: dict) -> "Row":
        return Row(**d)


def aggregate(records: Iterable, strides: Optional[Sequence[int]] = None) -> list[Row]:
    """Sum ``longseq.CommRecord`` s per (op, normalized tag, group size, dtype, group stride), in
    first-seen order. ``strides[i]``: the stride of record i's group (default 1: consecutive)."""
    acc: dict[tuple, list] = {}
    for i, r in enumerate(records):
        st = strides[i] if strides is not None else 1
        key = (r.op, normalize_tag(r.tag), r.group_size, r.dtype, r.element_size, st)
        a = acc.setdefault(key, [0, 0, 0])
        a[0] += 1
        a[1] += r.elements_sent
        a[2] += r.elements_recv
    return [Row(op, tag, g, dt, es, *v, stride=st) for (op, tag, g, dt, es, st), v in acc.items()]


@contextlib.contextmanager
def _group_strides():
    """While inside, every ledger record also notes the stride of its group's global ranks (1 for
    consecutive ranks, u for USP's ring groups {i, i+u, ...}; 0 when irregular). ``longseq.comm``
    asks ``group_size(group)`` before it records, so the group seen last on this thread is the
    record's. Yields the list of (record, stride) pairs."""
    import torch.distributed as dist
    import longseq.comm as comm_mod
    from longseq.ledger import LEDGER

    local = threading.local()
    lock = threading.Lock()
    pairs: list = []
    orig_gs, orig_rec = comm_mod.group_size, LEDGER.record

    def group_size(group):
        n = orig_gs(group)
        try:
            local.ranks = dist.get_process_group_ranks(group) if group is not None else list(range(n))
        except Exception:  # noqa: BLE001
            local.ranks = list(range(n))
        return n

    def record(op, tag, group_size_, dtype, sent, recv, *, control=False):
        ranks = getattr(local, "ranks", None) or [0]
        diffs = {b - a for a, b in zip(ranks, ranks[1:])}
        st = diffs.pop() if len(diffs) == 1 else (1 if not diffs else 0)
        with lock:
            orig_rec(op, tag, group_size_, dtype, sent, recv, control=control)
            pairs.append(st)

    comm_mod.group_size = group_size
    LEDGER.record = record
    try:
        yield pairs
    finally:
        comm_mod.group_size = orig_gs
        del LEDGER.record


# ----------------------------------------------------------------------------------------------
# Capturing
# ----------------------------------------------------------------------------------------------
def capture(w: Workload, P: int, rank: int, device: str = "cpu") -> list[Row]:
    """Rows of rank ``rank`` of ``P`` for one step of ``w`` on a fake group (without the one-time
    checks of a first step; the tests compare with the steady-state step of real gloo runs)."""
    from longseq.ledger import LEDGER
    from .fakepg import fake_world

    with fake_world(rank, P) as group:
        step = build_step(w, group, device)
        with _group_strides() as strides, LEDGER.recording() as rec:
            step()
    # the cross-rank checks (control records: dsp.check, zeco.check; all_gather_object details) are
    # bookkeeping, not part of a training step
    keep = [i for i, r in enumerate(rec) if r.op not in ONE_TIME_OPS and not getattr(r, "control", False)]
    return aggregate([rec[i] for i in keep], [strides[i] for i in keep])


def roles(family: str, P: int) -> list[int]:
    """The ranks whose ledgers differ: ST-DiT methods are symmetric (rank 0 stands for all, checked
    in the tests); GLA chains have a first, middle and last rank."""
    if family == "stdit" or P == 1:
        return [0]
    return sorted({0, min(1, P - 1), P - 1})


def capture_roles(w: Workload, P: int) -> dict[int, list[Row]]:
    return {r: capture(w, P, r) for r in roles(w.family, P)}


# ----------------------------------------------------------------------------------------------
# Factors of a workload
# ----------------------------------------------------------------------------------------------
def factor_values(w: Workload) -> dict:
    """The size factors of ``w`` (see :data:`FACTORS`)."""
    cfg = w.model_config()
    d = w.dims
    if w.family == "stdit":
        p = cfg.patch_size
        S = -(-d["H"] // p) * -(-d["W"] // p)
        return dict(B=d["B"], T=d["T"], S=S, C=cfg.hidden_size, depth=cfg.depth, N=d["N"])
    return dict(B=d["B"], T=d["T"], depth=cfg.num_layers)


def with_factors(w: Workload, f: dict) -> Workload:
    """``w`` with its factors set to ``f`` (ST-DiT: S through the latent width, H = one patch row)."""
    cfg = w.model_config()
    ov = w.config_overrides
    if w.family == "stdit":
        p = cfg.patch_size
        shape = dict(B=f["B"], T=f["T"], H=p, W=p * f["S"], N=f["N"])
        ov.update(hidden_size=f["C"], depth=f["depth"])
    else:
        shape = dict(B=f["B"], T=f["T"])
        ov.update(num_layers=f["depth"])
    return w.replace(shape=shape, overrides=ov)


def doubled(w: Workload, factor: str) -> Workload:
    f = factor_values(w)
    f[factor] *= 2
    return with_factors(w, f)


def capture_workload(target: Workload, P: int, *, per_rank: int = 1, depth: int = 1) -> Workload:
    """The small workload captured for ``target`` at ``P`` ranks.

    ST-DiT: the target's model but hidden = 2 x heads (its head count, so Ulysses' divisibility is
    the target's), ``depth`` blocks, B = 1, T = S = ``per_rank`` x P, caption tokens 2, and narrow
    caption and timestep inputs (caption_channels 16, freq_dim 32: layers no method communicates).
    GLA: the target's widths (H, K, V: the state), ``depth`` layers, vocabulary and MLP 256,
    B = 1 and ``16·per_rank`` tokens a rank."""
    cfg = target.model_config()
    if target.family == "stdit":
        base = target.replace(overrides={**target.config_overrides, "num_heads": cfg.num_heads,
                                         "caption_channels": 16, "freq_dim": 32})
        f = dict(B=1, T=per_rank * P, S=per_rank * P, C=2 * cfg.num_heads, depth=depth, N=2)
        return with_factors(base, f)
    ov = {**target.config_overrides, "vocab_size": 256, "intermediate_size": 256, "num_layers": depth}
    return target.replace(overrides=ov, shape=dict(B=1, T=16 * per_rank * P))


# ----------------------------------------------------------------------------------------------
# Exponents and scaling
# ----------------------------------------------------------------------------------------------
def _exponent(v0: int, v1: int, what: str) -> int:
    if v0 == 0 and v1 == 0:
        return 0
    if v0 == 0 or v1 == 0:
        raise ValueError(f"{what}: {v0} at the base shape but {v1} with the factor doubled; not a monomial")
    e = math.log2(v1 / v0)
    if abs(e - round(e)) > 1e-6:
        raise ValueError(f"{what}: doubling the factor multiplies it by {v1 / v0:.6g}, not a power of 2; "
                         "this row is not a monomial in the size factors and cannot be scaled")
    return int(round(e))


def fit_exponents(base: Sequence[Row], doubled_rows: dict) -> dict:
    """``{row key: {"calls"|"sent"|"recv": {factor: exponent}}}`` from the base rows and, per factor,
    the rows with that factor doubled. Gradient-sync rows are left out (scaled by parameters)."""
    out: dict = {}
    bmap = {r.key: r for r in base if not is_grad_sync(r.tag)}
    for factor, rows in doubled_rows.items():
        dmap = {r.key: r for r in rows if not is_grad_sync(r.tag)}
        if set(dmap) != set(bmap):
            extra = set(dmap) ^ set(bmap)
            raise ValueError(f"doubling {factor} changes which collectives are issued: {sorted(extra)}")
        for k, r0 in bmap.items():
            r1 = dmap[k]
            e = out.setdefault(k, {"calls": {}, "sent": {}, "recv": {}})
            e["calls"][factor] = _exponent(r0.calls, r1.calls, f"{k} calls vs {factor}")
            e["sent"][factor] = _exponent(r0.elements_sent, r1.elements_sent, f"{k} sent vs {factor}")
            e["recv"][factor] = _exponent(r0.elements_recv, r1.elements_recv, f"{k} recv vs {factor}")
    return out


def _scale(v: int, exps: dict, f0: dict, f1: dict) -> int:
    x = float(v)
    for k, e in exps.items():
        x *= (f1[k] / f0[k]) ** e
    return int(round(x))


def _param_count(w: Workload) -> int:
    return _param_count_cached(w.family, w.preset, w.overrides)


@functools.lru_cache(maxsize=None)
def _param_count_cached(family: str, preset: str, overrides: tuple) -> int:
    if family == "stdit":
        from longseq.models.stdit import count_parameters, stdit_config as make
    else:
        from longseq.models.gla import count_parameters, gla_config as make
    return count_parameters(make(preset, **dict(overrides)))


def _bucket_bytes() -> int:
    import longseq
    return int(inspect.signature(longseq.sync_gradients).parameters["bucket_mb"].default * 2**20)


def scale_rows(base: Sequence[Row], exps: dict, f0: dict, f1: dict, *, param_ratio: float = 1.0,
               target_param_count: Optional[int] = None) -> list[Row]:
    """The rows at factors ``f1`` from the rows at ``f0`` and their exponents."""
    out = []
    for r in base:
        if is_grad_sync(r.tag):
            sent = int(round(r.elements_sent * param_ratio))
            recv = int(round(r.elements_recv * param_ratio))
            calls = r.calls
            if target_param_count is not None:
                calls = max(1, math.ceil(target_param_count * r.element_size / _bucket_bytes()))
            out.append(dataclasses.replace(r, calls=calls, elements_sent=sent, elements_recv=recv))
            continue
        e = exps[r.key]
        out.append(dataclasses.replace(
            r, calls=_scale(r.calls, e["calls"], f0, f1), elements_sent=_scale(r.elements_sent, e["sent"], f0, f1),
            elements_recv=_scale(r.elements_recv, e["recv"], f0, f1)))
    return out


# ----------------------------------------------------------------------------------------------
# Cache
# ----------------------------------------------------------------------------------------------
def _capture_json(w: Workload, P: int, rank: int) -> list:
    return [r.to_json() for r in capture(w, P, rank)]


class LedgerCache:
    """Captured rows keyed by (workload, P, rank), stored as JSON.

    Validity is checked against the code as it is now, not against file hashes (the runtime and
    the methods change for reasons that do not touch communication): :meth:`prefetch` recaptures,
    per method, its smallest job (one fake-group step on small shapes) and compares it with the
    stored rows; if they differ, every stored entry of that method is dropped and recaptured.
    ``refresh=True`` recaptures everything."""

    def __init__(self, path: Optional[os.PathLike] = None, refresh: bool = False):
        self.path = Path(path) if path else None
        self.data: dict = {}
        self.hits = self.misses = 0
        self.changed: list[str] = []
        if self.path and self.path.exists() and not refresh:
            self.data = json.loads(self.path.read_text()).get("entries", {})

    @staticmethod
    def _key(w: Workload, P: int, rank: int) -> str:
        return json.dumps([dataclasses.astuple(w), P, rank], default=str)

    def get(self, w: Workload, P: int, rank: int) -> list[Row]:
        k = self._key(w, P, rank)
        if k in self.data:
            self.hits += 1
            return [Row.from_json(d) for d in self.data[k]]
        self.misses += 1
        rows = capture(w, P, rank)
        self.data[k] = [r.to_json() for r in rows]
        return rows

    def _check(self, jobs: Sequence[tuple]) -> None:
        """Drop the stored entries of every method whose probe no longer matches."""
        by_method: dict = {}
        for w, P, r in jobs:
            by_method.setdefault(w.method, []).append((w, P, r))
        for method, js in by_method.items():
            w, P, r = min(js, key=lambda j: (j[1], j[2]))
            k = self._key(w, P, r)
            if k not in self.data:
                continue
            try:
                now = _capture_json(w, P, r)
            except Exception:  # noqa: BLE001 - get() will raise it where it matters
                continue
            if now != self.data[k]:
                self.changed.append(method)
                for key in [key for key in self.data if json.loads(key)[0][1] == method]:
                    del self.data[key]
                self.data[k] = now

    def prefetch(self, jobs: Sequence[tuple], workers: Optional[int] = None) -> int:
        """Check the stored entries (:meth:`_check`), then capture the missing ones of ``jobs``
        ((workload, P, rank) triples) in parallel processes, one per core; returns how many."""
        self._check(jobs)
        todo, seen = [], set()
        for w, P, r in jobs:
            k = self._key(w, P, r)
            if k not in seen and k not in self.data:
                seen.add(k)
                todo.append((k, w, P, r))
        if not todo:
            return 0
        import concurrent.futures
        import multiprocessing as mp
        n = max(1, min(workers or os.cpu_count() or 1, len(todo)))
        with concurrent.futures.ProcessPoolExecutor(n, mp_context=mp.get_context("spawn")) as ex:
            futs = {ex.submit(_capture_json, w, P, r): k for k, w, P, r in todo}
            for f in concurrent.futures.as_completed(futs):
                try:
                    rows = f.result()
                except Exception:  # noqa: BLE001 - e.g. a method that cannot run at this P: get() re-raises
                    continue
                self.data[futs[f]] = rows
                self.misses += 1
        return len(todo)

    def save(self) -> None:
        if self.path and (self.misses or self.changed):
            self.path.parent.mkdir(parents=True, exist_ok=True)
            tmp = self.path.with_suffix(".tmp")
            tmp.write_text(json.dumps({"entries": self.data}, sort_keys=True, separators=(",", ":")))
            tmp.replace(self.path)


def capture_jobs(target: Workload, P: int, *, per_rank: int = 1) -> list[tuple]:
    """The (workload, P, rank) captures :func:`scaled_rows` needs for ``target`` at ``P``."""
    small = capture_workload(target, P, per_rank=per_rank)
    f0, f1 = factor_values(small), factor_values(target)
    ws = [small] + [doubled(small, f) for f in FACTORS[target.family] if f1[f] != f0[f]]
    return [(w, P, r) for r in roles(target.family, P) for w in ws]


def scaled_rows(target: Workload, P: int, cache: Optional[LedgerCache] = None, *,
                per_rank: int = 1) -> dict[int, list[Row]]:
    """Rows of every role rank of ``P`` at the ``target`` workload: captured on the small workload
    (:func:`capture_workload`), exponents fitted per factor, scaled to the target factors."""
    cache = cache or LedgerCache()
    small = capture_workload(target, P, per_rank=per_rank)
    f0, f1 = factor_values(small), factor_values(target)
    ratio = _param_count(target) / _param_count(small)
    target_params = _param_count(target)
    out = {}
    for r in roles(target.family, P):
        base = cache.get(small, P, r)
        dbl = {f: cache.get(doubled(small, f), P, r) for f in FACTORS[target.family] if f1[f] != f0[f]}
        exps = fit_exponents(base, dbl)
        for k in {r_.key for r_ in base if not is_grad_sync(r_.tag)}:
            for part in ("calls", "sent", "recv"):
                for f in FACTORS[target.family]:
                    exps[k][part].setdefault(f, 0)
        out[r] = scale_rows(base, exps, f0, f1, param_ratio=ratio, target_param_count=target_params)
    return out
