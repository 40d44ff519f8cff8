"""Progress lines, metrics files and throughput estimates (rank 0 writes; nothing here communicates).

* ``metrics.jsonl`` in the run directory: one JSON object per step (``step``, ``loss``, ``lr``,
  ``grad_norm``, ``step_time_s``, ``tokens_per_s``, ``samples_per_s``, ``peak_mem_gib``, ``mfu``
  (GPU only), ``data_position``), appended and flushed every step. On resume, lines of steps
  after the checkpoint are dropped first, so the file reads as one uninterrupted run.
* TensorBoard event files under ``<out_dir>/tb`` when ``torch.utils.tensorboard`` imports.
* ``progress_line`` formats the line rank 0 prints.
* MFU: ``flops_per_token x tokens/s / (devices x peak)``; the peak is ``train.peak_tflops`` or
  looked up from the GPU's name (dense bf16 tensor-core peaks).
"""
from __future__ import annotations

import json
import math
import os
import resource
import sys
from pathlib import Path
from typing import Optional

import torch

from .manifest import write_atomic

__all__ = ["MetricsWriter", "progress_line", "format_eta", "peak_memory_gib", "peak_tflops", "truncate_metrics", "read_metrics"]

# Dense bf16 peak TFLOP/s by device-name fragment (first match wins).
_PEAKS = (("H200", 989.0), ("H100", 989.0), ("H800", 989.0), ("GH200", 989.0), ("B200", 2250.0),
          ("A100", 312.0), ("A800", 312.0), ("L40S", 362.0), ("A10G", 70.0), ("L4", 121.0),
          ("V100", 125.0), ("4090", 165.0), ("3090", 71.0))


def peak_tflops(device: torch.device, override: Optional[float] = None) -> Optional[float]:
    if override:
        return float(override)
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for frag, peak in _PEAKS:
        if frag in name:
            return peak
    return None


def peak_memory_gib(device: torch.device) -> float:
    """Peak allocated GPU memory, or the process's peak resident set size on the CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss      # KiB on Linux
    return kib / 2**20 if sys.platform != "darwin" else kib / 2**30


def _human_rate(x: float) -> str:
    for unit, div in (("M", 1e6), ("k", 1e3)):
        if x >= div:
            return f"{x / div:.2f}{unit}"
    return f"{x:.1f}"


def progress_line(rec: dict, steps: int, cpu: bool) -> str:
    width = len(str(steps))
    mem = f"{'rss' if cpu else 'mem'} {rec['peak_mem_gib']:.2f} GiB"
    mfu = f" | MFU {100 * rec['mfu']:.1f}%" if rec.get("mfu") is not None else ""
    return (f"step {rec['step']:>{width}}/{steps} | loss {rec['loss']:.5f} | lr {rec['lr']:.2e} | "
            f"gnorm {rec['grad_norm']:.3f} | {_human_rate(rec['tokens_per_s'])} tok/s | "
            f"{1000 * rec['step_time_s']:.0f} ms/step | {mem}{mfu}")


def format_eta(seconds: float) -> str:
    """``1h02m``, ``3m05s`` or ``12s``."""
    s = max(0, int(round(seconds)))
    if s >= 3600:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    return f"{s // 60}m{s % 60:02d}s" if s >= 60 else f"{s}s"


def read_metrics(path) -> list[dict]:
    path = Path(path)
    if not path.exists():
        return []
    out = []
    for line in path.read_text().splitlines():
        line = line.strip()
        if line:
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                pass          # a line torn by a kill
    return out


def truncate_metrics(path, last_step: int) -> None:
    """Keep the records of steps <= ``last_step`` (a resumed run rewrites what follows)."""
    path = Path(path)
    if not path.exists():
        return
    keep = [r for r in read_metrics(path) if int(r.get("step", 0)) <= last_step]
    write_atomic(path, lambda f: f.write("".join(json.dumps(r) + "\n" for r in keep).encode()))


def _open_append(path: Path):
    """Append to ``path``, created if missing, never through a symlink (``O_NOFOLLOW``: a link
    planted in a shared run directory raises instead of redirecting the writes)."""
    try:
        fd = os.open(str(path), os.O_WRONLY | os.O_APPEND | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0), 0o666)
    except OSError as e:
        raise OSError(e.errno, f"cannot open {path} for appending ({e.strerror}; a symlink there is refused): "
                               "remove it or choose another train.out_dir") from None
    return os.fdopen(fd, "a")


class MetricsWriter:
    """JSONL (and TensorBoard) writer for rank 0; a no-op elsewhere."""

    def __init__(self, out_dir, *, enabled: bool, tensorboard: str | bool = "auto"):
        self.enabled = enabled
        self.path = Path(out_dir) / "metrics.jsonl"
        self._f = _open_append(self.path) if enabled else None
        self.tb = None
        if enabled and str(tensorboard).lower() not in ("false", "0", "no", "off"):
            try:
                from torch.utils.tensorboard import SummaryWriter
                self.tb = SummaryWriter(log_dir=str(Path(out_dir) / "tb"))
            except Exception as e:  # noqa: BLE001 - tensorboard not installed
                if str(tensorboard).lower() in ("true", "1", "yes", "on"):
                    print(f"longseq.train: TensorBoard unavailable ({e}); metrics go to {self.path} only",
                          file=sys.stderr)

    def log(self, rec: dict) -> None:
        if not self.enabled:
            return
        clean = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in rec.items()}
        self._f.write(json.dumps(clean) + "\n")
        self._f.flush()
        if self.tb is not None:
            for k, v in rec.items():
                if k != "step" and isinstance(v, (int, float)) and v is not None:
                    self.tb.add_scalar(f"train/{k}", v, rec["step"])

    def close(self) -> None:
        if self._f is not None:
            self._f.close()
            self._f = None
        if self.tb is not None:
            self.tb.close()
            self.tb = None
