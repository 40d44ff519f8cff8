"""Benchmarks, run from the repository root (``python -m longseq.benchmarks.<name>``).

* ``benchmarks.scaling``    real runs of every method (gloo CPU processes, or GPUs with NCCL): step
  time, tokens/s, ledger bytes, peak memory; per-rank compute times for the simulator
* ``benchmarks.calibrate``  gloo latency and bandwidth on this machine (alpha-beta fits)
* ``benchmarks.simulate``   the cost-model simulator (``benchmarks.costmodel``): the papers'
  comparisons at 8-256 GPUs, and its validation against the measured runs
* ``benchmarks.zeco_scan``  All-Scan vs LASP-1's chain vs LASP-2's all-gather on gloo
* ``benchmarks.comm_volume`` ledger volumes of the single-dimension baselines

See docs/scaling.md.
"""
