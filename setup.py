"""Build phased_dmd_mp._C with CMake (see CMakeLists.txt); everything else is in pyproject.toml."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pybind11
from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).parent.resolve()


class CMakeExtension(Extension):
    def __init__(self, name: str):
        super().__init__(name, sources=[])


class CMakeBuild(build_ext):
    def build_extension(self, ext: Extension) -> None:
        cmake = shutil.which("cmake")
        if cmake is None:
            sys.exit("phased_dmd_mp needs CMake >= 3.18 on PATH to build its C++ extension.")
        out_dir = Path(self.get_ext_fullpath(ext.name)).parent.resolve()
        build_dir = Path(self.build_temp).resolve() / ext.name
        build_dir.mkdir(parents=True, exist_ok=True)
        configure = [
            cmake,
            str(ROOT),
            f"-DCMAKE_LIBRARY_OUTPUT_DIRECTORY={out_dir}",
            f"-DPython_EXECUTABLE={sys.executable}",
            f"-Dpybind11_DIR={pybind11.get_cmake_dir()}",
            "-DCMAKE_BUILD_TYPE=Release",
            # AUTO: CUDA kernels wherever nvcc is found; ON: fail without it; OFF: CPU only.
            f"-DPHASED_DMD_CUDA={os.environ.get('PHASED_DMD_CUDA', 'AUTO')}",
        ]
        if "PHASED_DMD_CUDA_ARCHS" in os.environ:  # e.g. "90" to build for Hopper only
            configure.append(f"-DCMAKE_CUDA_ARCHITECTURES={os.environ['PHASED_DMD_CUDA_ARCHS']}")
        subprocess.run(configure, cwd=build_dir, check=True)
        jobs = str(os.cpu_count() or 1)
        subprocess.run([cmake, "--build", ".", "--parallel", jobs], cwd=build_dir, check=True)


setup(ext_modules=[CMakeExtension("phased_dmd_mp._C")], cmdclass={"build_ext": CMakeBuild})
