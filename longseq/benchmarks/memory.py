"""Per-rank memory of a training step, by part, vs SP size: what shards with P and what does not.

For each family (ST-DiT under DSP, GLA / Gated DeltaNet / hybrid under ZeCO; P = 1 is the model
alone, ``parallel=none``) at one fixed whole-sample length, and each P, it runs the training
entry's own pieces (``longseq.train``: config, ``methods.build``, activation checkpointing, FSDP2,
the data loader, ``backward_and_sync``, AdamW) for two steps on P fresh gloo processes and reports
per rank (the largest over the ranks), in MiB:

* ``fixed``: resident-set growth from the process's start to the end of set-up (config, model,
  optimizer, lazily imported libraries), the parameters aside: the same at every length and P;
* ``params`` / ``grads`` / ``optim``: bytes of the parameters (this rank's shards under FSDP2),
  of their ``.grad`` after the sync, of the optimizer's state;
* ``inputs``: the batch the loader hands this rank (whole samples, or this rank's piece);
* ``activ``: tensors created during the forward and still alive when it ends (saved for the
  backward; under activation checkpointing only what the checkpoints keep). Counted exactly by
  storage (a ``TorchDispatchMode`` notes every op's output storage, a weak reference tells which
  are still alive), so this column does not depend on the allocator or on the machine's load;
* ``comm``: the largest single collective of the step (bytes sent + received, from the ledger), a
  lower bound on the communication buffers;
* ``rest``: peak resident-set growth over the process's start minus the parts above (allocator
  slack, forward/backward temporaries, the recomputation under checkpointing, the data loader's
  transients, gloo and Python). ``peak``: that growth itself.

The ``act/(1/P)`` column is each P's activations over one process's divided by P (1.00 = perfect
sharding). CPU, 4 processes at most, one thread each::

    OMP_NUM_THREADS=1 python -m longseq.benchmarks.memory                       # 16K tokens, P = 1 2 4
    OMP_NUM_THREADS=1 python -m longseq.benchmarks.memory --tokens 65536 --families gla gdn --fsdp --ac
    OMP_NUM_THREADS=1 python -m longseq.benchmarks.memory --longest --families gla   # longest trainable length

``--fsdp`` and ``--ac`` add the rows with FSDP2 (``parallel.fsdp=full``) and activation checkpointing
(``train.activation_checkpointing=true``), each alone and both. ``--longest`` doubles the length
from ``--tokens`` until a step fails or the processes' peak resident sets together would pass
``--budget-gib`` (extrapolated from the last success, so nothing is started that would not fit),
for P = 1 and P = 4, and prints the longest length that trained.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import resource
import sys
import time
from typing import Optional

FAMILIES = {
    # family: (model config, SP method, tokens-per-sample override builder)
    "stdit": ("stdit_tiny", "dsp"),
    "gla": ("gla_tiny", "zeco"),
    "gdn": ("gdn_tiny", "zeco"),
    "hybrid": ("hybrid_tiny", "zeco"),
}
STDIT_SIDE = 32                 # latent height = width: 16 x 16 = 256 tokens a frame (patch 2)
PARTS = ("fixed", "params", "grads", "optim", "inputs", "activ", "comm", "rest", "peak")
SUMMED = ("fixed", "params", "grads", "optim", "inputs", "activ", "comm")
MIB = 2 ** 20


def sample_overrides(family: str, tokens: int) -> list[str]:
    """The ``model.sample`` overrides that make one sample ``tokens`` tokens long."""
    if family == "stdit":
        per_frame = (STDIT_SIDE // 2) ** 2
        if tokens % per_frame:
            raise ValueError(f"ST-DiT: tokens must be a multiple of {per_frame} (a {STDIT_SIDE}x{STDIT_SIDE} latent "
                             "frame, patch 2)")
        return [f"model.sample.frames={tokens // per_frame}", f"model.sample.height={STDIT_SIDE}",
                f"model.sample.width={STDIT_SIDE}"]
    return [f"model.sample.seq_len={tokens}"]


def overrides(family: str, tokens: int, P: int, *, fsdp: bool = False, ac: bool = False) -> list[str]:
    """The ``python -m longseq.train`` overrides of one run (also printed for reproduction)."""
    model, method = FAMILIES[family]
    out = [f"model={model}", f"parallel={method if P > 1 else 'none'}", "train.global_batch_size=1",
           "train.save_checkpoints=false", "train.tensorboard=false", "train.progress=false", "train.steps=2"]
    if P > 1:
        out.append(f"parallel.sp_size={P}")
    if fsdp:
        out.append("parallel.fsdp=full")
    if ac:
        out.append("train.activation_checkpointing=true")
    return out + sample_overrides(family, tokens)


# ----------------------------------------------------------------------------------------------
# On every rank
# ----------------------------------------------------------------------------------------------
def _rss() -> int:
    with open("/proc/self/statm") as f:
        import os
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _peak_rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024      # KiB on Linux


class LiveStorages:
    """While active, notes the storage of every tensor an aten op returns; :meth:`alive_bytes` sums
    the distinct storages still alive (a weak reference each, so nothing is kept alive by it)."""

    def __init__(self):
        from torch.utils._python_dispatch import TorchDispatchMode

        outer = self

        class _Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                out = func(*args, **(kwargs or {}))
                outer._note(out)
                return out

        self._mode = _Mode()
        self._refs: dict = {}

    def _note(self, out) -> None:
        import torch
        from torch.multiprocessing.reductions import StorageWeakRef

        for t in (out if isinstance(out, (tuple, list)) else (out,)):
            if isinstance(t, torch.Tensor) and t.device.type != "meta":
                try:
                    s = t.untyped_storage()
                except (RuntimeError, NotImplementedError):
                    continue
                old = self._refs.get(s._cdata)
                if old is None or old[0].expired():      # a freed storage's address may come back
                    self._refs[s._cdata] = (StorageWeakRef(s), s.nbytes())

    def __enter__(self):
        self._mode.__enter__()
        return self

    def __exit__(self, *exc):
        self._mode.__exit__(*exc)

    def alive_bytes(self, exclude=()) -> int:
        skip = {t.untyped_storage()._cdata for t in exclude}
        return sum(n for key, (ref, n) in self._refs.items() if key not in skip and not ref.expired())


def _tensor_bytes(ts) -> int:
    """Distinct storages' bytes of the tensors (DTensors: their local shards)."""
    import torch
    seen, total = set(), 0
    for t in ts:
        if t is None or not isinstance(t, torch.Tensor):
            continue
        t = getattr(t, "_local_tensor", t)
        s = t.untyped_storage()
        if s._cdata not in seen:
            seen.add(s._cdata)
            total += s.nbytes()
    return total


def measure_rank(argv: list[str], parts: bool = True) -> dict:
    """Two training steps of the config ``argv`` on this rank (process group already up); the parts
    (``parts=False``: no per-op storage tracking, for timing; ``activ`` is then 0). ``step_s``: the
    second step's time (the first carries the warm-up and creates the optimizer's state)."""
    import torch
    import torch.distributed as dist

    import longseq
    from longseq.ledger import LEDGER
    from longseq.train import config as tcfg
    from longseq.train import data as data_mod
    from longseq.train import loop, methods

    base = _rss()
    torch.set_num_threads(1)
    cfg = tcfg.load_config(argv)
    world = dist.get_world_size()
    layout = tcfg.validate(cfg, world)
    dp_dim, sp_dim = (str(d) for d in cfg.parallel.mesh_dims)
    groups = longseq.init_parallel_groups(layout.sp_size, dp_dim=dp_dim, sp_dim=sp_dim)
    device = torch.device("cpu")
    trainable = methods.build(cfg, groups, device)
    model = trainable.model
    model.train()
    if bool(cfg.train.activation_checkpointing):
        methods.apply_activation_checkpointing(trainable.units)
    fsdp_plan = longseq.fsdp.apply_fsdp(model, groups, str(cfg.parallel.fsdp), units=trainable.units)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = loop.make_optimizer(model, cfg.optim)
    shard = None
    if trainable.input_shard is not None and groups.sp_size > 1:
        shard = data_mod.Shard(trainable.input_shard, groups.sp_rank, groups.sp_size)
    loader = data_mod.BatchSource(data_mod.make_source(cfg), global_batch=int(cfg.train.global_batch_size),
                                  dp_rank=groups.dp_rank, dp_size=groups.dp_size, shard=shard,
                                  sp_size=groups.sp_size, device=device)
    fixed = _rss() - base - _tensor_bytes(params)
    out = {}
    for step in range(2):
        optimizer.zero_grad(set_to_none=True)
        t0 = time.perf_counter()
        batch = loader.batch(step)
        with LEDGER.recording() as rec:
            live = LiveStorages() if parts else contextlib.nullcontext()
            with live:
                loss = trainable.loss(batch)
            inputs = [v for v in batch.values() if isinstance(v, torch.Tensor)]
            activ = live.alive_bytes(exclude=[loss, *inputs]) if parts else 0
            del live
            loop.backward_and_sync(loss, params, groups, fsdp_plan, float(cfg.optim.grad_clip or 0.0))
            grads = _tensor_bytes(p.grad for p in params)
            optimizer.step()
        dt = time.perf_counter() - t0
        comm = max((r.bytes_sent + r.bytes_recv for r in rec), default=0)
        optim = _tensor_bytes(v for st in optimizer.state.values() for v in st.values())
        out = dict(params=_tensor_bytes(params), grads=grads, optim=optim, inputs=_tensor_bytes(inputs),
                   activ=activ, comm=comm, step_s=dt, loss=float(loss.detach()))
        del loss, batch, inputs
    out["peak"] = _peak_rss() - base
    out["fixed"] = fixed
    out["rest"] = out["peak"] - sum(out[k] for k in SUMMED)
    return out


# ----------------------------------------------------------------------------------------------
# Driver
# ----------------------------------------------------------------------------------------------
def run_config(family: str, tokens: int, P: int, *, fsdp: bool = False, ac: bool = False,
               timeout: float = 3600.0, parts: bool = True) -> dict:
    """One configuration on P fresh processes: the per-rank maxima of every part."""
    from longseq.pool import DistributedPool
    argv = overrides(family, tokens, P, fsdp=fsdp, ac=ac)
    with DistributedPool(P, timeout=timeout, start_timeout=900.0) as pool:   # a loaded machine starts slowly
        per_rank = pool.run(measure_rank, argv, parts)
    row = {k: max(r[k] for r in per_rank) for k in PARTS}
    row.update(family=family, tokens=tokens, P=P, fsdp=fsdp, ac=ac, step_s=max(r["step_s"] for r in per_rank),
               argv=argv)
    return row


def print_table(rows: list[dict]) -> None:
    print(f"{'family':7} {'tokens':>8} {'P':>2} {'fsdp':>4} {'ac':>3} " + " ".join(f"{k:>8}" for k in PARTS)
          + f" {'act/(1/P)':>9} {'step s':>7}   (MiB per rank, the largest over the ranks)")
    one = {(r["family"], r["tokens"], r["fsdp"], r["ac"]): r for r in rows if r["P"] == 1}
    for r in rows:
        ref = one.get((r["family"], r["tokens"], r["fsdp"], r["ac"]))
        ratio = f"{r['activ'] / (ref['activ'] / r['P']):9.2f}" if ref and ref["activ"] else f"{'-':>9}"
        yn = {True: "y", False: "n"}
        print(f"{r['family']:7} {r['tokens']:8d} {r['P']:2d} {yn[r['fsdp']]:>4} {yn[r['ac']]:>3} "
              + " ".join(f"{r[k] / MIB:8.1f}" for k in PARTS) + f" {ratio} {r['step_s']:7.2f}")


def longest(family: str, start: int, P: int, budget_gib: float, *, ac: bool, limit: int) -> tuple[Optional[dict], str]:
    """Double the length from ``start`` while a step trains and the next would fit the budget."""
    best, why, T = None, "", start
    while T <= limit:
        try:
            row = run_config(family, T, P, ac=ac)
        except Exception as e:  # noqa: BLE001 - the failure is the answer
            why = f"{T} failed: {str(e).strip().splitlines()[-1][:160]}"
            break
        best = row
        nxt = 2 * T
        if row["peak"] * P * nxt / T > budget_gib * 2 ** 30:
            why = f"{nxt} would need about {row['peak'] * P * 2 / 2 ** 30:.1f} GiB over {P} processes (budget " \
                  f"{budget_gib} GiB)"
            break
        T = nxt
    else:
        why = f"stopped at --limit {limit}"
    return best, why


def main(argv=None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--families", nargs="+", default=list(FAMILIES), choices=list(FAMILIES))
    ap.add_argument("--tokens", type=int, default=16384, help="tokens in the whole sample (fixed across P)")
    ap.add_argument("--procs", nargs="+", type=int, default=[1, 2, 4])
    ap.add_argument("--fsdp", action="store_true", help="add rows with FSDP2 (parallel.fsdp=full)")
    ap.add_argument("--ac", action="store_true", help="add rows with activation checkpointing")
    ap.add_argument("--longest", action="store_true", help="the longest trainable length at P = 1 and 4")
    ap.add_argument("--budget-gib", type=float, default=8.0, help="--longest: all processes' peak RSS together")
    ap.add_argument("--limit", type=int, default=1 << 20, help="--longest: stop at this length")
    ap.add_argument("--json", default=None, help="also write the rows here")
    args = ap.parse_args(argv)
    rows = []
    if args.longest:
        for fam in args.families:
            for P in (1, 4):
                best, why = longest(fam, args.tokens, P, args.budget_gib, ac=True, limit=args.limit)
                got = f"{best['tokens']} tokens, {best['step_s']:.1f} s, {best['peak'] / 2 ** 30:.2f} GiB a rank" \
                    if best else "none"
                print(f"longest {fam} P={P} (activation checkpointing): {got}; {why}", flush=True)
                if best:
                    rows.append(best)
    else:
        variants = [(False, False)] + ([(True, False)] if args.fsdp else []) + ([(False, True)] if args.ac else []) \
            + ([(True, True)] if args.fsdp and args.ac else [])
        for fam in args.families:
            for fsdp, ac in variants:
                for P in args.procs:
                    if fsdp and P == 1:
                        continue
                    rows.append(run_config(fam, args.tokens, P, fsdp=fsdp, ac=ac))
                    print(f"  done {fam} P={P} fsdp={fsdp} ac={ac}", file=sys.stderr, flush=True)
    print_table(rows)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    return rows


if __name__ == "__main__":
    main()
