"""The cost-model simulator: the DSP and ZeCO papers' comparisons at 8-256 GPUs, and its validation.

    python -m longseq.benchmarks.simulate                          # both comparison tables + validation
    python -m longseq.benchmarks.simulate topology.mfu=0.5 grad_sync=serial stdit.frames_per_gpu=4
    python -m longseq.benchmarks.simulate fsdp.enabled=false fsdp.dp=2     # FSDP2 tables off / dp x sp mesh
    python -m longseq.benchmarks.simulate compute_json=benchmarks/results/compute_h100.json
    python -m longseq.benchmarks.simulate update_docs=true         # also paste the tables into docs/scaling.md

Configuration: configs/simulate/default.yaml (Hydra; any key can be overridden as ``key=value``),
topologies in configs/simulate/topology/. For every (method, P) the simulator

1. takes the method's ledger at the target shape: the real code run on a fake process group of P
   ranks at small shapes, scaled per row to the target (``benchmarks.costmodel.ledger``);
2. takes one rank's compute: FLOPs of the real model code at the rank's shapes (meta device) at
   the topology's achieved utilisation, or per-rank times measured on a GPU (``compute_json``);
3. prices the rows on the topology (alpha-beta; intra- or inter-node links by rank placement) and
   composes the step, with overlap only where the method's code overlaps
   (``benchmarks.costmodel.simulator``).

Validation (``validate=true``): the same pricing with the gloo calibration of this machine
(``python -m longseq.benchmarks.calibrate``), the ledgers recorded in the real runs and the per-rank
compute measured alone (``python -m longseq.benchmarks.scaling``), against the step times those runs
measured: predicted vs measured ratio of every pair of methods run at the same P and shape.
Writes ``out`` (JSON) and figures under ``figures``; with ``update_docs=true`` the three printed
tables also replace the generated blocks ``sim_stdit``, ``sim_gla`` and ``sim_validation`` of
docs/scaling.md (:func:`doc_text`; tests/test_docs_generated.py checks they match ``out``'s ``tables``).
"""
from __future__ import annotations

import json
import sys
import time
import warnings
from pathlib import Path
from typing import Optional

from longseq.benchmarks.paths import data, output


DOC_BLOCKS = ("sim_stdit", "sim_gla", "sim_validation")


def doc_text(table: str) -> str:
    """A printed table as the docs show it (a fenced block)."""
    return "```\n" + table.strip("\n") + "\n```\n"


def load_config(overrides: list[str]):
    from hydra import compose, initialize_config_dir
    with initialize_config_dir(config_dir=str(data("configs/simulate")), version_base="1.3"):
        return compose("default", overrides=list(overrides))


def load_topology(name_or_cfg):
    from omegaconf import OmegaConf
    from longseq.benchmarks.costmodel.topology import Topology
    if isinstance(name_or_cfg, str):
        path = data(f"configs/simulate/topology/{name_or_cfg}.yaml")
        if not path.exists():
            return None
        return Topology.from_config(OmegaConf.load(path))
    return Topology.from_config(name_or_cfg)


# ----------------------------------------------------------------------------------------------
# ST-DiT: DSP vs Ulysses, Ring, Megatron-SP (and USP)
# ----------------------------------------------------------------------------------------------
def stdit_target(cfg, preset: str, P: int, method: str):
    from longseq.benchmarks.workloads import Workload
    s = cfg.stdit
    H, W = (int(x) for x in s.latent)
    shape = dict(B=int(s.batch), T=int(s.frames_per_gpu) * P, H=H, W=W, N=int(s.caption_tokens))
    return Workload.make("stdit", method, preset, shape, precision=str(s.precision))


def capture_plan(cfg) -> list:
    """Every (workload, P, rank) capture the comparisons need (for one parallel prefetch)."""
    from longseq.benchmarks.costmodel.ledger import capture_jobs
    from longseq.benchmarks.workloads import unavailable_reason
    jobs = []
    for preset in cfg.stdit.presets:
        for P in cfg.stdit.gpus:
            for m in cfg.stdit.methods:
                w = stdit_target(cfg, str(preset), int(P), str(m))
                if unavailable_reason(str(m)) or (str(m) == "ulysses" and w.model_config().num_heads % int(P)):
                    continue
                jobs += capture_jobs(w, int(P))
    hl = cfg.gla.headline
    for P, n in [(int(P), None) for P in cfg.gla.gpus] + [(int(hl.gpus), int(hl.tokens_per_gpu))]:
        for m in cfg.gla.methods:
            if not unavailable_reason(str(m)):
                jobs += capture_jobs(gla_target(cfg, P, str(m), n), P)
    return jobs


def _seconds(flops_obj, topo):
    return flops_obj.scaled(1.0 / (topo.peak_flops * topo.mfu))


def run_stdit(cfg, topo, cache, measured) -> list[dict]:
    from longseq.benchmarks.costmodel.compute import stdit_compute
    from longseq.benchmarks.costmodel.ledger import scaled_rows
    from longseq.benchmarks.costmodel.simulator import stdit_estimate
    from longseq.benchmarks.workloads import tokens, unavailable_reason

    out = []
    for preset in cfg.stdit.presets:
        for P in cfg.stdit.gpus:
            P = int(P)
            for method in cfg.stdit.methods:
                w = stdit_target(cfg, str(preset), P, str(method))
                rec = dict(family="stdit", preset=str(preset), P=P, method=str(method), tokens=tokens(w),
                           T=w.dims["T"])
                why = unavailable_reason(str(method))
                heads = w.model_config().num_heads
                if why:
                    rec["note"] = f"not run: {why}"
                elif str(method) == "ulysses" and heads % P:
                    rec["note"] = f"n/a: Ulysses needs P | heads ({heads})"
                else:
                    try:
                        rows = scaled_rows(w, P, cache)[0]
                    except Exception as e:  # noqa: BLE001 - a method that cannot run at this P
                        rec["note"] = f"error: {type(e).__name__}: {str(e).splitlines()[0][:120]}"
                        out.append(rec)
                        continue
                    comp = measured.stdit(w, P) if measured else None
                    rec["compute_source"] = "measured" if comp else "flops"
                    comp = comp or _seconds(stdit_compute(w, P), topo)
                    est = stdit_estimate(str(method), P, rows, comp, topo, str(cfg.grad_sync))
                    rec.update(step_s=est.step_s, compute_s=est.compute_s, comm_s=est.comm_s,
                               exposed_s=est.exposed_s, grad_sync_s=est.grad_sync_s, sp_bytes=est.sp_bytes,
                               tokens_per_s=est.tokens_per_s(rec["tokens"]))
                out.append(rec)
    return out


def _fmt_rate(x):
    return f"{x / 1e3:8.1f}" if x else "       -"


def print_stdit(res: list[dict], cfg) -> str:
    lines = []
    methods = [str(m) for m in cfg.stdit.methods]
    for preset in cfg.stdit.presets:
        rows = [r for r in res if r["preset"] == str(preset)]
        lines.append(f"\nST-DiT {preset}: DSP vs single-dimension SP, weak scaling (T = {cfg.stdit.frames_per_gpu}·P "
                     f"frames of {cfg.stdit.latent[0] // 2}x{cfg.stdit.latent[1] // 2} tokens, B={cfg.stdit.batch})")
        head = f"{'GPUs':>5} {'frames':>6} | " + " ".join(f"{m:>11}" for m in methods) + " | DSP gain over each (throughput)"
        lines.append("throughput, k tokens/s (whole cluster)")
        lines.append(head)
        lines.append("-" * len(head))
        notes = {}
        for P in cfg.stdit.gpus:
            byP = {r["method"]: r for r in rows if r["P"] == int(P)}
            cells, gains = [], []
            for m in methods:
                r = byP.get(m, {})
                if "tokens_per_s" in r:
                    cells.append(f"{r['tokens_per_s'] / 1e3:11.1f}")
                else:
                    cells.append(f"{'-':>11}")
                    if r.get("note"):
                        notes.setdefault(r["note"], []).append(f"{m}@{P}")
            d = byP.get("dsp", {})
            for m in methods:
                r = byP.get(m, {})
                if m != "dsp" and "tokens_per_s" in r and "tokens_per_s" in d:
                    gains.append(f"{m} {100 * (d['tokens_per_s'] / r['tokens_per_s'] - 1):+.0f}%")
            T = next(iter(byP.values()))["T"]
            lines.append(f"{int(P):>5} {T:>6} | " + " ".join(cells) + " | " + ", ".join(gains))
        lines.append("communication per GPU per step (SP collectives, GB sent) and DSP's reduction")
        head2 = f"{'GPUs':>5} {'':>6} | " + " ".join(f"{m:>11}" for m in methods) + " | DSP moves less than each by"
        lines.append(head2)
        lines.append("-" * len(head2))
        for P in cfg.stdit.gpus:
            byP = {r["method"]: r for r in rows if r["P"] == int(P)}
            cells, red = [], []
            for m in methods:
                r = byP.get(m, {})
                cells.append(f"{r['sp_bytes'] / 1e9:11.2f}" if "sp_bytes" in r else f"{'-':>11}")
            d = byP.get("dsp", {})
            for m in methods:
                r = byP.get(m, {})
                if m != "dsp" and "sp_bytes" in r and "sp_bytes" in d and r["sp_bytes"]:
                    red.append(f"{m} {100 * (1 - d['sp_bytes'] / r['sp_bytes']):.0f}%")
            lines.append(f"{int(P):>5} {'':>6} | " + " ".join(cells) + " | " + ", ".join(red))
        for note, where in notes.items():
            lines.append(f"  note: {', '.join(where)}: {note}")
    txt = "\n".join(lines)
    print(txt)
    return txt


# ----------------------------------------------------------------------------------------------
# GLA: ZeCO vs LASP-1, LASP-2
# ----------------------------------------------------------------------------------------------
def gla_target(cfg, P: int, method: str, tokens_per_gpu: Optional[int] = None):
    from longseq.benchmarks.workloads import Workload
    g = cfg.gla
    n = int(tokens_per_gpu or g.tokens_per_gpu)
    return Workload.make("gla", method, str(g.preset), dict(B=int(g.batch), T=n * P), precision=str(g.precision))


def gla_fsdp(cfg, w, P: int):
    """FSDP2's per-step collectives for workload ``w`` sharded over dp x sp = ``cfg.fsdp.dp`` x P ranks."""
    from longseq.benchmarks.costmodel.fsdp import fsdp_costs
    from longseq.models.gla import GLABlock, GLAForCausalLM
    pb = cfg.fsdp.param_bytes or (2 if w.precision == "bf16" else 4)
    return fsdp_costs(w.model_config(), GLABlock, GLAForCausalLM, int(cfg.fsdp.dp) * P, int(pb),
                      int(cfg.fsdp.reduce_bytes))


def gla_one(cfg, topo, cache, measured, method: str, P: int, tokens_per_gpu: Optional[int] = None,
            layer_barrier: bool = False, fsdp: bool = False) -> dict:
    from longseq.benchmarks.costmodel.compute import gla_compute
    from longseq.benchmarks.costmodel.ledger import roles, scaled_rows
    from longseq.benchmarks.costmodel.simulator import gla_estimate
    from longseq.benchmarks.workloads import tokens, unavailable_reason

    w = gla_target(cfg, P, method, tokens_per_gpu)
    rec = dict(family="gla", P=P, method=method, tokens=tokens(w), T=w.dims["T"])
    why = unavailable_reason(method)
    if why:
        rec["note"] = f"not run: {why}"
        return rec
    L = w.model_config().num_layers
    comps = {}
    src = "flops"
    for r in roles("gla", P):
        c = measured.gla(w, P, r) if measured else None
        if c is not None:
            src = "measured"
        comps[r] = c or _seconds(gla_compute(w, P, r), topo)

    def comp_of(i):
        return comps[0] if i == 0 else comps[P - 1] if i == P - 1 else comps[min(1, P - 1)]

    if P == 1:
        rec.update(step_s=comps[0].total, compute_s=comps[0].total, comm_s=0.0, exposed_s=0.0, grad_sync_s=0.0,
                   sp_bytes=0, tokens_per_s=rec["tokens"] / comps[0].total, compute_source=src)
        return rec
    rows = scaled_rows(w, P, cache)
    est = gla_estimate(method, P, rows, comp_of, L, topo, str(cfg.grad_sync), layer_barrier=layer_barrier,
                       fsdp=gla_fsdp(cfg, w, P) if fsdp else None)
    if fsdp:
        rec.update(fsdp_s=est.breakdown["fsdp_s"], fsdp_bytes=est.breakdown["fsdp_bytes"])
    rec.update(step_s=est.step_s, compute_s=est.compute_s, comm_s=est.comm_s, exposed_s=est.exposed_s,
               grad_sync_s=est.grad_sync_s, sp_bytes=est.sp_bytes, tokens_per_s=est.tokens_per_s(rec["tokens"]),
               compute_source=src, waited_s=est.breakdown.get("waited_max_s"))
    return rec


def run_gla(cfg, topo, cache, measured) -> dict:
    res, sync, fsdp = [], [], []
    for P in cfg.gla.gpus:
        for m in cfg.gla.methods:
            res.append(gla_one(cfg, topo, cache, measured, str(m), int(P)))
            sync.append(gla_one(cfg, topo, cache, measured, str(m), int(P), layer_barrier=True))
            if cfg.fsdp.enabled:
                fsdp.append(gla_one(cfg, topo, cache, measured, str(m), int(P), fsdp=True))
    single = gla_one(cfg, topo, cache, measured, "zeco", 1)
    hl = cfg.gla.headline
    h_multi = gla_one(cfg, topo, cache, measured, "zeco", int(hl.gpus), int(hl.tokens_per_gpu))
    h_single = gla_one(cfg, topo, cache, measured, "zeco", 1, int(hl.tokens_per_gpu))
    headline = dict(gpus=int(hl.gpus), tokens_per_gpu=int(hl.tokens_per_gpu), multi_step_s=h_multi.get("step_s"),
                    single_step_s=h_single.get("step_s"))
    if headline["multi_step_s"] and headline["single_step_s"]:
        headline["ratio"] = headline["multi_step_s"] / headline["single_step_s"]
    return dict(rows=res, layer_sync=sync, fsdp=fsdp, single=single, headline=headline)


def _gla_step_rows(rows: list, cfg, methods: list, single: dict) -> list[str]:
    """One line per GPU count: each method's step time, the other methods' slowdown against ZeCO,
    and ZeCO's step over one device's."""
    lines = []
    for P in cfg.gla.gpus:
        byP = {r["method"]: r for r in rows if r["P"] == int(P)}
        cells = [f"{byP[m]['step_s']:9.3f}" if "step_s" in byP.get(m, {}) else f"{'-':>9}" for m in methods]
        z = byP.get("zeco", {}).get("step_s")

        def vs_zeco(m):
            s = byP.get(m, {}).get("step_s")
            return f"{100 * (s / z - 1):+.1f}%" if (s and z) else "-"
        others = [byP[m]["step_s"] for m in methods if m != "zeco" and "step_s" in byP.get(m, {})]
        best = f"{100 * (min(others) / z - 1):+.1f}%" if (others and z) else "-"
        eff = f"{z / single['step_s']:.3f}" if (z and single.get("step_s")) else "-"
        T = next(iter(byP.values()))["T"]
        lines.append(f"{int(P):>5} {T / 2**20:6.2f}M | " + " ".join(cells)
                     + f" | {vs_zeco('lasp1'):>14} {vs_zeco('lasp2'):>9} {best:>8} | {eff:>10}")
    return lines


def print_gla(res: dict, cfg) -> str:
    methods = [str(m) for m in cfg.gla.methods]
    single = res["single"]
    lines = [f"\nGLA {cfg.gla.preset}: ZeCO vs LASP-1 / LASP-2, {cfg.gla.tokens_per_gpu // 1024}K tokens per GPU "
             f"(one device alone: {single.get('step_s', float('nan')):.3f} s a step)"]
    head = (f"{'GPUs':>5} {'tokens':>7} | " + " ".join(f"{m + ' s':>9}" for m in methods)
            + f" | {'ZeCO vs LASP-1':>14} {'vs LASP-2':>9} {'vs best':>8} | {'ZeCO/1-dev':>10}")
    lines.append("step time (s)")
    lines.append(head)
    lines.append("-" * len(head))
    lines += _gla_step_rows(res["rows"], cfg, methods, single)
    lines.append("(a speedup of x% means the other method's step takes x% longer than ZeCO's)")
    lines.append("the same with every layer synchronising all ranks (the ZeCO paper's accounting: a chain's "
                 "latency paid per layer)")
    lines.append(head)
    lines.append("-" * len(head))
    lines += _gla_step_rows(res["layer_sync"], cfg, methods, single)
    if res.get("fsdp"):
        dp = int(cfg.fsdp.dp)
        lines.append(f"the same under FSDP2 (fully_shard of every layer and the root over dp x sp = {dp} x P ranks; "
                     "per-layer all-gathers prefetched one layer ahead, gradient reduce-scatters instead of the "
                     "all-reduce)")
        lines.append(head + f" | {'FSDP GB/GPU':>11} {'FSDP busy s':>11}")
        lines.append("-" * (len(head) + 26))
        extra = {int(r["P"]): r for r in res["fsdp"] if r["method"] == "zeco" and "fsdp_bytes" in r}
        for P, line in zip(cfg.gla.gpus, _gla_step_rows(res["fsdp"], cfg, methods, single)):
            e = extra.get(int(P), {})
            lines.append(line + (f" | {e['fsdp_bytes'] / 1e9:11.2f} {e['fsdp_s']:11.3f}" if e else " |"))
    h = res["headline"]
    if "ratio" in h:
        lines.append(f"headline: ZeCO, {h['gpus']} GPUs x {h['tokens_per_gpu'] // 1024}K tokens "
                     f"({h['gpus'] * h['tokens_per_gpu'] / 2**20:.0f}M) takes {h['multi_step_s']:.3f} s vs "
                     f"{h['single_step_s']:.3f} s for {h['tokens_per_gpu'] // 1024}K on one device: ratio "
                     f"{h['ratio']:.3f} (paper: 'roughly the same')")
    txt = "\n".join(lines)
    print(txt)
    return txt


# ----------------------------------------------------------------------------------------------
# Validation against the measured CPU runs
# ----------------------------------------------------------------------------------------------
def validate(cfg) -> Optional[dict]:
    from longseq.benchmarks.costmodel.validation import validate_runs
    scal = data(cfg.validation.scaling)
    topo = load_topology(str(cfg.validation.topology))
    if scal is None or not scal.exists() or topo is None:
        print(f"\nvalidation skipped: needs {cfg.validation.scaling} (python -m longseq.benchmarks.scaling) and "
              f"configs/simulate/topology/{cfg.validation.topology}.yaml (python -m longseq.benchmarks.calibrate)")
        return None
    return validate_runs(json.loads(scal.read_text()), topo)


# ----------------------------------------------------------------------------------------------
# Figures
# ----------------------------------------------------------------------------------------------
def figures(stdit: list[dict], gla: dict, val: Optional[dict], cfg, outdir: Path) -> list[str]:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    outdir.mkdir(parents=True, exist_ok=True)
    written = []
    for preset in cfg.stdit.presets:
        fig, ax = plt.subplots(figsize=(5.5, 3.8))
        for m in cfg.stdit.methods:
            pts = [(r["P"], r["tokens_per_s"] / 1e3) for r in stdit if r["preset"] == str(preset)
                   and r["method"] == str(m) and "tokens_per_s" in r]
            if pts:
                ax.plot(*zip(*pts), marker="o", label=str(m))
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("GPUs (SP size)")
        ax.set_ylabel("k tokens / s (cluster)")
        ax.set_title(f"ST-DiT {preset}, simulated ({cfg.topology.name})", fontsize=9)
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
        p = outdir / f"sim_stdit_{preset}.png"
        fig.tight_layout()
        fig.savefig(p, dpi=120)
        plt.close(fig)
        written.append(str(p))
    fig, ax = plt.subplots(figsize=(5.5, 3.8))
    for m in cfg.gla.methods:
        pts = [(r["P"], r["step_s"]) for r in gla["rows"] if r["method"] == str(m) and "step_s" in r]
        if pts:
            ax.plot(*zip(*pts), marker="o", label=str(m))
    if gla["single"].get("step_s"):
        ax.axhline(gla["single"]["step_s"], color="gray", ls="--", lw=1, label="1 device, same tokens/GPU")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("GPUs (SP size)")
    ax.set_ylabel("step time (s)")
    ax.set_title(f"GLA {cfg.gla.preset}, {cfg.gla.tokens_per_gpu // 1024}K tokens/GPU, simulated", fontsize=9)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    p = outdir / "sim_gla.png"
    fig.tight_layout()
    fig.savefig(p, dpi=120)
    plt.close(fig)
    written.append(str(p))
    if val and val.get("pairs"):
        fig, ax = plt.subplots(figsize=(4.5, 4.2))
        xs = [v["measured_ratio"] for v in val["pairs"]]
        ys = [v["predicted_ratio"] for v in val["pairs"]]
        ax.scatter(xs, ys, s=18)
        lo, hi = min(xs + ys) * 0.9, max(xs + ys) * 1.1
        ax.plot([lo, hi], [lo, hi], color="gray", lw=1)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("measured step-time ratio (gloo, CPU)")
        ax.set_ylabel("predicted ratio (cost model)")
        ax.set_title("validation: method pairs, same P and shape", fontsize=9)
        ax.grid(alpha=0.3)
        p = outdir / "sim_validation.png"
        fig.tight_layout()
        fig.savefig(p, dpi=120)
        plt.close(fig)
        written.append(str(p))
    return written


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if any(a in ("-h", "--help") for a in argv):
        print(__doc__)
        return 0
    warnings.filterwarnings("ignore")
    t0 = time.time()
    cfg = load_config(argv)
    from longseq.benchmarks.costmodel.compute import MeasuredCompute
    from longseq.benchmarks.costmodel.ledger import LedgerCache

    topo = load_topology(cfg.topology)
    cache = LedgerCache(data(cfg.ledger_cache), refresh=bool(cfg.ledger_refresh))
    t1 = time.time()
    n = cache.prefetch(capture_plan(cfg))
    if cache.changed:
        print(f"(the communication of {', '.join(cache.changed)} changed since {cfg.ledger_cache} was written: "
              "recapturing)")
    if n:
        print(f"(captured {n} ledgers on fake process groups in {time.time() - t1:.0f} s)")
    measured = MeasuredCompute(str(data(cfg.compute_json))) if cfg.compute_json else None
    print(f"topology {topo.name}: {topo.gpus_per_node} GPUs a node, intra {topo.intra.bw / 1e9:.0f} GB/s "
          f"{topo.intra.alpha * 1e6:.0f} us, inter {topo.inter.bw / 1e9:.0f} GB/s {topo.inter.alpha * 1e6:.0f} us, "
          f"{topo.peak_flops / 1e12:.0f} TFLOP/s x mfu {topo.mfu}; grad sync: {cfg.grad_sync}; compute: "
          + (f"measured ({measured.device}, {cfg.compute_json})" if measured else "FLOPs of the real code"))
    stdit = run_stdit(cfg, topo, cache, measured)
    txt1 = print_stdit(stdit, cfg)
    gla = run_gla(cfg, topo, cache, measured)
    txt2 = print_gla(gla, cfg)
    cache.save()
    val = validate(cfg) if cfg.validate else None
    txt3 = ""
    if val:
        from longseq.benchmarks.costmodel.validation import format_validation
        txt3 = format_validation(val)
        print(txt3)
    figs = figures(stdit, gla, val, cfg, output(cfg.figures))
    out = output(cfg.out)
    if out:
        from omegaconf import OmegaConf
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(dict(config=OmegaConf.to_container(cfg, resolve=True), stdit=stdit, gla=gla,
                                       validation=val, tables=[txt1, txt2, txt3]), indent=1, default=str))
    if cfg.get("update_docs", False):
        from longseq.benchmarks.docblocks import replace_block
        for name, txt in zip(DOC_BLOCKS, (txt1, txt2, txt3)):
            if txt:
                replace_block(output("docs/scaling.md"), name, doc_text(txt))
    print(f"\nwrote {out} and {', '.join(figs)} in {time.time() - t0:.0f} s "
          f"(ledger captures: {cache.misses} new, {cache.hits} cached)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
