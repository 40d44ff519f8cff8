"""Models built on longseq. No distributed code here: parallel plans wrap the models' submodules.

Names are loaded lazily (PEP 562), so that ``python -m models.stdit`` runs cleanly.
"""
import importlib

_EXPORTS = {
    "STDiT": "models.stdit",
    "STDiTBlock": "models.stdit",
    "STDiTConfig": "models.stdit",
    "STDIT_PRESETS": "models.stdit",
    "stdit_config": "models.stdit",
    "count_parameters": "models.stdit",
    "init_for_testing": "models.stdit",
}
__all__ = list(_EXPORTS)


def __getattr__(name):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'models' has no attribute {name!r}")


def __dir__():
    return sorted(list(globals()) + __all__)
