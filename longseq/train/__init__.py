"""``python -m longseq.train``: train a model with sequence x data parallelism from Hydra configs.

Modules: :mod:`.config` (compose and validate), :mod:`.methods` (the adapter to models and
parallel plans), :mod:`.data` (synthetic and file data, deterministic per sample), :mod:`.checkpoint`
(atomic checkpoints and exact resume), :mod:`.metrics` (progress, JSONL, TensorBoard, MFU) and
:mod:`.loop` (the loop and ``main``). See docs/training.md.
"""
from .config import ConfigError, load_config, validate
from .loop import main, train

__all__ = ["main", "train", "load_config", "validate", "ConfigError"]
