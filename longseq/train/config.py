"""Composing and checking the training config (Hydra), before any process-group work.

``load_config(overrides)`` composes ``configs/config.yaml`` with Hydra's compose API (no
``@hydra.main``: every rank of a torchrun job must agree on the output directory, and Hydra's
timestamped run directories would differ between processes). ``validate(cfg, world_size)`` checks
everything that can be checked without a process group and raises :class:`ConfigError` with a
message that names the fix. ``resolve_parallel`` turns ``parallel.sp_size`` (``null`` = the whole
world) into the SP x DP layout.

Where the configs are found: ``--config-dir`` / ``$LONGSEQ_CONFIG_DIR`` when given, else the
package's own ``longseq/configs`` (the checkout's ``configs/`` is a link to it).
"""
from __future__ import annotations

import dataclasses
import math
import os
import re
from pathlib import Path
from typing import Sequence

from omegaconf import DictConfig, OmegaConf

__all__ = [
    "ConfigError", "CliArgs", "find_config_dir", "load_config", "parse_args", "validate", "ParallelLayout",
    "resolve_parallel", "world_size_from_env", "usage", "check_fields", "check_out_dir", "check_options",
    "check_model_runs", "resume_mismatch", "FAULT_KINDS",
]

FAULT_KINDS = ("exit", "sigkill", "sigstop", "nan", "data", "disk_full", "disk_full_zip", "kill_in_write", "slow_write")

PRECISIONS = ("auto", "bf16", "fp32")
DEVICES = ("auto", "cpu", "cuda")
BACKENDS = ("auto", "gloo", "nccl")
SCHEDULES = ("cosine", "constant")
RESUME_WORDS = ("auto", "strict", "none")
CFG_WORDS = ("job",)                # --cfg [job]: the composed job config (no Hydra runtime config here)
FREE_FORM = ("model.overrides", "parallel.options")   # dicts of keyword arguments: any key is fine
INTEGERS = ("train.steps", "train.global_batch_size", "train.seed", "train.checkpoint_every", "train.keep_checkpoints",
            "train.log_every", "optim.warmup_steps", "data.seed", "data.num_samples")

_USAGE_HEAD = """\
usage: python -m longseq.train [--nproc_per_node N] [options] [key=value ...]
       torchrun --nproc_per_node N [rendezvous flags] -m longseq.train [options] [key=value ...]

Trains a model with sequence parallelism (SP) x data parallelism (DP). Settings are Hydra overrides
of config.yaml in the configs directory, e.g.
  python -m longseq.train --nproc_per_node 4 model=stdit_tiny parallel=dsp parallel.sp_size=2 train.steps=5
  python -m longseq.train model=gla_tiny parallel=none train.steps=10
"""

_USAGE_OPTIONS = """\
options:
  --nproc_per_node N   launch N local processes (torchrun --standalone) after the config is checked
                       here: a config error, a clean stop or Ctrl-C is one line, not torchrun's report
  --cfg [job]          print the composed config and exit (nothing is started)
  --config-dir DIR     read configs from DIR (default: {config_dir})
  --config-name NAME   top-level config file (default: config)
  -h, --help           this help
Documentation: docs/training.md in the longseq source tree."""


def _group_options(d: Path, group: str) -> list[str]:
    return sorted(f.stem for f in (d / group).glob("*.yaml"))


def usage(config_dir: str | None = None) -> str:
    """``python -m longseq.train --help``: the config groups as the configs directory holds them, the
    model families and methods as the registries (``longseq.models``, ``longseq.methods``) hold them."""
    from longseq import methods as method_registry
    from longseq.models.registry import MODEL_FAMILIES

    try:
        d = find_config_dir(config_dir)
    except ConfigError as e:
        return _USAGE_HEAD + f"\n{e}\n\n" + _USAGE_OPTIONS.format(config_dir="the package's longseq/configs")
    by_family: dict[str, list[str]] = {}
    for name in _group_options(d, "model"):
        fam = str(OmegaConf.load(d / "model" / f"{name}.yaml").get("family", "?"))
        by_family.setdefault(fam, []).append(name)
    models = [f"{'|'.join(names)} ({fam}" + ("" if fam in MODEL_FAMILIES else ", not registered") + ")"
              for fam, names in sorted(by_family.items())]
    parallel = []
    for name in _group_options(d, "parallel"):
        method = str(OmegaConf.load(d / "parallel" / f"{name}.yaml").get("method", name))
        fams = method_registry.families_of(method)
        fams = ["any"] if method_registry.ANY_FAMILY in fams else fams
        parallel.append(f"{name} ({', '.join(fams) or 'not registered'})")
    other = [f"{g}={'|'.join(_group_options(d, g))}" for g in ("data", "optim", "train")]
    width = 98

    def wrap(label: str, items: list[str], tail: str = "") -> str:
        lines, line = [], f"  {label:<10}"
        for i, item in enumerate(items):
            piece = item + (", " if i < len(items) - 1 else tail)
            if len(line) + len(piece) > width and line.strip() != label.strip():
                lines.append(line.rstrip())
                line = " " * 12
            line += piece
        return "\n".join(lines + [line.rstrip()])

    body = "\n".join([
        f"config groups (in {d}; the family or families each parallel method is registered for):",
        wrap("model=", models),
        wrap("parallel=", parallel, "   (parallel.sp_size=P)"),
        "  " + "   ".join(other) + "   (data.path=... for latents and tokens)",
        f"methods registered (parallel.method=NAME): {', '.join(method_registry.method_names())}",
        "",
    ])
    return _USAGE_HEAD + "\n" + body + "\n" + _USAGE_OPTIONS.format(config_dir=d)


class ConfigError(ValueError):
    """A setting that cannot work; the message says which and how to fix it."""


@dataclasses.dataclass
class CliArgs:
    overrides: list[str]
    config_dir: str | None = None
    config_name: str = "config"
    print_cfg: bool = False
    help: bool = False
    nproc: int | None = None          # --nproc_per_node: launch that many local workers
    worker_argv: list[str] = dataclasses.field(default_factory=list)   # argv without --nproc_per_node


def parse_args(argv: Sequence[str]) -> CliArgs:
    """Split argv into Hydra overrides and the few options of ``python -m longseq.train``."""
    out = CliArgs(overrides=[])
    argv = list(argv)
    it = iter([a for i, a in enumerate(argv)        # Hydra's `--cfg job` habit: the word is optional
               if not (a in CFG_WORDS and i and argv[i - 1] in ("--cfg", "-c"))])
    for a in it:
        if a in ("-h", "--help"):
            out.help = True
        elif a.split("=", 1)[0] in ("--nproc_per_node", "--nproc-per-node"):
            key, _, val = a.partition("=")
            val = val or next(it, None)
            if val is None or not val.isdigit() or int(val) < 1:
                raise ConfigError(f"{key} needs a number of processes, e.g. {key} 2")
            out.nproc = int(val)
            i = argv.index(a)
            out.worker_argv = argv[:i] + argv[i + (1 if "=" in a else 2):]
        elif a in ("--cfg", "--cfg=job", "-c"):
            out.print_cfg = True
        elif a.startswith("--config-dir") or a.startswith("--config-name") or a in ("-cd", "-cn"):
            key, _, val = a.partition("=")
            if not val:
                val = next(it, None)
                if val is None:
                    raise ConfigError(f"{key} needs a value")
            if key in ("--config-dir", "-cd"):
                out.config_dir = val
            else:
                out.config_name = val
        elif a.startswith("-"):
            raise ConfigError(f"unknown option {a!r}; settings are Hydra overrides (key=value), see --help")
        else:
            out.overrides.append(a)
    return out


def find_config_dir(explicit: str | None = None) -> Path:
    """The directory holding ``config.yaml`` (see the module docstring for the search order)."""
    candidates = []
    if explicit:
        candidates.append(Path(explicit))
    elif os.environ.get("LONGSEQ_CONFIG_DIR"):
        candidates.append(Path(os.environ["LONGSEQ_CONFIG_DIR"]))
    else:
        candidates.append(Path(__file__).resolve().parents[1] / "configs")     # longseq/configs
    for c in candidates:
        if (c / "config.yaml").is_file() or (explicit and c.is_dir()):
            return c.resolve()
    raise ConfigError(
        "cannot find the training configs (config.yaml) in " + ", ".join(str(c) for c in candidates)
        + ": reinstall longseq (its configs are package data), pass --config-dir DIR, or set LONGSEQ_CONFIG_DIR")


def load_config(overrides: Sequence[str] = (), *, config_dir: str | os.PathLike | None = None,
                config_name: str = "config") -> DictConfig:
    """Compose the config with Hydra overrides (``["model=gla_tiny", "train.steps=5"]``)."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    d = find_config_dir(str(config_dir) if config_dir is not None else None)

    def _compose(ovr):
        if GlobalHydra.instance().is_initialized():
            GlobalHydra.instance().clear()
        with initialize_config_dir(config_dir=str(d), version_base="1.3", job_name="longseq_train"):
            return compose(config_name=config_name, overrides=list(ovr))

    # The valid keys: the config with the same group choices and no key=value settings.
    groups = [o for o in overrides if "=" in o and "." not in o.partition("=")[0] and not o.startswith(("+", "~"))]
    try:
        cfg = _compose(overrides)
    except (HydraException, OmegaConfBaseException) as e:
        msg = re.sub(r"\n?To append to your config use \+\S+", "", str(e)).strip()   # not for a typo
        hint = ""
        bad = re.search(r"(?:Could not override|Key) '([^']+)'", msg)
        if bad or "not in struct" in msg:
            near = _closest(bad.group(1), _compose_keys(_compose, groups)) if bad else ""
            hint = (f"\n  (did you mean {near}? " if near else "\n  (a misspelt key? ") + \
                "`--cfg` prints every key)"
        elif "Could not find" in msg or "In 'config'" in msg:
            hint = "\n  (see `python -m longseq.train --help` for the options of each group)"
        raise ConfigError(f"cannot compose the config from {d}: {msg}{hint}") from None
    valid = _compose_keys(_compose, groups)
    unknown = [k for k in _leaf_keys(cfg) if k not in valid and not k.startswith(tuple(f + "." for f in FREE_FORM))]
    if unknown:
        near = _closest(unknown[0], valid)
        raise ConfigError(f"unknown config key {unknown[0]!r}" + (f": did you mean {near}?" if near else "")
                          + " (`--cfg` prints every key; +key=value adds keys only to "
                          + " / ".join(FREE_FORM) + ")")
    return cfg


def _leaf_keys(cfg, prefix: str = "") -> list[str]:
    out = []
    for k in cfg.keys() if isinstance(cfg, DictConfig) else ():
        v = cfg._get_node(k)
        key = f"{prefix}{k}"
        out += _leaf_keys(v, key + ".") if isinstance(v, DictConfig) and len(v) else [key]
    return out


def _compose_keys(compose, groups) -> set:
    try:
        return set(_leaf_keys(compose(groups)))
    except Exception:           # the group choices themselves fail: no suggestion then
        return set()


def _closest(key: str, valid) -> str:
    import difflib
    best = difflib.get_close_matches(key, sorted(valid), n=1, cutoff=0.6)
    return best[0] if best else ""


def world_size_from_env() -> int:
    """The world size torchrun announces (``WORLD_SIZE``), 1 for a plain ``python`` run."""
    try:
        return int(os.environ.get("WORLD_SIZE", "1"))
    except ValueError:
        raise ConfigError(f"WORLD_SIZE={os.environ['WORLD_SIZE']!r} is not an integer") from None


@dataclasses.dataclass(frozen=True)
class ParallelLayout:
    world: int
    sp_size: int
    dp_size: int
    micro_batch: int          # samples per DP group (per rank) per step


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def resolve_parallel(cfg: DictConfig, world: int) -> ParallelLayout:
    """SP and DP sizes from ``parallel.sp_size`` (``null``: the whole world, or 1 for ``none``)."""
    method = cfg.parallel.method
    sp = cfg.parallel.sp_size
    if sp is None or (isinstance(sp, str) and sp.lower() in ("null", "none", "auto", "world")):
        sp = 1 if method == "none" else world
    try:
        sp = int(sp)
    except (TypeError, ValueError):
        raise ConfigError(f"parallel.sp_size={sp!r} is not an integer; pass e.g. parallel.sp_size=2 "
                          "(or parallel.sp_size=null for the whole world)") from None
    if sp < 1:
        raise ConfigError(f"parallel.sp_size={sp} must be at least 1")
    if world % sp != 0:
        raise ConfigError(
            f"parallel.sp_size={sp} does not divide the world size {world} (SP x DP = world): choose "
            f"parallel.sp_size among {_divisors(world)}, or launch a multiple of {sp} processes "
            f"(torchrun --nproc_per_node ... --nnodes ...)")
    if method == "none" and sp != 1:
        raise ConfigError(
            f"parallel=none has no sequence parallelism, so parallel.sp_size must be 1 (got {sp}): pick a "
            "sequence-parallel method (e.g. parallel=dsp for ST-DiT, parallel=zeco for GLA) or drop parallel.sp_size")
    dp = world // sp
    gb = int(cfg.train.global_batch_size)
    if gb < 1 or gb % dp != 0:
        good = [m * dp for m in range(1, 5)]
        raise ConfigError(
            f"train.global_batch_size={gb} is not a positive multiple of the data-parallel size {dp} "
            f"(world {world} / sp_size {sp}): use e.g. train.global_batch_size={good[0]} (or {good[1]}, {good[2]}), "
            "or change parallel.sp_size")
    return ParallelLayout(world=world, sp_size=sp, dp_size=dp, micro_batch=gb // dp)


def _choice(cfg: DictConfig, key: str, allowed: Sequence[str]) -> str:
    val = OmegaConf.select(cfg, key)
    if str(val) not in allowed:
        raise ConfigError(f"{key}={val!r} is not one of {', '.join(allowed)}: pass e.g. {key}={allowed[0]}")
    return str(val)


def _as_int_hint(v) -> str:
    try:
        return str(max(1, round(float(v))))
    except (TypeError, ValueError):
        return "1"


FSDP_MODES = ("none", "full", "dp")
FSDP_PARAM_DTYPES = ("fp32", "bf16")


def check_fsdp_settings(cfg: DictConfig) -> None:
    """``parallel.fsdp``, ``parallel.fsdp_param_dtype`` and ``parallel.mesh_dims`` (see longseq.fsdp)."""
    _choice(cfg, "parallel.fsdp", FSDP_MODES)
    _choice(cfg, "parallel.fsdp_param_dtype", FSDP_PARAM_DTYPES)
    dims = OmegaConf.select(cfg, "parallel.mesh_dims")
    if dims is None or len(dims) != 2 or len({str(d) for d in dims}) != 2:
        raise ConfigError(f"parallel.mesh_dims={dims!r} must name two different dims, the DP one then the SP one: "
                          "e.g. parallel.mesh_dims=[dp,sp] (torchtitan: [dp_shard,cp])")
    if str(cfg.parallel.fsdp) == "none" and str(cfg.parallel.fsdp_param_dtype) != "fp32":
        raise ConfigError("parallel.fsdp_param_dtype=bf16 is FSDP2's mixed precision: set parallel.fsdp=full (or dp), "
                          "or use train.precision=bf16 (autocast) without FSDP")


def validate(cfg: DictConfig, world: int | None = None) -> ParallelLayout:
    """Check the config for a world of ``world`` processes (default: ``$WORLD_SIZE``) without any
    process-group work; raise :class:`ConfigError` naming the fix. Returns the SP x DP layout."""
    from omegaconf.errors import MissingMandatoryValue, OmegaConfBaseException

    from . import data as data_mod
    from . import methods

    world = world_size_from_env() if world is None else int(world)
    missing = sorted(OmegaConf.missing_keys(cfg))                # ??? values
    if missing:
        key = missing[0]
        hint = " (the folder of latents, or the token .bin file)" if key == "data.path" else ""
        raise ConfigError(f"{key} is required but not set: pass {key}=...{hint}")
    try:
        OmegaConf.resolve(cfg)     # interpolations fail here, not mid-run
    except (MissingMandatoryValue, OmegaConfBaseException) as e:
        raise ConfigError(f"the config does not resolve: {e}") from None

    for key in ("model.family", "parallel.method", "data.kind", "train.steps", "train.global_batch_size"):
        if OmegaConf.select(cfg, key) is None:
            raise ConfigError(f"{key} is missing from the config")
    for key in INTEGERS:
        v = OmegaConf.select(cfg, key)
        if v is not None and (isinstance(v, bool) or not isinstance(v, int)):
            raise ConfigError(f"{key}={v!r} must be an integer: pass e.g. {key}={_as_int_hint(v)}")
    steps = int(cfg.train.steps)
    if steps < 1:
        raise ConfigError(f"train.steps={steps} must be at least 1")
    _choice(cfg, "train.precision", PRECISIONS)
    device = _choice(cfg, "train.device", DEVICES)
    _choice(cfg, "train.backend", BACKENDS)
    _choice(cfg, "optim.schedule", SCHEDULES)
    if device == "cuda":
        import torch
        if not torch.cuda.is_available():
            raise ConfigError("train.device=cuda but no CUDA GPU is visible: use train.device=auto (CPU here) "
                              "or run on a GPU machine")
    if int(cfg.train.checkpoint_every) < 0:
        raise ConfigError("train.checkpoint_every must be >= 0 (0: only at the end)")
    resume = cfg.train.resume
    if resume is not None and str(resume) not in RESUME_WORDS and resume is not False:
        if not Path(str(resume)).exists():
            raise ConfigError(f"train.resume={resume!r} is neither auto/strict/none nor an existing checkpoint file: pass "
                              "train.resume=auto (the latest checkpoint in train.out_dir), train.resume=none, or a path")

    check_fields(cfg, world)                                     # every field's type and range

    # The method: registered for the model family, fits the model's sizes.
    spec = methods.get_method(cfg)                               # unknown, or e.g. zeco for an ST-DiT model
    layout = resolve_parallel(cfg, world)
    check_options(spec, cfg)                                     # parallel.options keys and types
    check_model_runs(cfg)                                        # the model's own constraints (meta device)
    methods.check_model(spec, cfg, layout)                       # e.g. heads divisible for Ulysses
    check_fsdp_settings(cfg)
    data_mod.check_data(cfg, layout)                             # missing paths, wrong data for the family
    return layout


# ----------------------------------------------------------------------------------------------
# Every field: types and ranges (before any process group exists)
# ----------------------------------------------------------------------------------------------
def _num(cfg: DictConfig, key: str, *, lo: float | None = None, hi: float | None = None, lo_open: bool = False,
         hi_open: bool = False, integer: bool = False, optional: bool = False, hint: str = "") -> float | None:
    """The number at ``key``, finite, in the range; ConfigError naming the key, the range and an example."""
    v = OmegaConf.select(cfg, key)
    if v is None and optional:
        return None
    rng = ("" if lo is None else f"{'>' if lo_open else '>='} {lo:g}") + \
          ("" if lo is None or hi is None else " and ") + ("" if hi is None else f"{'<' if hi_open else '<='} {hi:g}")
    want = ("an integer" if integer else "a number") + (f" {rng}" if rng else "")
    example = hint or (f"{key}={lo:g}" if lo is not None and not lo_open else f"{key}=1")
    bad = isinstance(v, bool) or not isinstance(v, (int, float)) or (integer and not isinstance(v, int))
    if not bad and isinstance(v, float) and not math.isfinite(v):
        bad = True
    if not bad and ((lo is not None and (v <= lo if lo_open else v < lo)) or
                    (hi is not None and (v >= hi if hi_open else v > hi))):
        bad = True
    if bad:
        raise ConfigError(f"{key}={v!r} must be {want}: pass e.g. {example}")
    return v


def _flag(cfg: DictConfig, key: str) -> None:
    v = OmegaConf.select(cfg, key)
    if v is not None and not isinstance(v, bool):
        raise ConfigError(f"{key}={v!r} must be true or false")


def check_fields(cfg: DictConfig, world: int) -> None:
    """Types and ranges of the train / optim / model.sample / model.objective / data fields
    (docs/training.md, "Bad input"): every value that would crash a worker or train silently wrong."""
    import torch
    t = "train."
    _num(cfg, t + "seed", lo=0, hi=2 ** 63 - 1, integer=True, hint="train.seed=0")
    _num(cfg, t + "keep_checkpoints", lo=0, integer=True, hint="train.keep_checkpoints=2 (0 keeps all)")
    _num(cfg, t + "log_every", lo=1, integer=True)
    _num(cfg, t + "collective_timeout_s", lo=0, lo_open=True, hint="train.collective_timeout_s=600")
    _num(cfg, t + "timeout_s", lo=0, lo_open=True, optional=True, hint="train.timeout_s=600 (or null)")
    _num(cfg, t + "debug_sleep_s", lo=0, optional=True, hint="train.debug_sleep_s=0")
    _num(cfg, t + "peak_tflops", lo=0, lo_open=True, optional=True, hint="train.peak_tflops=989 (or null)")
    for key in ("activation_checkpointing", "save_checkpoints", "progress", "allow_shared_out_dir"):
        _flag(cfg, t + key)
    tb = OmegaConf.select(cfg, t + "tensorboard")
    if not isinstance(tb, bool) and str(tb).lower() not in ("auto", "true", "false"):
        raise ConfigError(f"train.tensorboard={tb!r} is not one of auto, true, false")
    _choice(cfg, t + "on_nonfinite", ("stop", "skip"))
    _choice(cfg, t + "fault_kind", FAULT_KINDS)
    if OmegaConf.select(cfg, t + "fault_at_step") is not None:
        _num(cfg, t + "fault_at_step", lo=1, integer=True)
        _num(cfg, t + "fault_rank", lo=0, hi=world - 1, integer=True, hint=f"train.fault_rank={world - 1}")
    if str(cfg.train.backend) == "nccl":
        dev = str(cfg.train.device)
        if dev == "cpu" or not torch.cuda.is_available():
            why = "train.device=cpu" if dev == "cpu" else "none is visible"
            raise ConfigError(f"train.backend=nccl needs CUDA GPUs, but {why}:"
                              " use train.backend=auto (gloo on the CPU) or train.backend=gloo")
    out = OmegaConf.select(cfg, t + "out_dir")
    if not isinstance(out, str) or not out.strip():
        raise ConfigError(f"train.out_dir={out!r} must be a directory path: pass e.g. train.out_dir=outputs/run1")
    check_out_dir(Path(out).expanduser())

    o = "optim."
    if str(OmegaConf.select(cfg, o + "name")).lower() != "adamw":
        raise ConfigError(f"optim.name={OmegaConf.select(cfg, o + 'name')!r}: only adamw is provided (optim=adamw)")
    _num(cfg, o + "lr", lo=0, hi=1e6, lo_open=True, hint="optim.lr=1e-3")    # AdamW's float32 step overflows far above
    betas = OmegaConf.select(cfg, o + "betas")
    ok = OmegaConf.is_list(betas) and len(betas) == 2 and all(
        isinstance(b, (int, float)) and not isinstance(b, bool) and math.isfinite(b) and 0 <= b < 1 for b in betas)
    if not ok:
        raise ConfigError(f"optim.betas={betas!r} must be two numbers in [0, 1): pass e.g. optim.betas=[0.9,0.999]")
    _num(cfg, o + "eps", lo=0, hint="optim.eps=1e-8")
    _num(cfg, o + "weight_decay", lo=0, hint="optim.weight_decay=0.0")
    _num(cfg, o + "warmup_steps", lo=0, integer=True)
    _num(cfg, o + "min_lr_ratio", lo=0, hi=1, hint="optim.min_lr_ratio=0.1")
    _num(cfg, o + "grad_clip", lo=0, optional=True, hint="optim.grad_clip=1.0 (0: no clipping)")

    for key in ("frames", "height", "width", "caption_tokens", "seq_len"):
        if OmegaConf.select(cfg, "model.sample." + key) is not None:
            _num(cfg, "model.sample." + key, lo=1, integer=True)
    if OmegaConf.select(cfg, "model.objective") is not None:
        _num(cfg, "model.objective.num_timesteps", lo=1, integer=True)
        b0 = _num(cfg, "model.objective.beta_start", lo=0, hi=1, lo_open=True, hi_open=True,
                  hint="model.objective.beta_start=1e-4")
        b1 = _num(cfg, "model.objective.beta_end", lo=0, hi=1, lo_open=True, hi_open=True,
                  hint="model.objective.beta_end=0.02")
        if b1 < b0:
            raise ConfigError(f"model.objective.beta_end={b1:g} is below beta_start={b0:g}: the noise schedule rises")
    _num(cfg, "data.seed", lo=0, hi=2 ** 63 - 1, integer=True, hint="data.seed=1234")
    if OmegaConf.select(cfg, "data.markov_branching") is not None:
        _num(cfg, "data.markov_branching", lo=0, integer=True)
    _flag(cfg, "data.shuffle")
    sp = OmegaConf.select(cfg, "parallel.sp_size")
    if sp is not None and not isinstance(sp, str) and (isinstance(sp, bool) or not isinstance(sp, int)):
        raise ConfigError(f"parallel.sp_size={sp!r} is not an integer: pass e.g. parallel.sp_size=2 "
                          "(or parallel.sp_size=null for the whole world)")


def check_out_dir(out: Path) -> None:
    """The run directory can be created and written: not a file, its nearest existing folder writable."""
    if out.exists() and not out.is_dir():
        raise ConfigError(f"train.out_dir={out} is a file, not a directory: choose another train.out_dir")
    probe = out
    while not probe.exists():
        if probe.parent == probe:
            break
        probe = probe.parent
    if probe.is_dir() and not os.access(probe, os.W_OK | os.X_OK):
        raise ConfigError(f"train.out_dir={out}: {probe} is not writable by this user: choose a directory you can "
                          "write (train.out_dir=...)")
    if probe.exists() and not probe.is_dir():
        raise ConfigError(f"train.out_dir={out}: {probe} is a file: choose another train.out_dir")


def check_options(spec, cfg: DictConfig) -> None:
    """``parallel.options``: every key a keyword of the method's ``parallelize`` (unless it takes
    ``**options``), of the type of its default; positive integers where one is a count."""
    import inspect
    opts = OmegaConf.to_container(cfg.parallel.options, resolve=True) if cfg.parallel.get("options") else {}
    if not opts:
        return
    if not isinstance(opts, dict):
        raise ConfigError(f"parallel.options={opts!r} must be a mapping of keyword arguments")
    try:
        sig = inspect.signature(spec.parallelize)
    except (TypeError, ValueError):
        return
    params = {n: p for n, p in list(sig.parameters.items())[2:] if p.kind != p.VAR_POSITIONAL}
    free = any(p.kind == p.VAR_KEYWORD for p in params.values())
    named = {n: p for n, p in params.items() if p.kind != p.VAR_KEYWORD}
    for key, val in opts.items():
        if key not in named:
            if free:
                continue
            raise ConfigError(f"parallel.options.{key} is not an option of parallel={spec.name}: its options are "
                              f"{', '.join(sorted(named)) or 'none'}")
        default = named[key].default
        if isinstance(default, bool) and not isinstance(val, bool):
            raise ConfigError(f"parallel.options.{key}={val!r} must be true or false")
        if key in POSITIVE_OPTIONS and val is not None and (isinstance(val, bool) or not isinstance(val, int)
                                                            or val < 1):
            raise ConfigError(f"parallel.options.{key}={val!r} must be a positive integer (or null for the default)")
        if isinstance(default, str) and not isinstance(val, str):
            raise ConfigError(f"parallel.options.{key}={val!r} must be a string (default {default!r})")


POSITIVE_OPTIONS = ("num_blocks", "chunk_size", "block_size")


def check_model_runs(cfg: DictConfig) -> None:
    """The model builds and runs one sample, on the meta device (no memory, no compute): catches
    overrides that break it (``num_heads`` not dividing ``hidden_size``, a zero width or depth)."""
    import torch
    from . import methods
    fam = methods.family_of(cfg)
    mc = fam.model_config(cfg.model)
    for k, v in (dataclasses.asdict(mc) if dataclasses.is_dataclass(mc) else {}).items():
        if isinstance(v, (int, float)) and not isinstance(v, bool) and (v < 0 or (v == 0 and _SIZE.search(k))):
            raise ConfigError(f"model={cfg.model.name}: {k}={v!r} must be {'positive' if _SIZE.search(k) else '>= 0'} "
                              f"(model.overrides.{k}=...)")
    try:
        with torch.device("meta"):
            model = fam.build(cfg.model)
            try:
                fam.dry_run(model, cfg)
            except RuntimeError as e:       # an op without a meta kernel says nothing about the sizes
                if not _SHAPE_ERROR.search(str(e)):
                    return
                raise
    except ConfigError:
        raise
    except Exception as e:          # noqa: BLE001 - whatever the model raises for sizes that do not fit
        lines = [ln.strip() for ln in str(e).strip().splitlines() if ln.strip()]
        raise ConfigError(f"model={cfg.model.name} does not run with these settings "
                          f"({dict(OmegaConf.to_container(cfg.model.overrides) or {})}): {type(e).__name__}: "
                          f"{(lines[0] if lines else '')[:200]}; fix model.overrides") from None


_SHAPE_ERROR = re.compile(r"shape|size|dimension|divisible|must match|mat1|expected", re.I)
_SIZE = re.compile(r"(size|dim|depth|heads|layers|channels|ratio|^num_\w+)$")   # fields that are sizes: > 0


def resume_mismatch(old, cfg: DictConfig, name: str) -> str | None:
    """Why a checkpoint written under config ``old`` (a plain dict, or None for an unknown one) cannot
    resume this run, or None: another model (family, preset, overrides: the weights would not fit),
    another global batch or data seed (the data stream would not continue where it stopped)."""
    if not isinstance(old, dict):
        return None
    fix = "start afresh with train.resume=none, or use a new train.out_dir for this run"

    def get(d, key):
        for part in key.split("."):
            d = d.get(part) if isinstance(d, dict) else None
        return d

    new = OmegaConf.to_container(cfg, resolve=True)
    for key in ("model.family", "model.preset", "model.overrides"):
        a, b = get(old, key), get(new, key)
        if key == "model.overrides":
            a, b = a or {}, b or {}
        if a is not None and a != b:
            return (f"{name} was written by another model ({key}={a!r}, this run has {b!r}, "
                    f"model={get(new, 'model.name')}): its weights do not fit; {fix}")
    for key, what in (("train.global_batch_size", "the global batch"), ("data.seed", "the data seed"),
                      ("data.kind", "the data source")):
        a, b = get(old, key), get(new, key)
        if a is not None and a != b:
            return (f"{name} was written with {key}={a!r} but this run has {b!r}: a resume must keep {what} "
                    f"(the data stream continues where it stopped); pass {key}={a!r}, or {fix}")
    return None
