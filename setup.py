"""longseq: sequence parallelism for long sequences (DSP and ZeCO) on torch.distributed.

Installs the packages ``longseq``, ``dsp`` and ``zeco``. ``models/``, ``benchmarks/`` and
``examples/`` are run from the checkout (``python -m models.stdit``, ``python -m benchmarks...``).
Native kernels in ``csrc/`` are optional and only built where CUDA is present.
"""
import shutil
from pathlib import Path

from setuptools import find_packages, setup
from setuptools.command.build_py import build_py


class BuildPyWithConfigs(build_py):
    """Ship the Hydra configs inside the package (``longseq/configs``) in a regular install; an
    editable install or a run from the checkout reads ``configs/`` at the repository root."""

    def run(self):
        super().run()
        shutil.copytree(Path(__file__).parent / "configs", Path(self.build_lib) / "longseq" / "configs",
                        dirs_exist_ok=True)


setup(
    name="longseq",
    version="0.1.0",
    description="Dynamic Sequence Parallelism and ZeCO All-Scan sequence parallelism for PyTorch",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["longseq", "longseq.*", "dsp", "dsp.*", "zeco", "zeco.*"]),
    cmdclass={"build_py": BuildPyWithConfigs},
    install_requires=["torch>=2.4", "einops>=0.7", "hydra-core>=1.3"],
    extras_require={
        # GPU machines: fast kernels, each optional (longseq falls back to pure PyTorch without them).
        "gpu": ["triton>=3.0", "flash-attn>=2.6", "xformers>=0.0.27", "flash-linear-attention>=0.6"],
        # Tests: fla for its pure-PyTorch reference functions (its package imports triton, whose
        # kernels never run on CPU); diffusers for the Latte adapter; matplotlib for benchmark plots.
        "test": ["pytest>=8", "pytest-timeout>=2.3", "hypothesis>=6", "numpy", "triton>=3.0",
                 "flash-linear-attention>=0.6", "matplotlib", "diffusers>=0.30"],
    },
)
