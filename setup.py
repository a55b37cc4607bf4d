"""Builds fastig and its compiled op library fastig._C against the torch that is already installed.

Install with ``pip install --no-build-isolation ...`` so that the build sees that torch (an isolated build
environment would download another one). The CPU kernels are always built; the CUDA kernels only when the
installed torch has CUDA and nvcc is found. If the extension cannot be built, fastig installs without it and runs
its pure-torch reference ops (it says so once at import). FASTIG_BUILD_EXT=0 skips the build on purpose.
"""

import glob
import os
import sys

from setuptools import find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def read_version():
    with open(os.path.join(ROOT, "fastig", "__init__.py")) as f:
        for line in f:
            if line.startswith("__version__"):
                return line.split("=")[1].strip().strip('"')
    raise RuntimeError("no __version__ in fastig/__init__.py")


def read_requirements(name):
    with open(os.path.join(ROOT, name)) as f:
        return [line.strip() for line in f if line.strip() and not line.startswith("#")]


def extension_setup():
    """(ext_modules, cmdclass) for fastig._C, or empty ones when it cannot or should not be built."""
    if os.environ.get("FASTIG_BUILD_EXT", "1") == "0":
        return [], {}
    try:
        import torch
        from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension
    except ImportError:
        print("fastig: torch is not importable in the build environment; building without fastig._C "
              "(install torch first and use pip's --no-build-isolation)", file=sys.stderr)
        return [], {}

    sources = ["csrc/fastig.cpp"] + sorted(glob.glob("csrc/cpu/*.cpp"))
    cxx_flags = ["-O3", "-std=c++17"]
    with_cuda = torch.version.cuda is not None and CUDA_HOME is not None and os.environ.get("FASTIG_CUDA", "1") != "0"
    if with_cuda:
        sources += sorted(glob.glob("csrc/cuda/*.cu")) + ["csrc/cuda_bindings.cpp"]
        ext = CUDAExtension(
            "fastig._C",
            sources,
            include_dirs=[os.path.join(ROOT, "csrc")],
            define_macros=[("FASTIG_WITH_CUDA", None)],
            extra_compile_args={"cxx": cxx_flags, "nvcc": ["-O3", "-std=c++17"]},
        )
    else:
        ext = CppExtension(
            "fastig._C", sources, include_dirs=[os.path.join(ROOT, "csrc")], extra_compile_args={"cxx": cxx_flags}
        )

    class TolerantBuildExtension(BuildExtension):
        """A failed compile leaves fastig without fastig._C instead of failing the install."""

        failed = set()

        def build_extension(self, extension):
            try:
                super().build_extension(extension)
            except Exception as exc:  # compiler missing or broken: the pure-torch ops still work
                self.failed.add(extension.name)
                print(f"fastig: building {extension.name} failed ({exc}); fastig will use its pure-torch ops",
                      file=sys.stderr)

        def copy_extensions_to_source(self):  # editable installs copy the built library next to the sources
            built = [e for e in self.extensions if e.name not in self.failed]
            self.extensions, everything = built, self.extensions
            try:
                super().copy_extensions_to_source()
            finally:
                self.extensions = everything

    return [ext], {"build_ext": TolerantBuildExtension.with_options(use_ninja=False)}


ext_modules, cmdclass = extension_setup()

setup(
    name="fastig",
    version=read_version(),
    description="Fast Integrated-Gradients-family attributions for PyTorch image models",
    long_description=open(os.path.join(ROOT, "README.md")).read(),
    long_description_content_type="text/markdown",
    packages=find_packages(include=["fastig", "fastig.*"]),
    python_requires=">=3.10",
    install_requires=["torch>=2.1", "numpy", "scipy", "opencv-python-headless", "h5py", "click>=8"],
    extras_require={"test": read_requirements("requirements-test.txt")},
    entry_points={"console_scripts": ["fastig=fastig.cli:main"]},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
