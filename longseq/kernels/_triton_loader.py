"""Whether the Triton backend can run on a device (without importing the kernels module)."""
from __future__ import annotations

import importlib.util
import os
from typing import Optional

import torch


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "on", "yes")


def unavailable_reason(device: torch.device) -> Optional[str]:
    if importlib.util.find_spec("triton") is None:
        return "triton is not installed (pip install triton, or longseq[gpu])"
    if device.type == "cuda":
        return None
    if device.type == "cpu" and _interpreting():
        return None
    return (f"Triton kernels need CUDA tensors (got {device.type}); to run them on the CPU set "
            "TRITON_INTERPRET=1 before starting Python")
