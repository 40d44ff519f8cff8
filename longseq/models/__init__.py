"""Models built on longseq. No distributed code here: parallel plans wrap the models' submodules.

The model registry (:mod:`longseq.models.registry`): ``register_model`` adds a family,
``get_model_family(name)`` / ``MODEL_FAMILIES`` look them up (the training entry's ``model.family``).
Names are loaded lazily (PEP 562), so that ``python -m longseq.models.stdit`` runs cleanly.
"""
import importlib

_EXPORTS = {
    "STDiT": "longseq.models.stdit",
    "STDiTBlock": "longseq.models.stdit",
    "STDiTConfig": "longseq.models.stdit",
    "STDIT_PRESETS": "longseq.models.stdit",
    "stdit_config": "longseq.models.stdit",
    "count_parameters": "longseq.models.stdit",
    "init_for_testing": "longseq.models.stdit",
    "ModelFamily": "longseq.models.registry",
    "MODEL_FAMILIES": "longseq.models.registry",
    "register_model": "longseq.models.registry",
    "get_model_family": "longseq.models.registry",
}
__all__ = list(_EXPORTS)


def __getattr__(name):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'longseq.models' has no attribute {name!r}")


def __dir__():
    return sorted(list(globals()) + __all__)
