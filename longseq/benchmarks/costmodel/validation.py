"""Validation: the cost model's prediction of the measured CPU runs (``benchmarks.scaling``).

For every run with P > 1 the simulator gets exactly what it gets at scale, from this machine:

* the ledger rows every rank recorded in the run itself (real gloo collectives, no scaling);
* each rank's compute: the run's per-rank time alone (fake process group, one thread, measured in
  the same benchmark), split into forward / backward / attention / GLA kernel by the FLOPs of the
  same code (:mod:`.compute`), times the contention of P single-threaded processes on the
  machine's cores (``Topology.compute_dilation``: ``max(1, P / cores)``);
* the gloo topology fitted by ``benchmarks.calibrate`` (configs/simulate/topology/gloo_cpu.yaml);
* ``grad_sync="serial"``, as longseq runs it.

It predicts each run's step time; the table compares the predicted and measured step-time ratio
of every pair of methods run at the same P and shape (and, as a reference, the ratio that compute
alone would predict).
"""
from __future__ import annotations

import itertools
import statistics
from typing import Optional

from .ledger import Row, roles
from .topology import Topology

__all__ = ["predict_run", "validate_runs", "format_validation"]


def _rows(run: dict) -> dict:
    return {int(k): [Row.from_json(d) for d in v] for k, v in run["rows"].items()}


def predict_run(run: dict, topo: Topology) -> Optional[dict]:
    from longseq.benchmarks.scaling import workload_from_json
    from .compute import flops_of, gla_compute
    from .simulator import gla_estimate, stdit_estimate

    P = run["P"]
    if P < 2 or "error" in run or "compute_alone_s" not in run:
        return None
    w = workload_from_json(run["workload"])
    rows = _rows(run)
    dil = topo.compute_dilation(P)
    alone = {int(k): v * dil for k, v in run["compute_alone_s"].items()}
    if w.family == "stdit":
        fl = flops_of(w)
        comp = fl.scaled(alone[0] / fl.total)
        est = stdit_estimate(w.method, P, rows[0], comp, topo, grad_sync="serial")
        compute = alone[0]
    else:
        comps = {}
        for r in roles("gla", P):
            fl = gla_compute(w, P, r)
            comps[r] = fl.scaled(alone[r] / fl.total)

        def comp_of(i):
            return comps[0] if i == 0 else comps[P - 1] if i == P - 1 else comps[min(1, P - 1)]
        est = gla_estimate(w.method, P, {r: rows[r] for r in roles("gla", P)}, comp_of,
                           w.model_config().num_layers, topo, grad_sync="serial")
        compute = max(alone.values())
    return dict(family=w.family, method=w.method, P=P, tokens=run["tokens"], label=run["label"],
                measured_s=run["step_s"], predicted_s=est.step_s, compute_s=compute, comm_s=est.comm_s,
                exposed_s=est.exposed_s, grad_sync_s=est.grad_sync_s)


def validate_runs(blob: dict, topo: Topology) -> dict:
    preds = [p for p in (predict_run(r, topo) for r in blob.get("runs", [])) if p]
    pairs = []
    key = lambda p: (p["family"], p["P"], p["tokens"])  # noqa: E731
    for k, grp in itertools.groupby(sorted(preds, key=key), key=key):
        grp = sorted(grp, key=lambda p: p["method"])
        for a, b in itertools.combinations(grp, 2):
            m = a["measured_s"] / b["measured_s"]
            pr = a["predicted_s"] / b["predicted_s"]
            c = a["compute_s"] / b["compute_s"]
            pairs.append(dict(family=k[0], P=k[1], tokens=k[2], a=a["method"], b=b["method"], measured_ratio=m,
                              predicted_ratio=pr, error=pr / m - 1, compute_only_ratio=c, compute_only_error=c / m - 1))
    summary = {}
    for fam in sorted({p["family"] for p in pairs}):
        ps = [p for p in pairs if p["family"] == fam]
        summary[fam] = dict(pairs=len(ps), median_abs_error=statistics.median(abs(p["error"]) for p in ps),
                            max_abs_error=max(abs(p["error"]) for p in ps),
                            median_abs_error_compute_only=statistics.median(abs(p["compute_only_error"]) for p in ps),
                            same_winner=sum((p["measured_ratio"] > 1) == (p["predicted_ratio"] > 1) for p in ps))
        rs = [p for p in preds if p["family"] == fam]
        summary[fam]["median_abs_step_error"] = statistics.median(abs(p["predicted_s"] / p["measured_s"] - 1) for p in rs)
    return dict(topology=topo.name, runs=preds, pairs=pairs, summary=summary)


def format_validation(v: dict) -> str:
    lines = [f"\nValidation on this machine ({v['topology']}; gloo, CPU processes): step times of the runs of "
             "python -m longseq.benchmarks.scaling, predicted from their own ledgers + per-rank compute alone"]
    head = f"{'family':<6} {'P':>2} {'tokens':>6} {'method':<12} {'measured ms':>11} {'predicted ms':>12} {'error':>7}"
    lines += [head, "-" * len(head)]
    for p in sorted(v["runs"], key=lambda p: (p["family"], p["tokens"], p["P"], p["method"])):
        lines.append(f"{p['family']:<6} {p['P']:>2} {p['tokens']:>6} {p['method']:<12} {p['measured_s'] * 1e3:11.1f} "
                     f"{p['predicted_s'] * 1e3:12.1f} {100 * (p['predicted_s'] / p['measured_s'] - 1):+6.0f}%")
    lines.append("\nstep-time ratio of every pair of methods at the same P and shape (a / b)")
    head = (f"{'family':<6} {'P':>2} {'tokens':>6} {'a / b':<25} {'measured':>8} {'predicted':>9} {'error':>7} "
            f"{'compute-only':>12} {'error':>7}")
    lines += [head, "-" * len(head)]
    for p in v["pairs"]:
        lines.append(f"{p['family']:<6} {p['P']:>2} {p['tokens']:>6} {p['a'] + ' / ' + p['b']:<25} "
                     f"{p['measured_ratio']:8.3f} {p['predicted_ratio']:9.3f} {100 * p['error']:+6.1f}% "
                     f"{p['compute_only_ratio']:12.3f} {100 * p['compute_only_error']:+6.1f}%")
    for fam, s in v["summary"].items():
        lines.append(f"{fam}: {s['pairs']} pairs, ratio error median {100 * s['median_abs_error']:.1f}% "
                     f"(max {100 * s['max_abs_error']:.1f}%; compute alone would give {100 * s['median_abs_error_compute_only']:.1f}%), "
                     f"faster method right in {s['same_winner']}/{s['pairs']}; step-time error median "
                     f"{100 * s['median_abs_step_error']:.0f}%")
    return "\n".join(lines)
