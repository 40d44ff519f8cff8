"""longseq: sequence parallelism for long sequences (DSP and ZeCO) on torch.distributed.

Everything installs under the one namespace ``longseq``; the repository keeps the design card's
top-level folders and ``package_dir`` maps each into the namespace:

    longseq/             -> longseq              (runtime, baselines in longseq.sp, training entry)
    dsp/                 -> longseq.dsp          (Dynamic Sequence Parallelism)
    zeco/                -> longseq.zeco         (ZeCO, All-Scan)
    models/              -> longseq.models       (ST-DiT, GLA)
    models/adapters/     -> longseq.adapters     (diffusers' Latte, fla's models)
    benchmarks/          -> longseq.benchmarks   (python -m longseq.benchmarks.<name>)
    configs/             -> longseq/configs      (Hydra configs, package data)

Native kernels in ``csrc/`` are optional: built as ``longseq._kernels_cuda`` only where nvcc and a
CUDA build of torch are importable at install time (``pip install --no-build-isolation -e .``; pip's
default isolated build has no torch, so it skips them); else ``longseq.kernels`` JIT-compiles them on
first use on a CUDA machine, or runs Triton / PyTorch. ``LONGSEQ_BUILD_CUDA=0`` never builds them.
"""
import os
import shutil
from pathlib import Path

from setuptools import find_packages, setup
from setuptools.command.build_py import build_py

HERE = Path(__file__).parent

# Installed name -> folder in the repository.
MAPPED = {
    "longseq.dsp": "dsp",
    "longseq.zeco": "zeco",
    "longseq.models": "models",
    "longseq.adapters": "models/adapters",
    "longseq.benchmarks": "benchmarks",
}


def _packages() -> list[str]:
    """Every package of the namespace; a folder mapped under two names (models/adapters) only once."""
    packages = find_packages(include=["longseq", "longseq.*"])
    for name, folder in MAPPED.items():
        nested = [f for f in MAPPED.values() if f.startswith(folder + "/")]
        packages.append(name)
        packages += [f"{name}.{sub}" for sub in find_packages(folder)
                     if not any((folder + "/" + sub.replace(".", "/") + "/").startswith(n + "/") for n in nested)]
    return sorted(packages)


class BuildPyWithConfigs(build_py):
    """Ship the Hydra configs inside the package (``longseq/configs``) in a regular install; an
    editable install reads ``configs/`` at the repository root."""

    def run(self):
        super().run()
        shutil.copytree(HERE / "configs", Path(self.build_lib) / "longseq" / "configs", dirs_exist_ok=True)


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

setup(
    name="longseq",
    version="0.1.0",
    description="Dynamic Sequence Parallelism and ZeCO All-Scan sequence parallelism for PyTorch",
    long_description=(HERE / "README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=_packages(),
    package_dir=MAPPED,
    package_data={"longseq.benchmarks": ["results/*.json", "results/*.csv", "*.sh"]},
    cmdclass={"build_py": BuildPyWithConfigs, **_EXT.get("cmdclass", {})},
    ext_modules=_EXT.get("ext_modules", []),
    install_requires=["torch>=2.4", "einops>=0.7", "hydra-core>=1.3"],
    extras_require={
        # GPU machines: fast kernels, each optional (longseq falls back to pure PyTorch without them).
        "gpu": ["triton>=3.0", "flash-attn>=2.6", "xformers>=0.0.27", "flash-linear-attention>=0.6"],
        # Tests: fla for its pure-PyTorch reference functions (its package imports triton, whose
        # kernels never run on CPU); diffusers for the Latte adapter; matplotlib for plots; wheel for
        # the installed-wheel test (pip wheel --no-build-isolation).
        "test": ["pytest>=8", "pytest-timeout>=2.3", "wheel", "hypothesis>=6", "numpy", "triton>=3.0",
                 "flash-linear-attention>=0.6", "matplotlib", "diffusers>=0.30", "tqdm"],
    },
)
