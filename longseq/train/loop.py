"""The training loop behind ``python -m longseq.train`` (see docs/training.md).

One step, on every rank: build this rank's batch (its DP group's samples, whole or its SP piece),
forward and loss under autocast (bf16 on GPU by default), backward, ``longseq.sync_gradients``
(sum over SP, average over DP), clip the global gradient norm (after the sync the gradients are
identical on every rank, so the norm is computed locally), AdamW step, LR schedule step. Rank 0
prints progress, appends to ``metrics.jsonl`` and writes checkpoints.

With ``parallel.fsdp=full|dp`` the model is sharded by FSDP2 (:mod:`longseq.fsdp`) after the SP
plan: FSDP's reduce-scatter replaces ``sync_gradients`` (same SP-sum, DP-mean semantics), the norm
is of the whole sharded gradients, and checkpoints are sharded DCP directories
(:mod:`.dcp_checkpoint`), which also load at another SP x DP layout.

Faults (docs/training.md, "Faults"): one control collective a step (tag ``train.control``: every
rank's row [next batch failed, loss or gradient norm not finite, weights after the previous update
not finite, loss]; the next batch is loaded before it); a data error on one rank becomes the same
``DataError`` on every rank; a non-finite loss or gradient norm, or weights made non-finite by an
update (checked on every rank after ``optimizer.step()``, agreed in the next control collective or
in the checkpoint's gather, before any checkpoint of them), stops the run or is skipped / rolled
back (``train.on_nonfinite``), never checkpointed; any failure of a checkpoint write stops every
rank cleanly, the previous checkpoint intact; the checkpoint resumed from is verified on every rank,
loaded as tensors and plain data only (:mod:`.safe_load`) and refused in one line if it does not
fit the run (another model, global batch or data seed).
"""
from __future__ import annotations

import contextlib
import errno
import math
import os
import re
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Optional, Sequence

import torch
import torch.distributed as dist
from omegaconf import DictConfig, OmegaConf

import longseq
from longseq import comm
from longseq.ledger import LEDGER

from . import checkpoint as ckpt
from . import data as data_mod
from . import dcp_checkpoint
from . import methods
from .config import FAULT_KINDS, ConfigError, ParallelLayout, load_config, parse_args, resume_mismatch, usage, validate
from .manifest import CheckpointCorrupt
from .metrics import MetricsWriter, format_eta, peak_memory_gib, peak_tflops, progress_line, truncate_metrics

__all__ = ["main", "train", "make_optimizer", "make_scheduler", "lr_factor", "apply_optim_settings",
           "backward_and_sync", "DataError", "NonFiniteError", "CheckpointWriteError", "CheckpointMismatch"]


class DataError(RuntimeError):
    """A batch could not be loaded on some rank (the same message on every rank)."""


class NonFiniteError(FloatingPointError):
    """The loss or gradient norm is not finite and ``train.on_nonfinite=stop``."""


class CheckpointMismatch(RuntimeError):
    """The checkpoint to resume does not fit this run (another model, global batch or data seed)."""


class CheckpointWriteError(RuntimeError):
    """Writing a checkpoint failed (full disk, unwritable out_dir); the previous one is intact."""


# Errors that stop a run with a one-line message (no traceback). Every rank raises the same one, so
# rank 0 prints it; a CollectiveError differs per rank (who stalled, who waited), so every rank does.
_CLEAN_STOPS = (DataError, NonFiniteError, CheckpointWriteError, CheckpointCorrupt, CheckpointMismatch,
                comm.CollectiveError, longseq.optional.SetupError)
EXIT_CONFIG, EXIT_STOPPED, EXIT_INTERRUPTED = 2, 3, 130     # exit codes of the clean ends (0: trained)


def _env_rank() -> int:
    return int(os.environ.get("RANK", "0") or 0)


def _say(*a) -> None:
    print("[longseq.train]", *a, flush=True)


# ----------------------------------------------------------------------------------------------
# Optimizer and schedule
# ----------------------------------------------------------------------------------------------
def make_optimizer(model: torch.nn.Module, ocfg) -> torch.optim.Optimizer:
    """AdamW; weight decay on matrices only (biases, norms and 1-D tables are not decayed)."""
    if str(ocfg.name).lower() != "adamw":
        raise ConfigError(f"optim.name={ocfg.name!r}: only adamw is provided")
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (decay if p.dim() >= 2 else no_decay).append(p)
    wd = float(ocfg.weight_decay)
    groups = [{"params": decay, "weight_decay": wd}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=float(ocfg.lr),
                             betas=tuple(float(b) for b in ocfg.betas), eps=float(ocfg.eps))


def lr_factor(step: int, *, total: int, warmup: int, schedule: str, min_ratio: float) -> float:
    """Multiplier of the peak LR for the update after ``step`` completed steps: linear warmup over
    ``warmup`` steps, then cosine from 1 to ``min_ratio`` at ``total`` steps, or constant."""
    if warmup > 0 and step < warmup:
        return (step + 1) / warmup
    if schedule == "constant":
        return 1.0
    span = max(1, total - warmup)
    progress = min(1.0, max(0.0, (step - warmup) / span))
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def make_scheduler(opt: torch.optim.Optimizer, cfg) -> torch.optim.lr_scheduler.LambdaLR:
    o = cfg.optim
    total, warmup = int(cfg.train.steps), int(o.warmup_steps)
    sched, ratio = str(o.schedule), float(o.min_lr_ratio)
    return torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: lr_factor(s, total=total, warmup=warmup, schedule=sched, min_ratio=ratio))


def apply_optim_settings(opt: torch.optim.Optimizer, sched, ocfg) -> None:
    """After loading a checkpoint: this run's optimizer settings (``optim.lr``, ``betas``, ``eps``,
    ``weight_decay``) and its schedule (``train.steps``, ``optim.schedule``, ``warmup_steps``,
    ``min_lr_ratio``) replace the checkpoint's from the first resumed step; AdamW's moments and the
    step count are kept."""
    lr = float(ocfg.lr)
    for g in opt.param_groups:
        g["initial_lr"] = lr
        g["betas"] = tuple(float(b) for b in ocfg.betas)
        g["eps"] = float(ocfg.eps)
        g["weight_decay"] = float(ocfg.weight_decay) if all(p.dim() >= 2 for p in g["params"]) else 0.0
    sched.base_lrs = [lr] * len(opt.param_groups)
    for g, f in zip(opt.param_groups, sched.lr_lambdas):
        g["lr"] = lr * f(sched.last_epoch)


def _changed_settings(old: dict, cfg) -> list[str]:
    """``key old -> new`` for the schedule and optimizer settings that differ from the checkpoint's."""
    out = []
    for key in ("train.steps", "optim.lr", "optim.schedule", "optim.warmup_steps", "optim.min_lr_ratio",
                "optim.weight_decay", "optim.betas", "optim.eps"):
        a, b = OmegaConf.select(OmegaConf.create(old or {}), key), OmegaConf.select(cfg, key)
        b = OmegaConf.to_container(b) if OmegaConf.is_config(b) else b
        a = OmegaConf.to_container(a) if OmegaConf.is_config(a) else a
        if a is not None and a != b:
            out.append(f"{key} {a} -> {b}")
    return out


# ----------------------------------------------------------------------------------------------
# Pieces of the run
# ----------------------------------------------------------------------------------------------
def _device(cfg) -> torch.device:
    want = str(cfg.train.device)
    if want == "cpu" or (want == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    return longseq.launch.local_device()


def _backend(cfg, device: torch.device) -> str:
    b = str(cfg.train.backend)
    return b if b != "auto" else ("nccl" if device.type == "cuda" else "gloo")


def _autocast(precision: str, device: torch.device):
    if precision == "bf16":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def _precision_label(precision: str, cfg) -> str:
    """What computes in which dtype: autocast's, or FSDP2's parameter dtype (parallel.fsdp_param_dtype)."""
    if str(cfg.parallel.fsdp) != "none" and str(cfg.parallel.fsdp_param_dtype) == "bf16":
        return "bf16 (FSDP2 parameters, fp32 gradient reduction and optimizer)" + \
            (" + bf16 autocast" if precision == "bf16" else "")
    return precision


def _barrier(tag: str) -> None:
    comm.all_reduce(torch.zeros(1, device=_comm_device()), dist.group.WORLD, tag=tag)


def _comm_device() -> torch.device:
    return comm.collective_device(dist.group.WORLD)


def _summed_ledger(before: dict) -> dict:
    """This run's ledger totals (since ``before``), summed over all ranks, in format_table's shape."""
    mine = {}
    for key, (calls, sent, recv) in LEDGER.totals.items():
        b = before.get(key, (0, 0, 0))
        if calls - b[0] > 0:
            mine[key] = (calls - b[0], sent - b[1], recv - b[2])
    everyone = comm.all_gather_object(mine, dist.group.WORLD, tag="train.ledger")
    total: dict = {}
    for d in everyone:
        for key, (c, s, r) in d.items():
            acc = total.setdefault(key, {"calls": 0, "bytes_sent": 0, "bytes_recv": 0})
            acc["calls"] += c
            acc["bytes_sent"] += s
            acc["bytes_recv"] += r
    return total




def _fault_fires(cfg, kind: str, step: int, rank: int, out_dir: Path) -> bool:
    """Fault injection: True once (a marker file in the run directory keeps it from firing again
    after a restart) when ``train.fault_kind`` is ``kind``, the step is ``train.fault_at_step`` and
    this is rank ``train.fault_rank`` (disk_full: rank 0, the writer)."""
    at = cfg.train.fault_at_step
    fk = str(cfg.train.get("fault_kind", "exit"))
    if fk not in FAULT_KINDS:
        raise ConfigError(f"train.fault_kind={fk!r}: choose one of {', '.join(FAULT_KINDS)}")
    who = 0 if fk in ("disk_full", "disk_full_zip", "kill_in_write", "slow_write") else int(cfg.train.fault_rank)
    if at is None or fk != kind or int(at) != step or rank != who:
        return False
    marker = out_dir / f".fault_fired_step{int(at)}_rank{rank}"
    try:
        fd = os.open(str(marker), os.O_CREAT | os.O_EXCL | os.O_WRONLY)
    except FileExistsError:
        return False
    os.write(fd, f"{os.getpid()}\n".encode())
    os.fsync(fd)
    os.close(fd)
    what = "exits" if kind == "exit" else kind
    _say(f"fault injection: rank {rank} {what} at step {step} (train.fault_at_step={at}; marker {marker.name})")
    return True


def _maybe_fault(cfg, step: int, rank: int, out_dir: Path) -> None:
    """The faults that end or stop this process: exit, sigkill, sigstop."""
    for kind in ("exit", "sigkill", "sigstop"):
        if _fault_fires(cfg, kind, step, rank, out_dir):
            sys.stdout.flush()
            sys.stderr.flush()
            if kind == "exit":
                os._exit(17)
            os.kill(os.getpid(), signal.SIGKILL if kind == "sigkill" else signal.SIGSTOP)


class _KillMidWrite:
    """Pickling it SIGKILLs this process half-way through the checkpoint's temporary file."""

    def __reduce_ex__(self, protocol):
        sys.stdout.flush()
        os.kill(os.getpid(), signal.SIGKILL)


class _DiskFull:
    """Pickling it fails like a write to a full disk (fault injection: disk_full)."""

    def __reduce_ex__(self, protocol):
        raise OSError(errno.ENOSPC, "No space left on device (train.fault_kind=disk_full)")


def _agree_error(msg: Optional[str], tag: str) -> Optional[str]:
    """Every rank's view of whether some rank failed: one all-gather of a flag, then (only on a
    failure) of the messages; returns the first failing rank's message, the same on every rank."""
    flags = comm.all_gather_int(1 if msg else 0, dist.group.WORLD, tag=tag)
    if not any(flags):
        return None
    msgs = comm.all_gather_object(msg, dist.group.WORLD, tag=tag + ".detail")
    r = flags.index(1)
    return f"rank {r}: {msgs[r]}"


def _collective_timeout(cfg) -> float:
    t = cfg.train.get("timeout_s")
    return float(t if t is not None else cfg.train.get("collective_timeout_s", 600))


def _fresh_start_cleanup(out_dir: Path, ckpt_dir: Path) -> None:
    """resume=none: forget an earlier run in this directory (its checkpoints, pointer and metrics)."""
    old = ckpt.list_checkpoints(ckpt_dir)
    if old or (ckpt_dir / "latest").exists():
        _say(f"train.resume=none: removing {len(old)} checkpoint(s) of an earlier run in {ckpt_dir}")
    for _, p in old:
        ckpt.remove_checkpoint(p)
    (ckpt_dir / "latest").unlink(missing_ok=True)
    (out_dir / "metrics.jsonl").unlink(missing_ok=True)
    if os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") in ("", "0"):
        for m in out_dir.glob(".fault_fired_*"):
            m.unlink(missing_ok=True)


def _setup_run_dir(cfg, out_dir: Path, ckpt_dir: Path, resume: str) -> tuple[str, str]:
    """Rank 0: create the run directory (refusing one shared with other users unless
    ``train.allow_shared_out_dir``), remove an interrupted write's temporaries, start or continue
    the lineage, write ``config.yaml``; returns ``(lineage, resume)``."""
    if out_dir.exists() and not out_dir.is_dir():
        raise ConfigError(f"train.out_dir={out_dir} is a file, not a directory: choose another train.out_dir")
    out_dir.mkdir(parents=True, exist_ok=True)
    if not bool(cfg.train.get("allow_shared_out_dir", False)):
        for path, what in ((out_dir, "train.out_dir"), (ckpt_dir, "its checkpoints folder")):
            bad = ckpt.shared_write_problem(path, what)
            if bad:
                raise ConfigError(f"{bad}: whoever can write there can replace the checkpoints this run resumes from; "
                                  f"use a directory of your own (chmod o-w {path}), or train.allow_shared_out_dir=true")
    metrics_file = out_dir / "metrics.jsonl"
    if metrics_file.is_symlink():
        raise ConfigError(f"{metrics_file} is a symlink: longseq writes its metrics there and will not write through "
                          "a link; remove it or choose another train.out_dir")
    gone = ckpt.clean_temporaries(ckpt_dir)
    if gone:
        _say(f"removed {len(gone)} temporary file(s) of an interrupted checkpoint write: {', '.join(gone)}")
    restart = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") or 0)
    run_id = os.environ.get("TORCHELASTIC_RUN_ID", "") if restart or "TORCHELASTIC_RUN_ID" in os.environ else ""
    if resume == "none" and not restart:
        _fresh_start_cleanup(out_dir, ckpt_dir)
    setup = ckpt.start_lineage(ckpt_dir, resume, run_id=run_id, restart=restart)
    ckpt.write_atomic(out_dir / "config.yaml", lambda f: f.write(OmegaConf.to_yaml(cfg, resolve=True).encode()))
    return setup


def _ensure_grads(params: list) -> None:
    """Every parameter gets a gradient (zeros if unused), so every rank syncs the same set."""
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)


def backward_and_sync(loss: torch.Tensor, params: list, groups, fsdp_plan, clip: float) -> torch.Tensor:
    """Backward, then the gradients of the global batch on every rank (``sync_gradients``, or
    FSDP's reduce-scatter and :meth:`~longseq.fsdp.FSDPPlan.finish_gradients`), clipped to
    ``clip``; returns the global gradient norm before clipping."""
    loss.backward()
    _ensure_grads(params)
    if fsdp_plan is None:
        longseq.sync_gradients(params, groups)
    else:
        fsdp_plan.finish_gradients(params)
    return longseq.fsdp.grad_norm(params, clip)


def _groups(cfg, layout: ParallelLayout, mesh):
    """SP x DP groups: from the DeviceMesh handed to :func:`train` (its ``parallel.mesh_dims[1]`` dim
    is SP), or built over the world with dims named ``parallel.mesh_dims``."""
    dp_dim, sp_dim = (str(d) for d in cfg.parallel.mesh_dims)
    if mesh is None:
        return longseq.init_parallel_groups(layout.sp_size, dp_dim=dp_dim, sp_dim=sp_dim)
    try:
        groups = longseq.from_mesh(mesh, sp_dim=sp_dim)
    except ValueError as e:
        raise ConfigError(f"{e} (the SP dim's name is parallel.mesh_dims[1])") from None
    if (groups.sp_size, groups.dp_size) != (layout.sp_size, layout.dp_size):
        raise ConfigError(f"the DeviceMesh gives SP {groups.sp_size} x DP {groups.dp_size} but the config SP "
                          f"{layout.sp_size} x DP {layout.dp_size}: set parallel.sp_size={groups.sp_size}")
    return groups


def _load(path: str, model, optimizer, fsdp_plan, cfg) -> dict:
    """A checkpoint's state, the model and optimizer loaded from it (DCP directory or .pt file).
    Each rank reads the file (tensors and plain data only: :mod:`.safe_load`), checks that it fits
    this run (:func:`.config.resume_mismatch`) and loads it; the ranks agree on the outcome before
    DCP's own collectives, so a checkpoint refused anywhere stops every rank with the same line."""
    dcp = dcp_checkpoint.is_dcp(path)
    if not dcp and fsdp_plan is not None:
        raise ConfigError(f"{path} is a one-file checkpoint of a run without FSDP: resume it with parallel.fsdp=none "
                          "(a DCP checkpoint of an FSDP run loads either way), or start afresh (train.resume=none)")
    state, err, cls = None, None, CheckpointCorrupt
    try:
        state = dcp_checkpoint.read_trainer(path) if dcp else ckpt.load_checkpoint(path)
        bad = resume_mismatch(state.get("config"), cfg, Path(path).name)
        if bad:
            cls, err = CheckpointMismatch, bad
        elif not dcp:
            try:
                model.load_state_dict(state["model"])
                optimizer.load_state_dict(state["optimizer"])
            except (RuntimeError, ValueError, KeyError) as e:
                cls = CheckpointMismatch
                err = (f"{Path(path).name} does not fit this model ({_first_line(e)}): resume it with the model "
                       "settings it was written with, or start afresh: train.resume=none or a new train.out_dir")
    except CheckpointCorrupt as e:          # UnsafeCheckpoint included: the class tells which
        cls, err = type(e), str(e)
    err = _agree_error(err, "train.resume.load")
    if err:
        raise cls(err)          # every rank read the same file: the same kind of failure
    if dcp:
        try:
            dcp_checkpoint.load(path, model, optimizer)
        except Exception as e:              # noqa: BLE001 - DCP raises on every rank alike (CheckpointException)
            raise CheckpointMismatch(f"{Path(path).name} does not load into this model ({_first_line(e)}): "
                                     "start afresh: train.resume=none or a new train.out_dir") from None
    return state


def _first_line(e: BaseException) -> str:
    lines = [ln.strip() for ln in str(e).strip().splitlines() if ln.strip()]
    return f"{type(e).__name__}: {(lines[0] if lines else '')[:240]}"


def _verify_error(path) -> Optional[str]:
    try:
        ckpt.verify(path)
    except CheckpointCorrupt as e:
        return str(e)
    return None


def _choose_resume(resume: str, ckpt_dir: Path, lineage: str,
                   allow_shared: bool = False) -> tuple[Optional[str], Optional[str]]:
    """(the checkpoint to resume from or None, an error that stops every rank or None); rank 0.
    auto/strict: the newest of this lineage that verifies (each newer one that fails: one line);
    a path: that checkpoint, which must verify."""
    if resume in ("auto", "strict"):
        try:
            path, problems = ckpt.find_good(ckpt_dir, lineage, strict=resume == "strict")
        except CheckpointCorrupt as e:
            return None, f"{e} (train.resume=auto would use the newest good one)"
        for line in problems:
            _say(f"checkpoint failed verification, not used: {line}")
        if problems:
            _say(f"resuming from {path.name if path else 'nothing (no checkpoint verifies): a fresh start'}")
        return (str(path) if path else None), None
    err = _verify_error(resume)
    if not err and not allow_shared:
        err = (ckpt.shared_write_problem(resume, "the checkpoint")
               or ckpt.shared_write_problem(Path(resume).resolve().parent, "the checkpoint's folder"))
        if err:
            err += " (whoever can write it can make it run code or swap its weights): train.allow_shared_out_dir=true"
    return (None, f"train.resume={resume}: {err}") if err else (resume, None)


# ----------------------------------------------------------------------------------------------
# The step's control values, finiteness, rollback
# ----------------------------------------------------------------------------------------------
def _load_batch(cfg, loader, position: int, step: int, rank: int, out_dir: Path):
    """(the batch of ``step`` at data ``position``, None) or (None, this rank's one-line error)."""
    try:
        if _fault_fires(cfg, "data", step, rank, out_dir):
            raise ValueError("the batch failed to load (train.fault_kind=data)")
        return loader.batch(position), None
    except (ValueError, OSError, EOFError, RuntimeError) as e:
        return None, f"{type(e).__name__}: {e}"


def _control(data_bad: bool, pre_bad: bool, post_bad: bool, loss: float, world: int) -> torch.Tensor:
    """The step's one control collective (tag ``train.control``): every rank's row ``[next batch
    failed, loss or gradient norm not finite, weights after the previous update not finite, loss]``,
    float64, gathered as a ``[world, 4]`` tensor (on the CPU)."""
    mine = torch.tensor([[float(data_bad), float(pre_bad), float(post_bad), loss]], dtype=torch.float64,
                        device=_comm_device())
    return comm.all_gather(mine, dist.group.WORLD, dim=0, tag="train.control").cpu()


def _data_error(err: Optional[str], row: torch.Tensor, step: int, position: int) -> Optional[str]:
    """The message of the first rank whose batch failed (the same on every rank), or None; only on a
    failure a second collective gathers the messages."""
    if not row[:, 0].any():
        return None
    msgs = comm.all_gather_object(err, dist.group.WORLD, tag="train.control.detail")
    r = int(row[:, 0].nonzero()[0, 0])
    return f"loading the batch of step {step} (data position {position}) failed on rank {r}: {msgs[r]}"


def _post_msg(step: int, what: str) -> str:
    return (f"the update of step {step} made some weight non-finite on some rank (the loss and gradient norm were "
            "finite: e.g. optim.eps=0, or an LR too large for the weights); lower optim.lr, raise optim.eps, or use "
            f"train.on_nonfinite=skip (rolls the update back). {what}")


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if hasattr(t, "to_local") else t


def _all_finite(params: Sequence[torch.Tensor]) -> bool:
    """Whether this rank's parameters (its shards, under FSDP) are all finite."""
    with torch.no_grad():
        flags = [torch.isfinite(_local(p)).all() for p in params]
        return bool(torch.stack(flags).all()) if flags else True


def _snapshot(params: Sequence[torch.Tensor], optimizer: torch.optim.Optimizer):
    """A copy of the parameters and the optimizer state (``on_nonfinite=skip`` rolls back to it)."""
    with torch.no_grad():
        return ([p.detach().clone() for p in params],
                {p: {k: v.clone() if torch.is_tensor(v) else v for k, v in optimizer.state[p].items()}
                 for p in params if p in optimizer.state})


def _restore(snap, params: Sequence[torch.Tensor], optimizer: torch.optim.Optimizer) -> None:
    """Put back the state :func:`_snapshot` copied (the parameters in place, the optimizer state)."""
    saved, state = snap
    with torch.no_grad():
        for p, s in zip(params, saved):
            p.copy_(s)
    for p in params:
        if p in state:
            optimizer.state[p] = state[p]
        else:
            optimizer.state.pop(p, None)


def _write_checkpoint(cfg, step, position, rngs, model, optimizer, scheduler, fsdp_plan, groups, ckpt_dir, out_dir,
                      lineage, keep, log_every, steps) -> None:
    """Write the checkpoint of ``step`` (rank 0, or every rank under FSDP) and agree on the outcome:
    any exception of the write is a :class:`CheckpointWriteError` on every rank, the previous
    checkpoint intact. A peer that times out while rank 0 writes says so (rank 0's write, not a peer)."""
    rank, world = dist.get_rank(), dist.get_world_size()
    lead = rank == 0
    state = {"format": ckpt.FORMAT, "step": step, "data_position": position,
             "scheduler": scheduler.state_dict(), "rng": rngs,
             "layout": {"world": world, "sp_size": groups.sp_size, "dp_size": groups.dp_size,
                        "fsdp": str(cfg.parallel.fsdp)},
             "config": OmegaConf.to_container(cfg, resolve=True)}
    err, p, t0 = None, None, time.perf_counter()
    try:
        if fsdp_plan is not None:                   # sharded: every rank writes its shards
            p = dcp_checkpoint.save(ckpt_dir, step, model, optimizer, state, keep=keep, lineage=lineage)
        elif lead:
            state.update(model=model.state_dict(), optimizer=optimizer.state_dict())
            full_after = None
            if _fault_fires(cfg, "disk_full", step, rank, out_dir):
                state["fault"] = _DiskFull()
            elif _fault_fires(cfg, "disk_full_zip", step, rank, out_dir):
                full_after = 4096                   # the disk fills under torch's zip writer
            elif _fault_fires(cfg, "kill_in_write", step, rank, out_dir):
                state["fault"] = _KillMidWrite()
            elif _fault_fires(cfg, "slow_write", step, rank, out_dir):
                time.sleep(2 * _collective_timeout(cfg))     # a write slower than the collective timeout
            p = ckpt.save_checkpoint(ckpt_dir, step, state, keep=keep, lineage=lineage, full_after=full_after)
        if lead and (step % log_every == 0 or step == steps):
            _say(f"checkpoint {p.relative_to(out_dir)}")
    except comm.CollectiveError:
        raise
    except Exception as e:          # noqa: BLE001 - any failure of the write (OSError, zip writer RuntimeError, ...)
        prev = ckpt.find_latest(ckpt_dir) if lead else None
        first = (str(e).strip().splitlines() or [""])[0][:300]
        err = (f"writing the checkpoint of step {step} in {ckpt_dir} failed ({type(e).__name__}: {first}); "
               f"{'the previous checkpoint ' + prev.name + ' is intact' if prev else 'no earlier checkpoint'}"
               ": free space (or choose another train.out_dir) and rerun with train.resume=auto")
    del state
    took = time.perf_counter() - t0
    try:
        err = _agree_error(err, "train.checkpoint")
    except comm.CollectiveError as e:
        timeout = _collective_timeout(cfg)
        what = (f"rank 0's write took {took:.1f} s" if lead else
                f"this rank waited {time.perf_counter() - t0:.1f} s for rank 0's write")
        raise comm.CollectiveError(
            f"after the checkpoint of step {step} ({what}; train.collective_timeout_s={timeout:g}): "
            "rank 0's write may be slower than the collective timeout (raise train.collective_timeout_s above the "
            f"write time), or a rank died. {e}") from None
    if err:
        raise CheckpointWriteError(err)


# ----------------------------------------------------------------------------------------------
# The run
# ----------------------------------------------------------------------------------------------
def train(cfg: DictConfig, layout: ParallelLayout, *, mesh=None) -> dict:
    """Run the training described by a validated config; returns a small summary (rank 0's view).
    ``mesh``: a ``DeviceMesh`` to take the SP x DP groups from (its dim ``parallel.mesh_dims[1]``
    is SP, the others DP); by default they are built over the world."""
    device = _device(cfg)
    owns_group = not dist.is_initialized()      # a caller's process group (and mesh) is left as it was
    longseq.init_distributed(_backend(cfg, device), timeout_s=_collective_timeout(cfg))
    rank, world = dist.get_rank(), dist.get_world_size()
    if world != layout.world:
        raise ConfigError(f"validated for a world of {layout.world} but torch.distributed has {world} ranks")
    groups = _groups(cfg, layout, mesh)
    lead = rank == 0
    out_dir = Path(str(cfg.train.out_dir)).expanduser().resolve()
    ckpt_dir = ckpt.checkpoint_dir(out_dir)
    resume = cfg.train.resume
    resume = "none" if resume in (None, False) else str(resume)

    on_nonfinite = str(cfg.train.get("on_nonfinite", "stop"))
    if on_nonfinite not in ("stop", "skip"):
        raise ConfigError(f"train.on_nonfinite={on_nonfinite!r}: choose stop or skip")

    # Run directory, config, an earlier run's leftovers, this run's lineage (checkpoint module docstring);
    # rank 0's failure here (unwritable, a file, shared with other users) stops every rank with its message.
    setup = (None, None, None)
    if lead:
        try:
            setup = (*_setup_run_dir(cfg, out_dir, ckpt_dir, resume), None)
        except (ConfigError, OSError) as e:
            msg = str(e) if isinstance(e, ConfigError) else f"{e.strerror or e}: {getattr(e, 'filename', '') or ''}"
            setup = (None, None, msg if isinstance(e, ConfigError) else
                     f"train.out_dir={out_dir} cannot be used ({msg}): choose a directory you can write")
    lineage, resume, err = comm.all_gather_object(setup, dist.group.WORLD, tag="train.setup")[0]
    if err:
        raise ConfigError(err)

    precision = str(cfg.train.precision)
    if precision == "auto":
        precision = "bf16" if device.type == "cuda" else "fp32"

    # Model, plan, optimizer.
    trainable = methods.build(cfg, groups, device)
    model = trainable.model
    model.train()
    if bool(cfg.train.activation_checkpointing):
        methods.apply_activation_checkpointing(trainable.units)
    fsdp_mode = str(cfg.parallel.fsdp)
    fsdp_plan = longseq.fsdp.apply_fsdp(
        model, groups, fsdp_mode, units=trainable.units,
        param_dtype=torch.bfloat16 if str(cfg.parallel.fsdp_param_dtype) == "bf16" else None)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = make_optimizer(model, cfg.optim)
    scheduler = make_scheduler(optimizer, cfg)
    G = int(cfg.train.global_batch_size)
    steps = int(cfg.train.steps)

    # Resume.
    step, position, resumed_from = 0, 0, None
    if resume != "none":
        allow_shared = bool(cfg.train.get("allow_shared_out_dir", False))
        path = _choose_resume(resume, ckpt_dir, lineage, allow_shared) if lead else None
        path, err = comm.all_gather_object(path, dist.group.WORLD, tag="train.resume")[0]
        if err:
            raise CheckpointCorrupt(err)
        if path is not None:
            err = _agree_error(_verify_error(path) if not lead else None, "train.resume.verify")
            if err:
                raise CheckpointCorrupt(f"the checkpoint {path} does not verify on {err}")
            state = _load(path, model, optimizer, fsdp_plan, cfg)
            scheduler.load_state_dict(state["scheduler"])
            apply_optim_settings(optimizer, scheduler, cfg.optim)   # this run's settings, from the next step
            changed = _changed_settings(state.get("config"), cfg)
            if lead and changed:
                _say("resume: this run's settings apply from the first resumed step: " + ", ".join(changed))
            step, position = int(state["step"]), int(state["data_position"])
            rng = state.get("rng") or []
            if rng:
                ckpt.set_rng_state(rng[rank] if len(rng) == world else rng[0])
            resumed_from = path
            del state
            if lead:
                _say(f"resuming lineage {lineage} from step {step}: {path}")
    if lead:
        truncate_metrics(out_dir / "metrics.jsonl", step)        # drop steps a killed attempt logged after it

    shard = None
    if trainable.input_shard is not None and groups.sp_size > 1:
        shard = data_mod.Shard(trainable.input_shard, groups.sp_rank, groups.sp_size)
    loader = data_mod.BatchSource(data_mod.make_source(cfg), global_batch=G, dp_rank=groups.dp_rank,
                                  dp_size=groups.dp_size, shard=shard, sp_size=groups.sp_size, device=device)
    metrics = MetricsWriter(out_dir, enabled=lead, tensorboard=cfg.train.tensorboard)
    peak = peak_tflops(device, cfg.train.peak_tflops)
    tokens_per_step = G * trainable.tokens_per_sample
    n_params = methods.param_count(model)

    if lead:
        _say(f"world {world} = SP {groups.sp_size} x DP {groups.dp_size} | {cfg.model.name} "
             f"({methods.human_count(n_params)} parameters) | parallel={cfg.parallel.method} | "
             f"{device.type} {dist.get_backend()} | precision {_precision_label(precision, cfg)}"
             + (f" | FSDP2 {fsdp_mode} over {fsdp_plan.mesh.size()} ranks" if fsdp_plan else "")
             + (" | activation checkpointing" if cfg.train.activation_checkpointing else ""))
        _say(f"global batch {G} samples x {trainable.tokens_per_sample} tokens | {steps} steps"
             + (f" | resumed from {Path(resumed_from).name} (step {step})" if resumed_from else ""))
        _say(f"metrics -> {out_dir / 'metrics.jsonl'} | checkpoints -> "
             + (f"{ckpt_dir}" if cfg.train.save_checkpoints else "none (train.save_checkpoints=false)")
             + f" | plot: python -m longseq.plot {out_dir}")

    ledger_before = {k: tuple(v) for k, v in LEDGER.totals.items()}
    every = int(cfg.train.checkpoint_every)
    save = bool(cfg.train.save_checkpoints)
    keep = int(cfg.train.keep_checkpoints)
    log_every = max(1, int(cfg.train.log_every))
    progress = bool(cfg.train.progress)
    first_step = step
    sleep_s = float(cfg.train.debug_sleep_s or 0.0)
    clip = float(cfg.optim.grad_clip or 0.0)
    last: dict = {}
    losses: list[float] = []
    wall0 = time.perf_counter()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)

    # One control collective a step (tag train.control, module docstring "Control"): after the
    # backward of step N, every rank's [next batch failed, loss or gnorm not finite, weights after
    # update N-1 not finite, loss] in one all-gather; the first batch's flag has one of its own.
    batch, data_err = None, None
    if step < steps:
        batch, err = _load_batch(cfg, loader, position, step + 1, rank, out_dir)
        row = _control(err is not None, False, False, 0.0, world)
        data_err = _data_error(err, row, step + 1, position)
    post_local: Optional[bool] = None          # weights after the last update not finite here (not yet agreed)
    snapshot = None                            # on_nonfinite=skip: the state before the last update
    while step < steps:
        if data_err:
            raise DataError(data_err)
        _maybe_fault(cfg, step + 1, rank, out_dir)
        t0 = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        with _autocast(precision, device):
            loss = trainable.loss(batch)
            if _fault_fires(cfg, "nan", step + 1, rank, out_dir):
                loss = loss * float("nan")
        gnorm = backward_and_sync(loss, params, groups, fsdp_plan, clip)
        batch = None
        lr = optimizer.param_groups[0]["lr"]
        err = None
        if step + 1 < steps:                   # the next step's batch, its load agreed on in this step's control
            batch, err = _load_batch(cfg, loader, position + G, step + 2, rank, out_dir)
        loss_f = float(loss.detach())
        pre_bad = not (math.isfinite(loss_f) and math.isfinite(float(gnorm)))
        row = _control(err is not None, pre_bad, bool(post_local), loss_f, world)
        data_err = _data_error(err, row, step + 2, position + G)
        rolled_back = False
        if row[:, 2].any():                    # the previous update made some weight non-finite
            if on_nonfinite == "stop":
                raise NonFiniteError(_post_msg(step, "No checkpoint holds these weights"))
            _restore(snapshot, params, optimizer)
            rolled_back = True
            if lead:
                _say(f"step {step}: its update made some weight non-finite: rolled back to the weights before it; "
                     f"step {step + 1}'s update (computed from them) skipped too (train.on_nonfinite=skip)")
        post_local = None
        skipped = rolled_back or bool(row[:, 1].any())
        if row[:, 1].any() and on_nonfinite == "stop":
            raise NonFiniteError(
                f"the loss ({loss_f:g} on rank {rank}) or gradient norm ({float(gnorm):g}) is not finite "
                f"at step {step + 1} on some rank; the data of the step loaded and was checked finite, so: lower "
                "optim.lr, use train.precision=fp32 to see whether bf16 is the cause, or train.on_nonfinite=skip. "
                "No checkpoint was written from this state")
        if skipped:
            optimizer.zero_grad(set_to_none=True)
            if lead and not rolled_back:
                _say(f"step {step + 1}: non-finite loss or gradient norm on some rank; update skipped "
                     "(train.on_nonfinite=skip)")
        else:
            snapshot = _snapshot(params, optimizer) if on_nonfinite == "skip" else None
            optimizer.step()
            post_local = not _all_finite(params)
        scheduler.step()
        step += 1
        position += G
        ckpt_due = save and ((every and step % every == 0) or step == steps)
        if ckpt_due:          # the RNG states and this update's finiteness, agreed before anything is logged or written
            gathered = comm.all_gather_object((ckpt.rng_state(), bool(post_local)), dist.group.WORLD,
                                              tag="train.checkpoint.rng")
            if any(bad for _, bad in gathered):
                if on_nonfinite == "stop":
                    raise NonFiniteError(_post_msg(step, "Its checkpoint was not written"))
                _restore(snapshot, params, optimizer)
                skipped = True
                if lead:
                    _say(f"step {step}: its update made some weight non-finite: rolled back, the checkpoint holds the "
                         "weights before it (train.on_nonfinite=skip)")
            post_local = None

        loss_value = float(row[:, 3].sum() / world)      # SP ranks hold their group's loss: the DP mean
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        dt = time.perf_counter() - t0
        tps = tokens_per_step / dt
        mfu = trainable.flops_per_token * tps / (world * peak * 1e12) if peak else None
        last = {"step": step, "loss": loss_value, "lr": lr, "grad_norm": float(gnorm), "step_time_s": dt,
                "tokens_per_s": tps, "samples_per_s": G / dt, "peak_mem_gib": peak_memory_gib(device),
                "mfu": mfu, "data_position": position, **({"skipped": True} if skipped else {}),
                **({"rolled_back": step - 1} if rolled_back else {})}
        losses.append(loss_value)
        metrics.log(last)
        if lead and progress and (step % log_every == 0 or step == steps):
            eta = (time.perf_counter() - wall0) / (step - first_step) * (steps - step)
            _say(progress_line(last, steps, device.type == "cpu") + f" | ETA {format_eta(eta)}")

        if ckpt_due:
            _write_checkpoint(cfg, step, position, [r for r, _ in gathered], model, optimizer, scheduler, fsdp_plan,
                              groups, ckpt_dir, out_dir, lineage, keep, log_every, steps)
        if sleep_s > 0:
            time.sleep(sleep_s)

    if post_local is not None:              # the last update, not checkpointed: agreed on here
        row = _control(False, False, post_local, 0.0, world)
        if row[:, 2].any():
            if on_nonfinite == "stop":
                raise NonFiniteError(_post_msg(step, "No checkpoint holds these weights"))
            _restore(snapshot, params, optimizer)
            if lead:
                _say(f"step {step}: its update made some weight non-finite: rolled back (train.on_nonfinite=skip)")
    snapshot = None

    wall = time.perf_counter() - wall0
    metrics.close()
    table = _summed_ledger(ledger_before)
    if lead:
        import json
        text = longseq.format_table(table, title="ledger of this run, summed over all ranks")
        ckpt.write_atomic(out_dir / "ledger.txt", lambda f: f.write((text + "\n").encode()))
        doc = json.dumps([{"op": op, "tag": tag, **v} for (op, tag), v in sorted(table.items())], indent=1) + "\n"
        ckpt.write_atomic(out_dir / "ledger.json", lambda f: f.write(doc.encode()))
        if losses:
            _say(f"done: {len(losses)} steps in {wall:.1f} s | loss {losses[0]:.5f} -> {losses[-1]:.5f}")
        else:
            _say(f"nothing to do: the checkpoint is at step {step} >= train.steps={steps} "
                 "(raise train.steps to train longer, or use a new train.out_dir)")
        if bool(cfg.train.get("print_ledger", False)):
            print(text, flush=True)
        else:
            _say(f"ledger of this run -> {out_dir / 'ledger.txt'} (train.print_ledger=true prints it here)")
    _barrier("train.end")
    if owns_group:
        longseq.launch.destroy()
    return {"step": step, "losses": losses, "last": last, "out_dir": str(out_dir)}


# ----------------------------------------------------------------------------------------------
# Entry point
# ----------------------------------------------------------------------------------------------
class RunInterrupted(Exception):
    """SIGINT (Ctrl-C) reached this rank; the run stops with one line saying where to resume."""


_STOP_SIGNAL: Optional[int] = None


def _on_stop_signal(signum, frame) -> None:
    global _STOP_SIGNAL
    first = _STOP_SIGNAL is None
    _STOP_SIGNAL = signum
    if first:
        raise RunInterrupted(signal.Signals(signum).name)


def _catch_stop_signals() -> None:
    """Ctrl-C (SIGINT: from the terminal, and from torchrun's agent, which passes the signal it got on
    to its workers) raises RunInterrupted in the main thread instead of KeyboardInterrupt. A SIGINT
    that was ignored when the process started (``cmd &`` in a script) stays ignored. SIGTERM keeps its
    default (the process ends at once, silently): torchrun sends it to the survivors of a failed rank,
    which may be blocked in a collective where no Python handler runs."""
    global _STOP_SIGNAL
    _STOP_SIGNAL = None
    if signal.getsignal(signal.SIGINT) is not signal.SIG_IGN:
        signal.signal(signal.SIGINT, _on_stop_signal)


def _resume_hint(cfg) -> str:
    """Where an interrupted run stands: the last step logged and the newest checkpoint to resume from."""
    out_dir = Path(str(cfg.train.out_dir)).expanduser().resolve()
    from .metrics import read_metrics
    steps = [r["step"] for r in read_metrics(out_dir / "metrics.jsonl") if "step" in r]
    done = f"after step {steps[-1]}" if steps else "before the first step"
    saved = ckpt.list_checkpoints(ckpt.checkpoint_dir(out_dir))
    if not saved:
        return f"{done}; no checkpoint was written yet, so a rerun starts from step 0"
    n, path = saved[-1]
    again = "rerun the same command" if str(cfg.train.resume) in ("auto", "strict") else "rerun with train.resume=auto"
    return f"{done}; to resume from step {n} ({path.relative_to(out_dir)}), {again}"


def main(argv: Optional[Sequence[str]] = None) -> int:
    """The entry of ``python -m longseq.train``; returns the exit code: 0 trained, 2 a config error,
    3 a clean stop (one line: bad data, a non-finite loss, a failed checkpoint write, a stalled rank,
    a missing optional package), 130 interrupted (Ctrl-C; one line saying where to resume)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    lead = _env_rank() == 0
    try:
        args = parse_args(argv)
        if args.help:
            if lead:
                print(usage(args.config_dir))
            return 0
        cfg = load_config(args.overrides, config_dir=args.config_dir, config_name=args.config_name)
        if args.print_cfg:
            if lead:
                print(OmegaConf.to_yaml(cfg))
            return 0
        if args.nproc and "LOCAL_RANK" not in os.environ:
            os.environ["WORLD_SIZE"] = str(args.nproc)     # validate the layout the workers will see
            try:
                validate(cfg)
            finally:
                del os.environ["WORLD_SIZE"]
            return launch_workers(args.nproc, args.worker_argv)
        layout = validate(cfg)
    except ConfigError as e:
        if lead:
            print(f"longseq.train: config error: {e}", file=sys.stderr, flush=True)
        return EXIT_CONFIG
    if threading.current_thread() is threading.main_thread():
        _catch_stop_signals()
    try:
        train(cfg, layout)
    except BaseException as e:  # noqa: BLE001 - the clean ends below, everything else as it is
        if _STOP_SIGNAL is not None:        # whatever the signal interrupted (a collective, a write)
            if lead:
                print(f"longseq.train: interrupted ({signal.Signals(_STOP_SIGNAL).name}) {_resume_hint(cfg)}",
                      file=sys.stderr, flush=True)
            return EXIT_INTERRUPTED
        if isinstance(e, ConfigError):        # found once the process group is up (e.g. the mesh)
            if lead:
                print(f"longseq.train: config error: {e}", file=sys.stderr, flush=True)
            return EXIT_CONFIG
        if isinstance(e, _CLEAN_STOPS):
            if lead or isinstance(e, comm.CollectiveError):
                print(f"longseq.train: rank {_env_rank()}: stopped: {type(e).__name__}: {e}", file=sys.stderr,
                      flush=True)
            return EXIT_STOPPED
        if isinstance(e, RuntimeError) and is_backend_failure(e):     # FSDP2 / DCP collectives, per rank
            print(f"longseq.train: rank {_env_rank()}: stopped: CollectiveError: a collective outside longseq's "
                  f"ledger (FSDP2 / DCP) failed on this rank: a peer stopped answering (train.collective_timeout_s), "
                  f"died or raised before it -- see the first error of the other ranks. Backend: {_first_line(e)}",
                  file=sys.stderr, flush=True)
            return EXIT_STOPPED
        raise
    return 0


def is_backend_failure(e: BaseException) -> bool:
    """Whether ``e`` is the process group's own failure (a gloo / NCCL timeout or a closed
    connection, raised inside FSDP2 or DCP, whose collectives bypass :mod:`longseq.comm`)."""
    if isinstance(e, getattr(dist, "DistError", ())):
        return True
    return bool(re.search(r"gloo|nccl|connection closed|connection reset|timed out|broken pipe", str(e), re.I))


def launch_workers(nproc: int, argv: Sequence[str]) -> int:
    """``torchrun --standalone --nproc_per_node nproc -m longseq.train argv``, in this process, once
    the config has been checked here. A worker's clean end (a config error, a clean stop, Ctrl-C) was
    already said in one line by the worker, so the launcher adds nothing and exits with its code; any
    other failure gets one line here (the worker's traceback is above) instead of torchrun's
    ChildFailedError report."""
    import logging

    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import get_args_parser, run
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    for name, lg in list(logging.Logger.manager.loggerDict.items()):   # its per-worker failure report
        if name.startswith("torch.distributed.elastic") and isinstance(lg, logging.Logger):
            lg.setLevel(logging.CRITICAL)
    try:
        run(get_args_parser().parse_args(["--standalone", "--nproc_per_node", str(nproc),
                                          "-m", "longseq.train", *argv]))
    except ChildFailedError as e:
        codes = sorted({f.exitcode for f in e.failures.values()})
        clean = [c for c in codes if c in (EXIT_CONFIG, EXIT_STOPPED, EXIT_INTERRUPTED)]
        if clean and all(c in clean or c < 0 for c in codes):     # others killed after a clean stop
            return clean[0]
        print(f"longseq.train: {len(e.failures)} of {nproc} workers failed (exit code {', '.join(map(str, codes))});"
              " their messages are above", file=sys.stderr, flush=True)
        return 1
    except (SignalException, KeyboardInterrupt):    # Ctrl-C: the workers got it too; rank 0 said where to resume
        return EXIT_INTERRUPTED
    return 0
