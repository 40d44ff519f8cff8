"""A million-token training step per family: seconds per step and peak memory per rank.

Each row is one configuration of the training entry (``python -m longseq.train``'s own pieces, run by
:func:`benchmarks.memory.measure_rank` without the per-op storage tracking): ST-DiT under DSP,
GLA / Gated DeltaNet / the hybrid under ZeCO, with activation checkpointing, one sample of
``--tokens`` tokens over ``--procs`` fresh gloo processes (P = 1: the model alone). The step time is
the second step's (the first carries the warm-up), the slowest rank's; the memory is the peak
resident-set growth of the largest rank over its start (about 275 MiB of imports come on top).
Runs go one at a time, and a run whose estimated total (from ``--estimate-from``, a shorter run
scaled linearly) would pass ``--budget-gib`` is not started but reported::

    OMP_NUM_THREADS=1 python -m longseq.benchmarks.million --families gla gdn --procs 4
    OMP_NUM_THREADS=1 python -m longseq.benchmarks.million --families stdit --procs 1 --tokens 524288

The same step on GPUs is the training entry itself (rank 0 prints the step time and its peak
memory; every rank's is in metrics.jsonl's ``peak_mem_gib`` for rank 0)::

    torchrun --nproc_per_node 4 -m longseq.train <the overrides printed for each row> train.steps=3
"""
from __future__ import annotations

import argparse
import sys

from longseq.benchmarks.memory import FAMILIES, overrides, run_config

GIB = 2 ** 30


def command(family: str, tokens: int, P: int) -> str:
    """The training-entry command of a row (CPU and GPU alike)."""
    argv = [a for a in overrides(family, tokens, P, ac=True) if not a.startswith(("train.steps", "train.progress"))]
    launch = f"torchrun --nproc_per_node {P} -m longseq.train" if P > 1 else "python -m longseq.train"
    return f"OMP_NUM_THREADS=1 {launch} " + " ".join(argv) + " train.steps=3"


def main(argv=None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--families", nargs="+", default=list(FAMILIES), choices=list(FAMILIES))
    ap.add_argument("--tokens", type=int, default=1 << 20)
    ap.add_argument("--procs", nargs="+", type=int, default=[4])
    ap.add_argument("--budget-gib", type=float, default=10.0, help="all processes' peak resident sets together")
    ap.add_argument("--estimate-from", type=int, default=1 << 16,
                    help="first run this length to estimate the memory of --tokens (0: no estimate)")
    args = ap.parse_args(argv)
    rows = []
    for fam in args.families:
        for P in args.procs:
            if args.estimate_from and args.estimate_from < args.tokens:
                probe = run_config(fam, args.estimate_from, P, ac=True, parts=False)
                need = probe["peak"] * P * args.tokens / args.estimate_from
                if need > args.budget_gib * GIB:
                    print(f"{fam} P={P}: not run: about {need / GIB:.1f} GiB in all (scaled from "
                          f"{args.estimate_from} tokens), over --budget-gib {args.budget_gib}", flush=True)
                    continue
            row = run_config(fam, args.tokens, P, ac=True, parts=False)
            row["command"] = command(fam, args.tokens, P)
            rows.append(row)
            print(f"{fam:7} P={P} {args.tokens} tokens: {row['step_s']:.1f} s/step, {row['peak'] / GIB:.2f} GiB peak "
                  f"a rank (largest)  [{row['command']}]", flush=True)
    print(f"\n| family / method | tokens | P | s / step | peak GiB a rank |", file=sys.stdout)
    print("|---|---:|---:|---:|---:|")
    for r in rows:
        meth = FAMILIES[r["family"]][1] if r["P"] > 1 else "none"
        print(f"| {r['family']} / {meth} | {r['tokens']} | {r['P']} | {r['step_s']:.1f} | {r['peak'] / GIB:.2f} |")
    return rows


if __name__ == "__main__":
    main()
