"""The cost model behind ``python -m longseq.benchmarks.simulate`` (see docs/scaling.md).

* :mod:`.topology`    nodes, links (alpha-beta), peak FLOP/s and utilisation, measured fits
* :mod:`.collectives` costs of all-to-all, ring all-gather / reduce-scatter, all-reduce, p2p,
  and the pipelined chain of All-Scan / LASP-1
* :mod:`.fakepg`      one process as rank r of P on a fake process group (no data moves)
* :mod:`.ledger`      each method's real ledger, captured on small shapes and scaled to the target
* :mod:`.compute`     per-rank FLOPs of the real code (meta device) or measured per-rank times
* :mod:`.simulator`   the step: symmetric ST-DiT methods, rank-by-rank GLA timelines, overlap
* :mod:`.validation`  predicted vs measured step-time ratios of the CPU runs
"""
