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
"""
from __future__ import annotations

import contextlib
import math
import os
import sys
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
from .config import USAGE, ConfigError, ParallelLayout, load_config, parse_args, validate
from .metrics import MetricsWriter, format_eta, peak_memory_gib, peak_tflops, progress_line, truncate_metrics

__all__ = ["main", "train", "make_optimizer", "make_scheduler", "lr_factor", "apply_optim_settings",
           "backward_and_sync"]


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


def _maybe_fault(cfg, step: int, rank: int, out_dir: Path) -> None:
    """Fault injection: at ``train.fault_at_step`` rank ``train.fault_rank`` exits once (a marker
    file in the run directory keeps it from firing again after a restart)."""
    at = cfg.train.fault_at_step
    if at is None or int(at) != step or rank != int(cfg.train.fault_rank):
        return
    marker = out_dir / f".fault_fired_step{int(at)}_rank{rank}"
    try:
        fd = os.open(str(marker), os.O_CREAT | os.O_EXCL | os.O_WRONLY)
    except FileExistsError:
        return
    os.write(fd, f"{os.getpid()}\n".encode())
    os.fsync(fd)
    os.close(fd)
    _say(f"fault injection: rank {rank} exits at step {step} (train.fault_at_step={at}; marker {marker.name})")
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(17)


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


# ----------------------------------------------------------------------------------------------
# The run
# ----------------------------------------------------------------------------------------------
def train(cfg: DictConfig, layout: ParallelLayout, *, mesh=None) -> dict:
    """Run the training described by a validated config; returns a small summary (rank 0's view).
    ``mesh``: a ``DeviceMesh`` to take the SP x DP groups from (its dim ``parallel.mesh_dims[1]``
    is SP, the others DP); by default they are built over the world."""
    device = _device(cfg)
    owns_group = not dist.is_initialized()      # a caller's process group (and mesh) is left as it was
    longseq.init_distributed(_backend(cfg, device), timeout_s=float(cfg.train.timeout_s))
    rank, world = dist.get_rank(), dist.get_world_size()
    if world != layout.world:
        raise ConfigError(f"validated for a world of {layout.world} but torch.distributed has {world} ranks")
    groups = _groups(cfg, layout, mesh)
    lead = rank == 0
    out_dir = Path(str(cfg.train.out_dir)).expanduser().resolve()
    ckpt_dir = ckpt.checkpoint_dir(out_dir)
    resume = cfg.train.resume
    resume = "none" if resume in (None, False) else str(resume)

    # Run directory, config, an earlier run's leftovers.
    if lead:
        out_dir.mkdir(parents=True, exist_ok=True)
        if resume == "none":
            _fresh_start_cleanup(out_dir, ckpt_dir)
        (out_dir / "config.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True))
    _barrier("train.setup")

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
        path = None
        if lead:
            path = ckpt.find_latest(ckpt_dir) if resume == "auto" else Path(resume)
            path = str(path) if path is not None else None
        path = comm.all_gather_object(path, dist.group.WORLD, tag="train.resume")[0]
        if path is not None:
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
             f"{device.type} {dist.get_backend()} | precision {precision}"
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
        batch = loader.batch(position)
        optimizer.zero_grad(set_to_none=True)
        with _autocast(precision, device):
            loss = trainable.loss(batch)
        gnorm = backward_and_sync(loss, params, groups, fsdp_plan, clip)
        lr = optimizer.param_groups[0]["lr"]
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
                "mfu": mfu, "data_position": position}
        losses.append(loss_value)
        metrics.log(last)
        if lead and progress and (step % log_every == 0 or step == steps):
            eta = (time.perf_counter() - wall0) / (step - first_step) * (steps - step)
            _say(progress_line(last, steps, device.type == "cpu") + f" | ETA {format_eta(eta)}")
        if not math.isfinite(loss_value):
            raise FloatingPointError(f"the loss is {loss_value} at step {step}: lower optim.lr, or use "
                                     "train.precision=fp32 to see whether bf16 is the cause")

        if save and ((every and step % every == 0) or step == steps):
            rngs = comm.all_gather_object(ckpt.rng_state(), dist.group.WORLD, tag="train.checkpoint.rng")
            state = {"format": ckpt.FORMAT, "step": step, "data_position": position,
                     "scheduler": scheduler.state_dict(), "rng": rngs,
                     "layout": {"world": world, "sp_size": groups.sp_size, "dp_size": groups.dp_size,
                                "fsdp": fsdp_mode},
                     "config": OmegaConf.to_container(cfg, resolve=True)}
            p = None
            if fsdp_plan is not None:                   # sharded: every rank writes its shards
                p = dcp_checkpoint.save(ckpt_dir, step, model, optimizer, state, keep=keep)
            elif lead:
                state.update(model=model.state_dict(), optimizer=optimizer.state_dict())
                p = ckpt.save_checkpoint(ckpt_dir, step, state, keep=keep)
            if lead and (step % log_every == 0 or step == steps):
                _say(f"checkpoint {p.relative_to(out_dir)}")
            _barrier("train.checkpoint")
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
        print(text, flush=True)
    _barrier("train.end")
    if owns_group:
        longseq.launch.destroy()
    return {"step": step, "losses": losses, "last": last, "out_dir": str(out_dir)}


# ----------------------------------------------------------------------------------------------
# Entry point
# ----------------------------------------------------------------------------------------------
def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    lead = _env_rank() == 0
    try:
        args = parse_args(argv)
        if args.help:
            if lead:
                print(USAGE)
            return 0
        cfg = load_config(args.overrides, config_dir=args.config_dir, config_name=args.config_name)
        if args.print_cfg:
            if lead:
                print(OmegaConf.to_yaml(cfg))
            return 0
        layout = validate(cfg)
    except ConfigError as e:
        if lead:
            print(f"longseq.train: config error: {e}", file=sys.stderr, flush=True)
        return 2
    train(cfg, layout)
    return 0
