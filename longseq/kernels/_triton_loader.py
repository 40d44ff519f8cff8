"""Whether the Triton backend can run on a device (without importing the kernels module)."""
from __future__ import annotations

import os
from typing import Optional

import torch

from ..optional import missing


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "on", "yes")


def unavailable_reason(device: torch.device) -> Optional[str]:
    why = missing("triton", extra="gpu", what="the Triton kernels")
    if why is not None:
        return why
    if device.type == "cuda":
        return None
    if device.type == "cpu" and _interpreting():
        return None
    return (f"Triton kernels need CUDA tensors (got {device.type}); to run them on the CPU set "
            "TRITON_INTERPRET=1 before starting Python")
