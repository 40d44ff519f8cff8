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

Faults (docs/training.md, "Faults"): a data error on one rank becomes the same ``DataError`` on
every rank (one 8-byte all-gather a step, tag ``train.data.ok``); a non-finite loss or gradient norm
on any rank is agreed on (tag ``train.nonfinite``) and skips the update or stops the run
(``train.on_nonfinite``), never checkpointed; a failed checkpoint write stops every rank cleanly,
the previous checkpoint intact; the checkpoint resumed from is verified on every rank.
"""
from __future__ import annotations

import contextlib
import errno
import math
import os
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
from .config import ConfigError, ParallelLayout, load_config, parse_args, usage, validate
from .manifest import CheckpointCorrupt
from .metrics import MetricsWriter, format_eta, peak_memory_gib, peak_tflops, progress_line, truncate_metrics

__all__ = ["main", "train", "make_optimizer", "make_scheduler", "lr_factor", "apply_optim_settings",
           "backward_and_sync", "DataError", "NonFiniteError", "CheckpointWriteError"]


class DataError(RuntimeError):
    """A batch could not be loaded on some rank (the same message on every rank)."""


class NonFiniteError(FloatingPointError):
    """The loss or gradient norm is not finite and ``train.on_nonfinite=stop``."""


class CheckpointWriteError(RuntimeError):
    """Writing a checkpoint failed (full disk, unwritable out_dir); the previous one is intact."""


# Errors that stop a run with a one-line message (no traceback). Every rank raises the same one, so
# rank 0 prints it; a CollectiveError differs per rank (who stalled, who waited), so every rank does.
_CLEAN_STOPS = (DataError, NonFiniteError, CheckpointWriteError, CheckpointCorrupt, comm.CollectiveError,
                longseq.optional.SetupError)
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


FAULT_KINDS = ("exit", "sigkill", "sigstop", "nan", "data", "disk_full", "kill_in_write")


def _fault_fires(cfg, kind: str, step: int, rank: int, out_dir: Path) -> bool:
    """Fault injection: True once (a marker file in the run directory keeps it from firing again
    after a restart) when ``train.fault_kind`` is ``kind``, the step is ``train.fault_at_step`` and
    this is rank ``train.fault_rank`` (disk_full: rank 0, the writer)."""
    at = cfg.train.fault_at_step
    fk = str(cfg.train.get("fault_kind", "exit"))
    if fk not in FAULT_KINDS:
        raise ConfigError(f"train.fault_kind={fk!r}: choose one of {', '.join(FAULT_KINDS)}")
    who = 0 if fk in ("disk_full", "kill_in_write") else int(cfg.train.fault_rank)
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


def _load(path: str, model, optimizer, fsdp_plan) -> dict:
    """A checkpoint's state, the model and optimizer loaded from it (DCP directory or .pt file)."""
    if dcp_checkpoint.is_dcp(path):
        return dcp_checkpoint.load(path, model, optimizer)
    if fsdp_plan is not None:
        raise ConfigError(f"{path} is a one-file checkpoint of a run without FSDP: resume it with parallel.fsdp=none "
                          "(a DCP checkpoint of an FSDP run loads either way), or start afresh (train.resume=none)")
    state = ckpt.load_checkpoint(path)
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    return state


def _verify_error(path) -> Optional[str]:
    try:
        ckpt.verify(path)
    except CheckpointCorrupt as e:
        return str(e)
    return None


def _choose_resume(resume: str, ckpt_dir: Path, lineage: str) -> tuple[Optional[str], Optional[str]]:
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
    return (None, f"train.resume={resume}: {err}") if err else (resume, None)


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

    # Run directory, config, an earlier run's leftovers, this run's lineage (checkpoint module docstring).
    setup = None
    if lead:
        out_dir.mkdir(parents=True, exist_ok=True)
        gone = ckpt.clean_temporaries(ckpt_dir)
        if gone:
            _say(f"removed {len(gone)} temporary file(s) of an interrupted checkpoint write: {', '.join(gone)}")
        restart = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") or 0)
        run_id = os.environ.get("TORCHELASTIC_RUN_ID", "") if restart or "TORCHELASTIC_RUN_ID" in os.environ else ""
        if resume == "none" and not restart:
            _fresh_start_cleanup(out_dir, ckpt_dir)
        setup = ckpt.start_lineage(ckpt_dir, resume, run_id=run_id, restart=restart)
        (out_dir / "config.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True))
    lineage, resume = comm.all_gather_object(setup, dist.group.WORLD, tag="train.setup")[0]

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
        path = _choose_resume(resume, ckpt_dir, lineage) if lead else None
        path, err = comm.all_gather_object(path, dist.group.WORLD, tag="train.resume")[0]
        if err:
            raise CheckpointCorrupt(err)
        if path is not None:
            err = _agree_error(_verify_error(path) if not lead else None, "train.resume.verify")
            if err:
                raise CheckpointCorrupt(f"the checkpoint {path} does not verify on {err}")
            state = _load(path, model, optimizer, fsdp_plan)
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

    while step < steps:
        _maybe_fault(cfg, step + 1, rank, out_dir)
        t0 = time.perf_counter()
        batch, err = None, None
        try:
            if _fault_fires(cfg, "data", step + 1, rank, out_dir):
                raise ValueError("the batch failed to load (train.fault_kind=data)")
            batch = loader.batch(position)
        except (ValueError, OSError, EOFError, RuntimeError) as e:
            err = f"{type(e).__name__}: {e}"
        err = _agree_error(err, "train.data.ok")
        if err:
            raise DataError(f"loading the batch of step {step + 1} (data position {position}) failed on {err}")
        optimizer.zero_grad(set_to_none=True)
        with _autocast(precision, device):
            loss = trainable.loss(batch)
            if _fault_fires(cfg, "nan", step + 1, rank, out_dir):
                loss = loss * float("nan")
        gnorm = backward_and_sync(loss, params, groups, fsdp_plan, clip)
        lr = optimizer.param_groups[0]["lr"]
        bad = torch.tensor([0.0 if (math.isfinite(float(loss.detach())) and math.isfinite(float(gnorm))) else 1.0],
                           device=_comm_device())
        skipped = bool(comm.all_reduce(bad, dist.group.WORLD, tag="train.nonfinite").item() > 0)
        if skipped and on_nonfinite == "stop":
            raise NonFiniteError(
                f"the loss ({float(loss.detach()):g} on rank {rank}) or gradient norm ({float(gnorm):g}) is not finite "
                f"at step {step + 1} on some rank; the data of the step loaded and was checked finite, so: lower "
                "optim.lr, use train.precision=fp32 to see whether bf16 is the cause, or train.on_nonfinite=skip. "
                "No checkpoint was written from this state")
        if skipped:
            optimizer.zero_grad(set_to_none=True)
            if lead:
                _say(f"step {step + 1}: non-finite loss or gradient norm on some rank; update skipped "
                     "(train.on_nonfinite=skip)")
        else:
            optimizer.step()
        scheduler.step()
        step += 1
        position += G

        value = loss.detach().float().reshape(1).clone()
        if groups.dp_size > 1:
            comm.all_reduce(value, groups.dp_group, tag="train.loss.dp")
            value /= groups.dp_size
        loss_value = float(value.item())
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        dt = time.perf_counter() - t0
        tps = tokens_per_step / dt
        mfu = trainable.flops_per_token * tps / (world * peak * 1e12) if peak else None
        last = {"step": step, "loss": loss_value, "lr": lr, "grad_norm": float(gnorm), "step_time_s": dt,
                "tokens_per_s": tps, "samples_per_s": G / dt, "peak_mem_gib": peak_memory_gib(device),
                "mfu": mfu, "data_position": position, **({"skipped": True} if skipped else {})}
        losses.append(loss_value)
        metrics.log(last)
        if lead and progress and (step % log_every == 0 or step == steps):
            eta = (time.perf_counter() - wall0) / (step - first_step) * (steps - step)
            _say(progress_line(last, steps, device.type == "cpu") + f" | ETA {format_eta(eta)}")

        if save and ((every and step % every == 0) or step == steps):
            rngs = comm.all_gather_object(ckpt.rng_state(), dist.group.WORLD, tag="train.checkpoint.rng")
            err = None
            state = {"format": ckpt.FORMAT, "step": step, "data_position": position,
                     "scheduler": scheduler.state_dict(), "rng": rngs,
                     "layout": {"world": world, "sp_size": groups.sp_size, "dp_size": groups.dp_size,
                                "fsdp": fsdp_mode},
                     "config": OmegaConf.to_container(cfg, resolve=True)}
            p = None
            try:
                if fsdp_plan is not None:                   # sharded: every rank writes its shards
                    p = dcp_checkpoint.save(ckpt_dir, step, model, optimizer, state, keep=keep, lineage=lineage)
                elif lead:
                    state.update(model=model.state_dict(), optimizer=optimizer.state_dict())
                    if _fault_fires(cfg, "disk_full", step, rank, out_dir):
                        state["fault"] = _DiskFull()
                    elif _fault_fires(cfg, "kill_in_write", step, rank, out_dir):
                        state["fault"] = _KillMidWrite()
                    p = ckpt.save_checkpoint(ckpt_dir, step, state, keep=keep, lineage=lineage)
                if lead and (step % log_every == 0 or step == steps):
                    _say(f"checkpoint {p.relative_to(out_dir)}")
            except OSError as e:
                prev = ckpt.find_latest(ckpt_dir) if lead else None
                err = (f"writing the checkpoint of step {step} in {ckpt_dir} failed ({e}); "
                       f"{'the previous checkpoint ' + prev.name + ' is intact' if prev else 'no earlier checkpoint'}"
                       ": free space (or choose another train.out_dir) and rerun with train.resume=auto")
            del state
            err = _agree_error(err, "train.checkpoint")
            if err:
                raise CheckpointWriteError(err)
        if sleep_s > 0:
            time.sleep(sleep_s)

    wall = time.perf_counter() - wall0
    metrics.close()
    table = _summed_ledger(ledger_before)
    if lead:
        import json
        text = longseq.format_table(table, title="ledger of this run, summed over all ranks")
        (out_dir / "ledger.txt").write_text(text + "\n")
        (out_dir / "ledger.json").write_text(json.dumps(
            [{"op": op, "tag": tag, **v} for (op, tag), v in sorted(table.items())], indent=1) + "\n")
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
        raise
    return 0


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
