"""Optional dependencies: one helper, one message, one line.

longseq needs only torch, einops, hydra-core and numpy. Everything else is optional and installed
through an extra of the package (``setup.py``); a feature that needs a missing one raises
:class:`MissingDependency` whose message is one line naming the feature and the install command::

    longseq.optional.require("fla", extra="fla", what="fla_gla.build (fla's GLA models)")
    # MissingDependency: fla_gla.build (fla's GLA models) needs flash-linear-attention, which is not
    # installed: pip install 'longseq[fla]'

The extras: ``[diffusers]`` (the Latte / diffusers video adapters), ``[fla]`` (fla's models and
kernels), ``[transformers]`` (fla's model classes build on it), ``[gpu]`` (triton, flash-attn and
xformers, on CUDA machines), ``[plot]`` (matplotlib for ``python -m longseq.plot``), ``[test]``
(the test suite). An environment problem that is not a missing package (a kernel backend asked for
on a device it cannot run on) is a :class:`SetupError`; entries print either as one line.
"""
from __future__ import annotations

import importlib
import importlib.util
from types import ModuleType
from typing import Optional

__all__ = ["SetupError", "MissingDependency", "require", "missing", "PIP_NAMES", "EXTRAS"]

#: import name -> the pip distribution that provides it
PIP_NAMES = {"fla": "flash-linear-attention", "diffusers": "diffusers", "transformers": "transformers",
             "triton": "triton", "flash_attn": "flash-attn", "xformers": "xformers", "matplotlib": "matplotlib"}

#: import name -> the longseq extra that installs it
EXTRAS = {"fla": "fla", "diffusers": "diffusers", "transformers": "transformers", "triton": "gpu",
          "flash_attn": "gpu", "xformers": "gpu", "matplotlib": "plot"}


class SetupError(RuntimeError):
    """The environment, not the model, the plan or the config, stops this feature; the message is
    one line naming the fix. Entries print it without a traceback."""


class MissingDependency(SetupError, ImportError):
    """An optional package is not installed (``pip install 'longseq[EXTRA]'``)."""


def _message(module: str, extra: Optional[str], what: str, absent: Optional[str] = None) -> str:
    top = module.split(".")[0]
    extra = extra or EXTRAS.get(top)
    fix = f"pip install 'longseq[{extra}]'" if extra else f"pip install {PIP_NAMES.get(top, top)}"
    gone = (absent or top).split(".")[0]
    via = f" (imported by {PIP_NAMES.get(top, top)})" if gone != top else ""
    return f"{what} needs {PIP_NAMES.get(gone, gone)}{via}, which is not installed: {fix}"


def missing(module: str, *, extra: Optional[str] = None, what: str) -> Optional[str]:
    """None if ``module``'s top-level package is installed (found on the path, not imported: no
    import side effects), else the one-line message :func:`require` would raise."""
    try:
        found = importlib.util.find_spec(module.split(".")[0]) is not None
    except (ImportError, ValueError):       # a parent package missing, or a None entry in sys.modules
        found = False
    return None if found else _message(module, extra, what)


def require(module: str, *, extra: Optional[str] = None, what: str) -> ModuleType:
    """Import ``module`` (e.g. ``"fla.models"``) for ``what`` (the feature, as the user named it);
    raise :class:`MissingDependency` (one line, the extra to install) when it cannot be imported.
    ``extra`` defaults to the one :data:`EXTRAS` names for the top-level package."""
    try:
        return importlib.import_module(module)
    except ImportError as e:
        top, gone = module.split(".")[0], str(getattr(e, "name", None) or module).split(".")[0]
        if gone != top and gone not in PIP_NAMES:
            raise           # the package is there but an import of its own failed: show that error
        raise MissingDependency(_message(module, extra, what, gone)) from None
