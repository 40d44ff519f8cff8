"""``python -m longseq.plot RUN_DIR [--out FILE]``: the loss and throughput curves of a training run.

Reads ``RUN_DIR/metrics.jsonl`` (one record a step, written by ``python -m longseq.train``) and
draws two panels, loss and tokens/s against the step, to a PNG (default ``RUN_DIR/curves.png``).
Needs matplotlib (``pip install 'longseq[plot]'``).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Optional, Sequence

from longseq.optional import require
from longseq.train.metrics import read_metrics

__all__ = ["plot_run", "main"]


def plot_run(run_dir, out: Optional[str] = None) -> Path:
    """Draw the curves of ``run_dir`` to ``out`` (default ``run_dir/curves.png``); returns the path.
    Raises ``FileNotFoundError`` without metrics and ``ImportError`` without matplotlib."""
    run_dir = Path(run_dir)
    records = [r for r in read_metrics(run_dir / "metrics.jsonl") if "step" in r]
    if not records:
        raise FileNotFoundError(f"no metrics in {run_dir / 'metrics.jsonl'}: pass the train.out_dir of a run")
    matplotlib = require("matplotlib", extra="plot", what="python -m longseq.plot")
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    steps = [r["step"] for r in records]
    fig, (a, b) = plt.subplots(1, 2, figsize=(9, 3.2))
    a.plot(steps, [r["loss"] for r in records], marker=".")
    a.set(xlabel="step", ylabel="loss", title="loss")
    b.plot(steps, [r["tokens_per_s"] for r in records], marker=".", color="tab:orange")
    b.set(xlabel="step", ylabel="tokens / s (all ranks)", title="throughput")
    for ax in (a, b):
        ax.grid(alpha=0.3)
    fig.suptitle(run_dir.name, fontsize=9)
    fig.tight_layout()
    path = Path(out) if out else run_dir / "curves.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def main(argv: Optional[Sequence[str]] = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m longseq.plot", description=__doc__.splitlines()[0])
    ap.add_argument("run_dir", help="a run directory (train.out_dir) holding metrics.jsonl")
    ap.add_argument("--out", help="the PNG to write (default RUN_DIR/curves.png)")
    args = ap.parse_args(argv)
    try:
        path = plot_run(args.run_dir, args.out)
    except (FileNotFoundError, ImportError) as e:
        print(f"longseq.plot: {e}", file=sys.stderr)
        return 2
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
