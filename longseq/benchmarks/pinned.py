"""Run a benchmark module with Triton's autotuning pinned: every ``triton.autotune`` keeps only its
first listed config, so no call spends minutes benchmarking configurations (fla's kernels have many).

    python -m longseq.benchmarks.pinned longseq.benchmarks.gla_local_overhead --tokens 8192 --dtypes bf16

The patch must precede the import of the kernels' modules (``triton.autotune`` runs at their import),
so this runner applies it, then runs the named module as ``__main__`` with the remaining arguments.
Timings taken this way are of the first config, not of the tuned one: the tables say so.
"""
from __future__ import annotations

import runpy
import sys


def pin_autotune() -> None:
    """Patch ``triton.runtime.autotuner.Autotuner`` to keep only the first config of each kernel."""
    from triton.runtime import autotuner

    init = autotuner.Autotuner.__init__
    if getattr(init, "_longseq_pinned", False):
        return

    def pinned(self, fn, arg_names, configs, *args, **kwargs):
        init(self, fn, arg_names, list(configs)[:1], *args, **kwargs)

    pinned._longseq_pinned = True
    autotuner.Autotuner.__init__ = pinned


def main(argv: list) -> int:
    if not argv:
        print(__doc__, file=sys.stderr)
        return 2
    pin_autotune()
    sys.argv = argv
    runpy.run_module(argv[0], run_name="__main__", alter_sys=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
