"""Communication volume of DSP and the single-dimension SP baselines on ST-DiT, per rank per step.

    python -m longseq.benchmarks.comm_volume                       # P = 2, 4, 8; presets 720m and 3b; bf16
    python -m longseq.benchmarks.comm_volume --worlds 2 4 --precision bf16-autocast
    python -m longseq.benchmarks.comm_volume --dry                 # formulas only, no processes

How the numbers are obtained (nothing is estimated that can be counted):

1. Count. For each world size P, P gloo processes (spawned on 127.0.0.1) run one training step
   (forward, ``dsp.sharded_mse_loss``, backward) of a *tiny* ST-DiT with every method through
   ``longseq.sp.parallelize`` and record every collective in the ledger. Tiny model: hidden 32,
   8 heads (so P = 8 divides them), depth 2; sample ``[B, T, S] = [1, P, 16]`` (one frame a rank,
   S = 16 divisible by every P): every size even, as in the presets.
2. Check. Per block (the tags of ``blocks.<i>.temporal``), forward and backward, the elements each
   rank sent must equal ``longseq.sp.block_volume`` (DESIGN.md's table) for the tiny shape, exactly.
3. Scale. Each method's per-block volume is ``coefficient(P) · m`` with m = B·(T/P)·S·C the local
   activation (q, k, v and the attention output are as large as the activation, for every method):
   linear in the shape when P divides T, S and the heads. So the per-block bytes are scaled exactly
   from the tiny run by ``m_preset / m_tiny`` (keeping each record's dtype), and multiplied by the
   preset's depth. The presets' sample is ``configs/model/stdit_720m.yaml``'s: 16 latent frames of
   64 x 64 (patch 2: S = 1024), B = 1 per SP group; 720m: C = 1152, 16 heads, depth 28; 3b: C = 2304,
   24 heads, depth 28.

Per step and rank the table gives the bytes the blocks send (forward + backward) at the preset
shape, and the ratio to DSP. Outside the blocks every method moves the same small amounts (the
input check, an 8-byte digest per rank; the sharded loss: one all-reduce of two float64), listed
once; so is the gradient all-reduce (``longseq.sync_gradients``: the same parameters for every method).

Methods: DSP; DeepSpeed-Ulysses; ring attention with its dk/dv accumulators sent in float32 (the
default, as ring-flash-attn) and in bf16; Megatron-SP; USP with Ulysses degree P/2 x ring degree 2
(at P = 2: 1 x 2, i.e. ring; USP with ring degree 1 is Ulysses).
"""
from __future__ import annotations

import argparse
import datetime
import os
import sys
import tempfile
import time
from fractions import Fraction

import torch
import torch.multiprocessing as mp

from longseq.launch import free_port
from longseq.ledger import human_bytes


TINY = dict(hidden_size=32, num_heads=8, depth=2, caption_channels=16, freq_dim=32)
TINY_SHAPE = dict(B=1, H=4, W=16, N=4)          # T = P; S = 2 x 8 = 16
PRESETS = {
    "720m": dict(C=1152, heads=16, depth=28),
    "3b": dict(C=2304, heads=24, depth=28),
}
PRESET_SAMPLE = dict(B=1, T=16, S=1024)          # 16 frames of 64 x 64 latents, patch 2
PRECISIONS = ("bf16", "bf16-autocast", "fp32")


def configs(P: int) -> list[tuple[str, str, dict]]:
    """(label, method, options) rows for world size P."""
    rows = [("DSP", "dsp", {}), ("Ulysses", "ulysses", {}), ("Ring (dk,dv fp32)", "ring", {}),
            ("Ring (dk,dv bf16)", "ring", {"grad_comm_dtype": torch.bfloat16}), ("Megatron-SP", "megatron_sp", {})]
    u = max(P // 2, 1)
    rows.append((f"USP {u}x{P // u}", "usp", {"ulysses_degree": u}))
    return rows


# ----------------------------------------------------------------------------------------------
# The counting run (one process per rank)
# ----------------------------------------------------------------------------------------------
def _worker(rank: int, P: int, port: int, precision: str, out_path: str) -> None:
    os.environ.update(OMP_NUM_THREADS="1")
    import torch.distributed as dist
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=P,
                            timeout=datetime.timedelta(seconds=300))
    from longseq import dsp
    import longseq.sp as sp
    from longseq import comm
    from longseq.ledger import LEDGER
    from longseq.models import STDiT, init_for_testing, stdit_config

    W = dist.group.WORLD
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    model = init_for_testing(STDiT(stdit_config("tiny", **TINY)), std=0.1, seed=0).to(dtype)
    g = torch.Generator().manual_seed(0)
    s = TINY_SHAPE
    x = torch.randn(s["B"], 4, P, s["H"], s["W"], generator=g).to(dtype)
    ts = torch.rand(s["B"], generator=g) * 1000
    y = torch.randn(s["B"], s["N"], TINY["caption_channels"], generator=g).to(dtype)
    target = torch.randn(s["B"], 4, P, s["H"], s["W"], generator=g).to(dtype)
    result = {}
    for label, method, opts in configs(P):
        handle = sp.parallelize(model, W, method, gather_output=False, **opts)
        with torch.no_grad():
            model(x, ts, y)                               # warm-up (the first forward also checks the weights)
        model.zero_grad(set_to_none=True)
        with LEDGER.recording() as rec:
            ctx = torch.autocast("cpu", dtype=torch.bfloat16) if precision == "bf16-autocast" else _null()
            with ctx:
                pred = model(x, ts, y)
                loss = dsp.sharded_mse_loss(pred.float(), handle.shard_target(target).float(), W)
            loss.backward()
        handle.remove()
        model.zero_grad(set_to_none=True)
        result[label] = [(r.op, r.tag, r.dtype, r.elements_sent, r.bytes_sent) for r in rec]
    everyone = comm.all_gather_object(result, W, tag="bench.collect")
    if rank == 0:
        torch.save(everyone, out_path)
    dist.barrier()
    dist.destroy_process_group()


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *a):
        return False


def count(P: int, precision: str) -> list[dict]:
    """Every rank's ledger records, per method label, of one step of the tiny model on P processes."""
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "ledger.pt")
        mp.start_processes(_worker, args=(P, free_port(), precision, path), nprocs=P, join=True, start_method="spawn")
        return torch.load(path, weights_only=False)


# ----------------------------------------------------------------------------------------------
# Analysis
# ----------------------------------------------------------------------------------------------
def _per_block(records, method: str, block: int):
    """(fwd elements, bwd elements, fwd bytes, bwd bytes) sent in one block."""
    prefix = f"dsp.blocks.{block}.temporal." if method == "dsp" else f"{method}.blocks.{block}.temporal."
    sel = [r for r in records if r[1].startswith(prefix)]
    fwd = [r for r in sel if ".bwd" not in r[1]]
    bwd = [r for r in sel if ".bwd" in r[1]]
    return (sum(r[3] for r in fwd), sum(r[3] for r in bwd), sum(r[4] for r in fwd), sum(r[4] for r in bwd))


def _outside(records) -> dict:
    out: dict = {}
    for op, tag, dt, el, by in records:
        if ".blocks." in tag:
            continue
        out[(op, tag)] = out.get((op, tag), 0) + by
    return out



def analyse(P: int, everyone: list[dict]) -> list[dict]:
    """Per method: the checked per-block coefficients and the per-step bytes at each preset."""
    import longseq.sp as sp
    C, depth_tiny = TINY["hidden_size"], TINY["depth"]
    s = TINY_SHAPE
    S = (s["H"] // 2) * (s["W"] // 2)
    m_tiny = s["B"] * 1 * S * C                     # T = P: one frame a rank
    rows = []
    for label, method, opts in configs(P):
        per_rank = [everyone[r][label] for r in range(P)]
        blocks = [[_per_block(recs, method, b) for b in range(depth_tiny)] for recs in per_rank]
        flat = {x for rank_blocks in blocks for x in rank_blocks}
        if len(flat) != 1:
            raise AssertionError(f"{label} P={P}: per-block volumes differ between ranks or blocks: {flat}")
        fe, be, fb, bb = flat.pop()
        ffe, fbe = sp.block_volume(method, m_tiny, P, opts.get("ulysses_degree"))
        if (fe, be) != (ffe, fbe):
            raise AssertionError(f"{label} P={P}: ledger per block (fwd, bwd) = {(fe, be)} elements, "
                                 f"formula {(ffe, fbe)}")
        row = dict(label=label, method=method, P=P, coef_elems=Fraction(fe + be, m_tiny),
                   coef_bytes=Fraction(fb + bb, m_tiny), fwd_elems=fe, bwd_elems=be, outside=_outside(per_rank[0]),
                   dtypes=sorted({r[2] for r in per_rank[0] if ".blocks." in r[1]}))
        for name, pre in PRESETS.items():
            if method in ("ulysses",) and pre["heads"] % P:
                row[name] = None
                continue
            m = PRESET_SAMPLE["B"] * (PRESET_SAMPLE["T"] // P) * PRESET_SAMPLE["S"] * pre["C"]
            row[name] = float(row["coef_bytes"] * m * pre["depth"])
        rows.append(row)
    return rows


def dry_rows(P: int, precision: str) -> list[dict]:
    """The same table from the formulas alone (no processes): element sizes from the precision."""
    import longseq.sp as sp
    act = 4 if precision == "fp32" else 2
    rows = []
    for label, method, opts in configs(P):
        fe, be = sp.block_volume(method, 1, P, opts.get("ulysses_degree"))
        fb, bb = fe * act, be * act
        if method in ("ring", "usp") and "grad_comm_dtype" not in opts and act == 2:
            r = P if method == "ring" else P // opts["ulysses_degree"]
            bb += 2 * (r - 1) * (4 - act)        # dk, dv accumulators in float32
        row = dict(label=label, method=method, P=P, coef_elems=Fraction(fe + be).limit_denominator(1000),
                   coef_bytes=Fraction(fb + bb).limit_denominator(1000), outside={}, dtypes=[])
        for name, pre in PRESETS.items():
            m = PRESET_SAMPLE["B"] * (PRESET_SAMPLE["T"] // P) * PRESET_SAMPLE["S"] * pre["C"]
            row[name] = float(row["coef_bytes"] * m * pre["depth"])
        rows.append(row)
    return rows


def _grad_allreduce_bytes(preset: str, P: int, elem: int) -> float:
    from longseq.models.stdit import count_parameters
    return 2 * count_parameters(preset) * (P - 1) / P * elem


def table(all_rows: list[dict], precision: str) -> str:
    head = ("| P | method | per block fwd+bwd (elements, x m) | 720m: bytes/rank/step | x DSP | "
            "3b: bytes/rank/step | x DSP |")
    lines = [head, "| --- | --- | --- | --- | --- | --- | --- |"]
    for P in sorted({r["P"] for r in all_rows}):
        rows = [r for r in all_rows if r["P"] == P]
        d = next(r for r in rows if r["method"] == "dsp")
        for r in rows:
            cells = [str(P), r["label"], f"{float(r['coef_elems']):.4g}"]
            for name in PRESETS:
                if r[name] is None:
                    cells += ["n/a (heads)", "-"]
                else:
                    cells += [human_bytes(r[name]), f"{r[name] / d[name]:.2f}"]
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--worlds", type=int, nargs="+", default=[2, 4, 8],
                    help="world sizes P; each starts P gloo processes (default 2 4 8: a minute or two on 2 cores)")
    ap.add_argument("--precision", choices=PRECISIONS, default="bf16")
    ap.add_argument("--dry", action="store_true", help="formulas only (longseq.sp.block_volume), no processes")
    args = ap.parse_args(argv)
    if args.dry and args.precision == "bf16-autocast":
        ap.error("--dry cannot know which tensors autocast leaves in float32; run without --dry "
                 "(the ledger records each collective's dtype), or use --precision bf16 / fp32")
    all_rows = []
    for P in args.worlds:
        t0 = time.time()
        if args.dry:
            rows = dry_rows(P, args.precision)
            src = "formulas (dry)"
        else:
            print(f"P={P}: starting {P} gloo processes on 127.0.0.1 ({os.cpu_count()} CPU cores here; "
                  "--worlds sets the sizes, --dry runs none) ...", flush=True)
            rows = analyse(P, count(P, args.precision))
            src = f"ledger of {P} gloo processes, checked against the formulas ({time.time() - t0:.0f} s)"
        print(f"P={P}: {src}", flush=True)
        all_rows += rows
    print()
    print(f"Bytes sent per rank per training step (forward + backward) by the blocks, precision {args.precision}, "
          f"sample [B, T, S] = [{PRESET_SAMPLE['B']}, {PRESET_SAMPLE['T']}, {PRESET_SAMPLE['S']}], m = B·(T/P)·S·C:")
    print(table(all_rows, args.precision))
    if not args.dry:
        first = next(r for r in all_rows if r["outside"])
        print("\nOutside the blocks, every method, per rank per step (tiny run, shape-independent): "
              + ", ".join(f"{op} {tag} {b} B" for (op, tag), b in sorted(first["outside"].items())))
        print("Dtypes sent inside the blocks: " + "; ".join(f"{r['label']} P={r['P']}: {'/'.join(r['dtypes'])}"
                                                            for r in all_rows if r["P"] == all_rows[0]["P"]))
    elem = 4 if args.precision != "bf16" else 2
    print("Gradient all-reduce (longseq.sync_gradients over the SP group; the same for every method), per rank: "
          + ", ".join(f"{name} P={P}: {human_bytes(_grad_allreduce_bytes(name, P, elem))}"
                      for name in PRESETS for P in args.worlds))
    less, half = [], []
    for P in args.worlds:
        rows = [r for r in all_rows if r["P"] == P]
        d = next(r for r in rows if r["method"] == "dsp")
        for r in rows:
            for name in PRESETS:
                if r["method"] == "dsp" or r[name] is None:
                    continue
                if not r[name] > d[name]:
                    less.append(f"{r['label']} P={P} {name} ({r[name] / d[name]:.2f}x)")
                if r["method"] == "ulysses" and r[name] < 2 * d[name]:
                    half.append(f"P={P} {name} ({r[name] / d[name]:.2f}x)")
    print("\nDSP sends fewer bytes than every other method at every P: "
          + ("yes" if not less else "NO, not than " + ", ".join(less)))
    print("DSP sends at least 2x fewer bytes than Ulysses at every P: "
          + ("yes" if not half else "NO: Ulysses/DSP = " + ", ".join(half)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
