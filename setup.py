"""Build tgpq: the Python package, `kernels/` installed as `tgpq.kernels`, and the `tgpq._C` extension.

The CPU part of the extension always builds. CUDA sources in `csrc/cuda/` are added when a CUDA
toolkit and a CUDA build of torch are both present (set TGPQ_NO_CUDA=1 to skip them).
"""
import glob
import os

from setuptools import find_packages, setup

from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension


def _cuda_available() -> bool:
    if os.environ.get("TGPQ_NO_CUDA"):
        return False
    import torch

    return CUDA_HOME is not None and torch.version.cuda is not None


def extension():
    root = os.path.dirname(os.path.abspath(__file__))
    sources = sorted(glob.glob("csrc/torch/*.cpp")) + sorted(glob.glob("csrc/layout/*.cpp")) + sorted(
        glob.glob("csrc/cpu/*.cpp"))
    cxx = ["-O3", "-std=c++17", "-fopenmp"]
    kwargs = dict(include_dirs=[os.path.join(root, "csrc")], extra_link_args=["-fopenmp"])
    if _cuda_available():
        cu = sorted(glob.glob("csrc/cuda/*.cu")) + sorted(glob.glob("csrc/cuda/*_binding.cpp"))
        if cu:
            return CUDAExtension(
                "tgpq._C", sources + cu,
                extra_compile_args={"cxx": cxx + ["-DTGPQ_WITH_CUDA"], "nvcc": ["-O3", "-std=c++17"]},
                **kwargs,
            )
    return CppExtension("tgpq._C", sources, extra_compile_args=cxx, **kwargs)


setup(
    name="tgpq",
    version="0.1.0",
    description="Timestep-aware, gradient-aligned post-training quantization for diffusion models",
    # src layout: from the repository root `import tgpq` finds the installed, compiled package, never the
    # source tree without its extension
    packages=find_packages("src", include=["tgpq", "tgpq.*"]) + ["tgpq.kernels"],
    package_dir={"": "src", "tgpq.kernels": "kernels"},
    package_data={"tgpq": ["assets/*"]},
    python_requires=">=3.10",
    install_requires=[
        "torch>=2.11,<2.14",
        "diffusers>=0.30",
        "safetensors",
        "tqdm",
        "numpy",
        "scipy",
        "Pillow",
        "matplotlib",
    ],
    extras_require={
        "triton": ["triton"],
        "test": ["pytest", "transformers"],  # transformers: the text encoders of the pipeline tests
        "bench": ["openvino", "nncf", "torchao"],
    },
    entry_points={"console_scripts": ["tgpq=tgpq.cli:main"]},
    ext_modules=[extension()],
    cmdclass={"build_ext": BuildExtension},
)
