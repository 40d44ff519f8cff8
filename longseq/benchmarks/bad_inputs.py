"""Bad-input table: every case run on 2 CPU processes, each rank's ending classified.

    python -m longseq.benchmarks.bad_inputs                      # every case (~20-40 min on a loaded 2-core machine)
    python -m longseq.benchmarks.bad_inputs --kind api           # the library entry points only
    python -m longseq.benchmarks.bad_inputs --cases lr_nan sp_gla_k_one_rank --show

Two kinds of case (issue 22, items 6 and 7):

* ``config``: ``python -m longseq.train`` with one bad value (or a bad file, a checkpoint that does
  not fit, a shared run directory), every rank started as torchrun would (``RANK``, ``WORLD_SIZE``,
  ``MASTER_ADDR``/``PORT``), each with its own output, so what each rank does is seen.
* ``api``: a library entry point (``zeco.sp_gla``, ``zeco.sp_delta_rule``, ``zeco.sp_lm_loss``,
  ``dsp.switch``) called on both ranks with arguments that are wrong on one rank, or on all, or that
  change between calls; the worker (``--worker NAME``) prints ``ERROR <type>: <message>`` or
  ``OK <summary>``.

A rank ends **clear** (an error naming the cause: exit 1 or 2 after ``longseq.train``'s one-line
message, or the worker's ``ERROR``; for a case whose right answer is a result, that result),
**timeout** (still running at the deadline, or a ``CollectiveError``: it waited for a peer that had
stopped), **raw** (a traceback, a crash by signal, an exit without a message) or **silent** (it
trained or returned as if nothing were wrong). A case is clear when every rank is, and the same
error on every rank for api cases; else the worst of its ranks (timeout > raw > silent). Cases
marked ``no_call`` are the ones where a rank does not call at all: a timeout is their right ending.
The table's counts are what docs/training.md ("Bad input") records.
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import platform
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable, Optional

OUTCOMES = ("clear", "timeout", "raw", "silent")
TIMEOUT_S = 10                    # every case's collective timeout (train.collective_timeout_s / init_distributed)
SMALL = ["model.sample.frames=4", "model.sample.height=8", "model.sample.width=8", "train.steps=2",
         "train.global_batch_size=2", "train.tensorboard=false", "train.progress=false", "train.resume=none"]
GLA = ["model=gla_tiny", "parallel=zeco", "model.sample.seq_len=32", "train.steps=2", "train.global_batch_size=2",
       "train.tensorboard=false", "train.progress=false", "train.resume=none"]


@dataclasses.dataclass
class Case:
    name: str
    kind: str                                   # config | api
    args: list = dataclasses.field(default_factory=list)   # config: overrides ({tmp} is the case's folder)
    setup: Optional[Callable[[Path], None]] = None          # config: files the case needs
    no_call: bool = False                       # api: a rank does not call at all (a timeout is right)


# -- config cases -------------------------------------------------------------------------------------
def _tokens(dtype: str, extra: bytes = b"", sidecar: bool = False):
    def make(tmp: Path) -> None:
        import numpy as np
        ids = (np.arange(4000) % 60 + 1).astype(dtype)
        (tmp / "tok.bin").write_bytes(ids.tobytes() + extra)
        if sidecar:
            (tmp / "tok.bin.meta.json").write_text(json.dumps({"dtype": dtype, "vocab_size": 64,
                                                               "num_tokens": int(ids.size)}))
    return make


def _latents_T1(tmp: Path) -> None:
    import numpy as np
    from longseq.train.data import write_latent_sample
    for i in range(2):
        write_latent_sample(tmp / "lat", f"s{i}", np.zeros((4, 1, 8, 8), np.float32), np.zeros((8, 16), np.float32))


def _checkpoint_of(overrides: list):
    """A checkpoint of a run with ``overrides`` in ``{tmp}/run`` (what an earlier run there left)."""
    def make(tmp: Path) -> None:
        import torch
        from omegaconf import OmegaConf
        from longseq.train import checkpoint as ck
        from longseq.train import methods
        from longseq.train.config import load_config
        cfg = load_config(overrides + [f"train.out_dir={tmp / 'run'}"])
        model = methods.family_of(cfg).build(cfg.model)
        d = ck.checkpoint_dir(tmp / "run")
        lineage, _ = ck.start_lineage(d, "none")
        state = {"format": ck.FORMAT, "step": 1, "data_position": int(cfg.train.global_batch_size),
                 "model": model.state_dict(), "optimizer": torch.optim.AdamW(model.parameters()).state_dict(),
                 "scheduler": {}, "rng": [], "config": OmegaConf.to_container(cfg, resolve=True)}
        ck.save_checkpoint(d, 1, state, lineage=lineage)
    return make


def _crafted(tmp: Path) -> None:
    _checkpoint_of(SMALL)(tmp)
    d = tmp / "run" / "checkpoints"
    p = d / "ckpt_step00000001.pt"
    subprocess.run([sys.executable, "-c", "import sys, torch\nfrom pathlib import Path\nclass P:\n"
                    "    def __reduce__(self):\n        return (Path.touch, (Path(sys.argv[2]),))\n"
                    "torch.save({'step': 1, 'model': {}, 'x': P()}, sys.argv[1])", str(p), str(tmp / "ran")],
                   check=True)
    from longseq.train.manifest import read_meta, write_manifest
    write_manifest(p, **read_meta(p))                # whoever can write the folder rewrites the manifest


def _shared(tmp: Path) -> None:
    (tmp / "run").mkdir()
    os.chmod(tmp / "run", 0o777)


def _a_file(tmp: Path) -> None:
    (tmp / "run").write_text("not a folder")


RUN = "train.out_dir={tmp}/run"
CONFIG = [
    ("timeout_zero", ["train.collective_timeout_s=0"]), ("timeout_negative", ["train.collective_timeout_s=-1"]),
    ("timeout_nan", ["train.collective_timeout_s=nan"]), ("timeout_abc", ["train.collective_timeout_s=abc"]),
    ("old_timeout_zero", ["train.timeout_s=0"]),
    ("lr_negative", ["optim.lr=-1"]), ("lr_nan", ["optim.lr=nan"]), ("lr_abc", ["optim.lr=abc"]),
    ("lr_1e39", ["optim.lr=1e39"]), ("betas_one", ["optim.betas=[0.9]"]),
    ("betas_above_one", ["optim.betas=[0.9,1.5]"]),
    ("betas_abc", ["optim.betas=abc"]),
    ("eps_negative", ["optim.eps=-1"]), ("eps_abc", ["optim.eps=abc"]), ("optim_name", ["optim.name=sgd"]),
    ("min_lr_ratio_negative", ["optim.min_lr_ratio=-1"]), ("grad_clip_negative", ["optim.grad_clip=-1"]),
    ("weight_decay_negative", ["optim.weight_decay=-1"]), ("warmup_negative", ["optim.warmup_steps=-1"]),
    ("schedule_unknown", ["optim.schedule=linear"]),
    ("num_heads_3", ["+model.overrides.num_heads=3"]), ("hidden_size_0", ["+model.overrides.hidden_size=0"]),
    ("depth_0", ["+model.overrides.depth=0"]), ("option_bogus", ["+parallel.options.bogus=1"]),
    ("sp_size_fraction", ["parallel.sp_size=1.5"]), ("sp_size_3_of_2", ["parallel.sp_size=3"]),
    ("global_batch_3_dp_2", ["parallel.sp_size=1", "train.global_batch_size=3"]),
    ("on_nonfinite", ["train.on_nonfinite=ignore"]), ("fault_kind", ["train.fault_kind=bogus"]),
    ("fault_rank_99", ["train.fault_at_step=1", "train.fault_rank=99"]),
    ("seed_2_70", ["train.seed=1180591620717411303424"]), ("seed_negative", ["train.seed=-1"]),
    ("data_seed_negative", ["data.seed=-1"]), ("backend_nccl_cpu", ["train.backend=nccl"]),
    ("device_tpu", ["train.device=tpu"]), ("precision_fp16", ["train.precision=fp16"]),
    ("keep_negative", ["train.keep_checkpoints=-1"]), ("log_every_0", ["train.log_every=0"]),
    ("checkpoint_every_negative", ["train.checkpoint_every=-1"]), ("steps_0", ["train.steps=0"]),
    ("beta_end_2", ["model.objective.beta_end=2"]), ("timesteps_0", ["model.objective.num_timesteps=0"]),
    ("frames_0", ["model.sample.frames=0"]), ("num_samples_negative", ["data.num_samples=-1"]),
    ("tensorboard_maybe", ["train.tensorboard=maybe"]), ("sleep_negative", ["train.debug_sleep_s=-1"]),
    ("unknown_key", ["train.stepz=3"]), ("zeco_for_stdit", ["parallel=zeco"]), ("tokens_for_stdit", ["data=tokens"]),
    ("resume_missing_file", ["train.resume={tmp}/nope.pt"]),
]
CONFIG_GLA = [
    ("gla_num_heads_3", ["+model.overrides.num_heads=3"]), ("gla_vocab_0", ["+model.overrides.vocab_size=0"]),
    ("gla_num_blocks_0", ["+parallel.options.num_blocks=0"]), ("gla_seq_len_0", ["model.sample.seq_len=0"]),
    ("tokens_odd_bytes", ["data=tokens", "data.path={tmp}/tok.bin"], _tokens("uint16", b"\x01")),
    ("tokens_uint32_as_uint16", ["data=tokens", "data.path={tmp}/tok.bin"], _tokens("uint32")),
    ("tokens_sidecar_dtype", ["data=tokens", "data.path={tmp}/tok.bin"], _tokens("uint32", sidecar=True)),
]
CONFIG_FILES = [
    ("latents_T1_sp2", SMALL + ["data=latents", "data.path={tmp}/lat", "parallel.sp_size=2", RUN], _latents_T1),
    ("out_dir_unwritable", SMALL + ["train.out_dir=/proc/longseq-bad-input/run"], None),
    ("out_dir_a_file", SMALL + [RUN], _a_file),
    ("out_dir_shared", SMALL + [RUN], _shared),
    ("gla_checkpoint_into_stdit", SMALL + [RUN, "train.resume=auto"], _checkpoint_of(GLA)),
    ("architecture_changed", SMALL + [RUN, "train.resume=auto", "+model.overrides.depth=3"], _checkpoint_of(SMALL)),
    ("resume_global_batch", SMALL[:-1] + [RUN, "train.resume=auto", "train.global_batch_size=4"],
     _checkpoint_of(SMALL)),
    ("resume_data_seed", SMALL[:-1] + [RUN, "train.resume=auto", "data.seed=7"], _checkpoint_of(SMALL)),
    ("crafted_checkpoint", SMALL[:-1] + [RUN, "train.resume=auto"], _crafted),
]


def _config_cases() -> list:
    out = [Case(n, "config", SMALL + a + [RUN]) for n, a in CONFIG]
    out += [Case(c[0], "config", GLA + c[1] + [RUN], c[2] if len(c) > 2 else None) for c in CONFIG_GLA]
    out += [Case(n, "config", a, s) for n, a, s in CONFIG_FILES]
    return out


# -- api cases (run inside the workers) ------------------------------------------------------------------
def _gla_inputs(T: int = 8, K: int = 4):
    import torch
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(1, T, 2, K, generator=g), torch.randn(1, T, 2, K, generator=g)
    v = torch.randn(1, T, 2, 3, generator=g)
    lg = -torch.rand(1, T, 2, K, generator=g)
    return q, k, v, lg


def _piece(ts, r, P):
    from longseq.sharding import shard_range
    a, b = shard_range(ts[0].shape[1], P, r)
    return [t[:, a:b] for t in ts]


def _api(name: str) -> str:
    """Run api case ``name`` on this rank; returns the ``OK`` summary (raises for an error)."""
    import torch
    import torch.distributed as dist
    from longseq import dsp, zeco
    W, r, P = dist.group.WORLD, dist.get_rank(), dist.get_world_size()
    q, k, v, lg = _piece(_gla_inputs(), r, P)

    def gla(*a, **kw):
        o, _ = zeco.sp_gla(*a, group=W, backend="torch", **kw)
        return o

    def summary(o):
        return "nan" if torch.isnan(o).any() else f"finite {float(o.abs().max()):.3g}"

    if name == "sp_gla_k_one_rank":
        return summary(gla(q, k[..., :3] if r == 1 else k, v, lg))
    if name == "sp_gla_positive_decay_one_rank":
        return summary(gla(q, k, v, lg.abs() if r == 1 else lg))
    if name == "sp_gla_int_one_rank":
        return summary(gla(q.long() if r == 1 else q, k, v, lg))
    if name == "sp_gla_initial_state_one_rank":
        return summary(gla(q, k, v, lg, initial_state=torch.zeros(1, 2, 4, 3) if r == 1 else None))
    if name == "sp_gla_K_changes_later":
        gla(q, k, v, lg)
        q2, k2, v2, lg2 = _piece(_gla_inputs(K=3 if r == 1 else 4), r, P)
        return summary(gla(q2, k2, v2, lg2))
    if name == "sp_gla_dtype_changes_later":
        gla(q, k, v, lg)
        return summary(gla(*((t.double() for t in (q, k, v, lg)) if r == 1 else (q, k, v, lg))))
    if name == "sp_gla_nan_in_decay":            # one process: NaN from the NaN on; every rank must agree
        whole = list(_gla_inputs())
        whole[3][0, 1, 0, 0] = float("nan")
        q, k, v, lg = _piece(whole, r, P)
        return summary(gla(q, k, v, lg))
    if name == "sp_gla_check_false_T_differs":
        q2, k2, v2, lg2 = _piece(_gla_inputs(T=8 + 2 * r), r, P)
        return summary(gla(q2, k2, v2, lg2, check=False))
    if name == "sp_gla_mixed_check":
        return summary(gla(q, k, v, lg, check=r == 0))
    if name == "sp_gla_meta_one_rank":
        o = gla(*([t.to("meta") for t in (q, k, v, lg)] if r == 1 else (q, k, v, lg)))
        return "meta returned" if o.is_meta else summary(o)
    if name == "sp_gla_rank_does_not_call":
        if r == 1:
            time.sleep(TIMEOUT_S * 3)
            return "did not call"
        return summary(gla(q, k, v, lg))
    if name.startswith("sp_delta"):
        bq, bk, bv = q, k, v
        dg, beta = -torch.rand(1, q.shape[1], 2), torch.rand(1, q.shape[1], 2)
        if name == "sp_delta_beta_one_rank":
            beta = beta[..., :1] if r == 1 else beta
        elif name == "sp_delta_positive_decay":
            dg = dg.abs() + 5.0
        o, _ = zeco.sp_delta_rule(bq, bk, bv, dg, beta, group=W, backend="torch")
        return summary(o)
    if name == "sp_lm_loss_label_one_rank":
        logits = torch.randn(1, 4, 8)
        labels = torch.randint(0, 8, (1, 4))
        if r == 1:
            labels[0, 0] = 99
        return f"{float(zeco.sp_lm_loss(logits, labels, W)):.4f}"
    if name == "dsp_switch_dims_one_rank":
        return str(tuple(dsp.switch(torch.randn(2, 3, 6, 8 if r == 0 else 4), W, 2, 1).shape))
    raise KeyError(name)


# Result cases: the right ending is a result; judge(summaries of every rank) -> clear | silent.
def _nan_everywhere(summaries: list) -> str:
    # one process: the NaN in the decay at t=1 reaches every later output; rank 1 holds t >= 4
    return "clear" if all(s == "nan" for s in summaries) else "silent"


API = ["sp_gla_k_one_rank", "sp_gla_positive_decay_one_rank", "sp_gla_int_one_rank", "sp_gla_initial_state_one_rank",
       "sp_gla_K_changes_later", "sp_gla_dtype_changes_later", "sp_gla_nan_in_decay", "sp_gla_check_false_T_differs",
       "sp_gla_mixed_check", "sp_gla_meta_one_rank", "sp_delta_beta_one_rank", "sp_delta_positive_decay",
       "sp_lm_loss_label_one_rank", "dsp_switch_dims_one_rank", "sp_gla_rank_does_not_call"]
JUDGES = {"sp_gla_nan_in_decay": _nan_everywhere}


def _api_cases() -> list:
    return [Case(n, "api", no_call=n == "sp_gla_rank_does_not_call") for n in API]


def worker(name: str) -> int:
    """One rank of api case ``name`` (started by :func:`run_case`): ``OK``/``ERROR`` line, exit 0/3."""
    import longseq
    from longseq import comm
    longseq.init_distributed("gloo", timeout_s=TIMEOUT_S)
    try:
        print(f"OK {_api(name)}", flush=True)
        code = 0
    except comm.CollectiveError as e:
        print(f"TIMEOUT {str(e).splitlines()[0][:300]}", flush=True)
        code = 4
    except Exception as e:          # noqa: BLE001 - the table records whatever the entry raises
        print(f"ERROR {type(e).__name__}: {(str(e).strip().splitlines() or [''])[0][:300]}", flush=True)
        code = 3
    sys.stdout.flush()
    os._exit(code)                  # no process-group teardown: a peer may be gone


# -- running and classifying ---------------------------------------------------------------------------
def _spawn(argv: list, nproc: int, deadline_s: float, cwd: Path) -> list:
    """Start ``nproc`` ranks as torchrun would; returns [(exit code or None if still running, output)]."""
    from longseq.launch import free_port
    port = free_port()
    procs, logs = [], []
    for r in range(nproc):
        env = dict(os.environ, RANK=str(r), WORLD_SIZE=str(nproc), LOCAL_RANK=str(r), LOCAL_WORLD_SIZE=str(nproc),
                   MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), OMP_NUM_THREADS="1",
                   LONGSEQ_COLLECTIVE_TIMEOUT_S=str(TIMEOUT_S))
        log = open(cwd / f"rank{r}.log", "w+")
        logs.append(log)
        procs.append(subprocess.Popen(argv, env=env, cwd=cwd, stdout=log, stderr=subprocess.STDOUT,
                                      start_new_session=True))
    end = time.monotonic() + deadline_s
    while time.monotonic() < end and any(p.poll() is None for p in procs):
        time.sleep(0.1)
    out = []
    for p, log in zip(procs, logs):
        rc = p.poll()
        if rc is None:
            os.killpg(p.pid, signal.SIGKILL)        # this rank's own session, started above
            p.wait()
        log.seek(0)
        out.append((rc, log.read()))
        log.close()
    return out


_TRACE = re.compile(r"Traceback \(most recent call last\)")


def classify_rank(kind: str, rc: Optional[int], text: str) -> str:
    if rc is None:
        return "timeout"
    if rc < 0 or _TRACE.search(text):
        return "raw"
    if kind == "api":
        return {0: "ok", 3: "clear", 4: "timeout"}.get(rc, "raw")
    if rc == 0:
        return "silent"
    if "CollectiveError" in text and "stopped:" in text:
        return "timeout"
    return "clear" if rc in (1, 2) else "raw"


def _message(kind: str, texts: list) -> str:
    for t in texts:
        for line in t.splitlines():
            if (kind == "api" and line.startswith(("ERROR", "OK", "TIMEOUT"))) or \
                    (kind == "config" and ("config error:" in line or "stopped:" in line)):
                return line.strip()[:160]
    return ""


def run_case(case: Case, nproc: int = 2, deadline_s: float = 150) -> dict:
    tmp = Path(tempfile.mkdtemp(prefix=f"longseq-bad-{case.name}-"))
    try:
        if case.setup:
            case.setup(tmp)
        if case.kind == "config":
            argv = [sys.executable, "-m", "longseq.train"] + [a.replace("{tmp}", str(tmp)) for a in case.args]
        else:
            argv = [sys.executable, "-m", "longseq.benchmarks.bad_inputs", "--worker", case.name]
        t0 = time.monotonic()
        ranks = _spawn(argv, nproc, deadline_s if case.kind == "config" else TIMEOUT_S * 4, tmp)
        wall = time.monotonic() - t0
        per = [classify_rank(case.kind, rc, text) for rc, text in ranks]
        texts = [text for _, text in ranks]
        if case.kind == "api":
            lines = [next((ln for ln in t.splitlines() if ln.startswith(("OK", "ERROR", "TIMEOUT"))), "")
                     for t in texts]
            if case.name in JUDGES and all(p == "ok" for p in per):
                outcome = JUDGES[case.name]([ln[3:] for ln in lines])
            elif all(p == "clear" for p in per):
                outcome = "clear" if len(set(lines)) == 1 else "raw"     # every rank, the same error
            elif "timeout" in per:
                outcome = "timeout"
            elif "raw" in per or "clear" in per:
                outcome = "raw"                                          # a crash, or an error on some ranks only
            else:
                outcome = "silent"
        else:
            outcome = next((o for o in ("timeout", "raw", "silent") if o in per), "clear")
            if outcome == "clear" and not _message("config", texts):
                outcome = "raw"
        if (tmp / "ran").exists():
            outcome = "raw"                                              # a checkpoint's payload ran
        return {"case": case.name, "kind": case.kind, "outcome": outcome, "ranks": per, "no_call": case.no_call,
                "message": _message(case.kind, texts), "wall_s": round(wall, 1), "output": texts}
    finally:
        if (tmp / "run").exists():
            os.chmod(tmp / "run", 0o700) if (tmp / "run").is_dir() else None
        shutil.rmtree(tmp, ignore_errors=True)


def all_cases() -> list:
    return _config_cases() + _api_cases()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--kind", choices=("config", "api", "all"), default="all")
    ap.add_argument("--cases", nargs="+", default=None, help="only these cases (names as in the table)")
    ap.add_argument("--show", action="store_true", help="print every rank's output")
    ap.add_argument("--json", default=None, help="also write the rows here")
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.worker:
        return worker(a.worker)
    cases = [c for c in all_cases() if (a.kind == "all" or c.kind == a.kind) and (not a.cases or c.name in a.cases)]
    rows = []
    for c in cases:
        row = run_case(c)
        rows.append(row)
        print(json.dumps({k: v for k, v in row.items() if k != "output"}), flush=True)
        if a.show:
            for r, text in enumerate(row["output"]):
                print(f"--- rank {r} ---\n{text.strip()[-2000:]}")
    counts = {k: {o: 0 for o in OUTCOMES} for k in ("config", "api")}
    for r in rows:
        counts[r["kind"]][r["outcome"]] += 1
    print(f"\nbad-input table ({datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC, {platform.node()}, "
          f"{os.cpu_count()} CPUs, 2 processes, gloo, collective timeout {TIMEOUT_S} s)\n")
    print("| kind | cases | clear on every rank | timeout | raw | silent |")
    print("|---|---|---|---|---|---|")
    for k, c in counts.items():
        n = sum(c.values())
        if n:
            allowed = sum(1 for r in rows if r["kind"] == k and r["no_call"] and r["outcome"] == "timeout")
            note = f" (of which {allowed} where a rank does not call)" if allowed else ""
            print(f"| {k} | {n} | {c['clear']} | {c['timeout']}{note} | {c['raw']} | {c['silent']} |")
    print("\n| case | kind | outcome | ranks | message |\n|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['case']} | {r['kind']} | {r['outcome']} | {' / '.join(r['ranks'])} | "
              f"{r['message'].replace('|', '/')[:120]} |")
    if a.json:
        Path(a.json).write_text(json.dumps([{k: v for k, v in r.items() if k != "output"} for r in rows], indent=1))
    bad = [r for r in rows if r["outcome"] in ("raw", "silent") or (r["outcome"] == "timeout" and not r["no_call"])]
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
