"""Per-token cost of one training step vs sequence length, one process: is it flat in T?

For each model family (``gdn``: Gated DeltaNet ``tiny``; ``gla``: GLA ``tiny``) and each length, one
forward + backward of the whole model on one process (``benchmarks.workloads.single_device_step``),
reported as microseconds per token. ``--reference`` adds the Gated DeltaNet with the delta rule's
state pass swapped for :func:`zeco.delta.chunk.state_pass_reference` (the per-chunk autograd loop
whose backward is quadratic), so old and new are measured side by side. Rounds are interleaved
(every variant once per round, in turn) after one warm-up step each; the table gives medians and
the ratio of each length's per-token cost to the shortest length's. CPU, one thread::

    OMP_NUM_THREADS=1 python -m longseq.benchmarks.token_cost --lengths 4096 16384 65536 --rounds 3
    OMP_NUM_THREADS=1 python -m longseq.benchmarks.token_cost --reference --reference-upto 16384
"""
from __future__ import annotations

import argparse
import contextlib
import statistics
import time

import torch

from longseq.benchmarks.workloads import Workload, single_device_step

PRESETS = {"gdn": "tiny", "gla": "tiny", "hybrid": "hybrid_tiny"}


@contextlib.contextmanager
def _reference_state_pass(on: bool):
    """Swap the delta rule's state pass for the autograd loop while active (``on``)."""
    from longseq.zeco.delta import chunk
    saved = chunk.state_pass
    if on:
        chunk.state_pass = chunk.state_pass_reference
    try:
        yield
    finally:
        chunk.state_pass = saved


def variants(families, reference: bool):
    out = [(f, False) for f in families]
    if reference:
        out += [(f, True) for f in families if f in ("gdn", "hybrid")]
    return out


def _print_row(rows: list[dict], row: dict) -> None:
    """One table line as soon as it is measured (the header before the first)."""
    if len(rows) == 1:
        print(f"{'family':8} {'state pass':10} {'T':>7} {'step s':>8} {'us/token':>9} {'vs shortest':>11}  (min-max s)")
    first = next(r for r in rows if (r["family"], r["state_pass"]) == (row["family"], row["state_pass"]))
    print(f"{row['family']:8} {row['state_pass']:10} {row['T']:7d} {row['step_s']:8.3f} {row['us_per_token']:9.1f} "
          f"{row['us_per_token'] / first['us_per_token']:10.2f}x  ({row['spread'][0]:.3f}-{row['spread'][1]:.3f})",
          flush=True)


def main(argv=None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--families", nargs="+", default=["gdn", "gla"], choices=list(PRESETS))
    ap.add_argument("--lengths", nargs="+", type=int, default=[4096, 16384, 65536])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--reference", action="store_true", help="also the quadratic reference state pass (gdn)")
    ap.add_argument("--reference-upto", type=int, default=16384, help="--reference only up to this length")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    rows = []
    for T in args.lengths:
        steps = {}
        for fam, ref in variants(args.families, args.reference and T <= args.reference_upto):
            w = Workload.make("gdn" if fam == "hybrid" else fam, "none", PRESETS[fam], dict(B=1, T=T))
            steps[(fam, ref)] = single_device_step(w)
        times = {key: [] for key in steps}
        for r in range(args.rounds + 1):                 # round 0: warm-up, not recorded
            for key, step in steps.items():
                with _reference_state_pass(key[1]):
                    t0 = time.perf_counter()
                    step()
                    dt = time.perf_counter() - t0
                if r:
                    times[key].append(dt)
        for (fam, ref), ts in times.items():
            med = statistics.median(ts)
            rows.append(dict(family=fam, state_pass="reference" if ref else "StatePass", T=T, step_s=med,
                             us_per_token=med / T * 1e6, spread=(min(ts), max(ts))))
            _print_row(rows, rows[-1])
        del steps
    return rows


if __name__ == "__main__":
    main()
