"""longseq: sequence parallelism for long sequences (DSP and ZeCO) on torch.distributed.

Everything installs under the one namespace ``longseq``, and every module lives where its name
says: ``longseq.dsp`` in ``longseq/dsp/``, ``longseq.zeco`` in ``longseq/zeco/``, the Hydra configs
in ``longseq/configs/`` (package data). The design card's top-level folders ``dsp/``, ``zeco/``,
``models/``, ``benchmarks/`` and ``configs/`` are links into ``longseq/`` (docs/architecture.md), so
an installed wheel, an editable install and a run from the checkout root all import the same tree.

Native kernels in ``csrc/`` are optional: built as ``longseq._kernels_cuda`` only where nvcc and a
CUDA build of torch are importable at install time (``pip install --no-build-isolation -e .``; pip's
default isolated build has no torch, so it skips them); else ``longseq.kernels`` JIT-compiles them on
first use on a CUDA machine, or runs Triton / PyTorch. ``LONGSEQ_BUILD_CUDA=0`` never builds them.
"""
import os
import shutil
from pathlib import Path

from setuptools import find_packages, setup

HERE = Path(__file__).parent

def _cuda_extension() -> dict:
    """``ext_modules`` / ``cmdclass`` for csrc/ when nvcc and a CUDA torch are present, else nothing."""
    if os.environ.get("LONGSEQ_BUILD_CUDA", "1") == "0" or shutil.which("nvcc") is None:
        return {}
    try:
        import torch
        from torch.utils.cpp_extension import BuildExtension, CUDAExtension
    except ImportError:
        return {}
    if torch.version.cuda is None:
        return {}
    flags = ["-O3", "-std=c++20"]
    ext = CUDAExtension("longseq._kernels_cuda", ["csrc/longseq_kernels.cu"], include_dirs=[str(HERE / "csrc")],
                        extra_compile_args={"cxx": flags, "nvcc": flags})
    return {"ext_modules": [ext], "cmdclass": {"build_ext": BuildExtension}}


_EXT = _cuda_extension()

# What people install, one extra per feature (longseq.optional names the extra in its one-line error
# when a feature's package is missing). Without any, longseq trains its own models on CPU or GPU.
_LINUX = "platform_system == 'Linux'"
_TRITON = f"triton>=3.0; {_LINUX}"          # fla's package imports triton, also on CPU
EXTRAS = {
    "diffusers": ["diffusers>=0.30"],                              # longseq.adapters.latte, diffusers_video
    "fla": ["flash-linear-attention>=0.6", _TRITON],               # longseq.adapters.fla_gla, fla_delta
    "transformers": ["transformers>=4.40"],                        # what fla's model classes build on
    # CUDA machines: fast kernels (each optional: longseq falls back to PyTorch without them).
    # flash-attn builds against the installed CUDA torch (pip install --no-build-isolation).
    "gpu": [_TRITON, f"flash-attn>=2.6; {_LINUX} and platform_machine == 'x86_64'"],
    "plot": ["matplotlib"],                                        # python -m longseq.plot
}
# The test suite: the adapters' packages (fla for its PyTorch reference functions too), plots, and
# wheel for the installed-wheel test (pip wheel --no-build-isolation).
EXTRAS["test"] = (["pytest>=8", "pytest-timeout>=2.3", "hypothesis>=6", "wheel", "tqdm"]
                  + EXTRAS["diffusers"] + EXTRAS["fla"] + EXTRAS["transformers"] + EXTRAS["plot"])

setup(
    name="longseq",
    version="0.1.0",
    description="Dynamic Sequence Parallelism and ZeCO All-Scan sequence parallelism for PyTorch",
    long_description=(HERE / "README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["longseq", "longseq.*"]),
    package_data={"longseq": ["configs/*.yaml", "configs/*/*.yaml", "configs/*/*/*.yaml",
                              "benchmarks/results/*.json", "benchmarks/results/*.csv", "benchmarks/*.sh"]},
    cmdclass=_EXT.get("cmdclass", {}),
    ext_modules=_EXT.get("ext_modules", []),
    install_requires=["torch>=2.4", "einops>=0.7", "hydra-core>=1.3", "numpy"],
    extras_require=EXTRAS,
)
