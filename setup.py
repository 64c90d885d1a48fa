"""Build script: setuptools drives CMake, which builds the pybind11 module ``spiral_rt._C``.

The top-level ``kernels/`` folder (Triton kernels) installs as the subpackage
``spiral_rt.kernels``. Environment knobs:

  SPIRAL_RT_CUDA=0           build the module without CUDA even when nvcc is found
  SPIRAL_RT_CUDA_ARCHS=...   gencode list, default "90a;80" (sm_90a, sm_80 and compute_80 PTX)
  SPIRAL_RT_BUILD_TYPE=...   CMake build type, default Release
  CMAKE_ARGS=...             extra arguments passed to CMake
"""

import os
import shutil
import subprocess
import sys
from pathlib import Path

from setuptools import Extension, find_packages, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).parent.resolve()


class CMakeExtension(Extension):
    """An extension whose sources CMake compiles; setuptools only places the result."""

    def __init__(self, name: str, source_dir: Path = ROOT) -> None:
        super().__init__(name, sources=[])
        self.source_dir = Path(source_dir).resolve()


class CMakeBuild(build_ext):
    def build_extension(self, ext: CMakeExtension) -> None:
        cmake = shutil.which("cmake")
        if cmake is None:
            raise RuntimeError("spiral_rt needs CMake >= 3.24 to build its native module (pip install cmake)")
        out_dir = Path(self.get_ext_fullpath(ext.name)).parent.resolve()
        build_temp = Path(self.build_temp).resolve() / ext.name
        build_temp.mkdir(parents=True, exist_ok=True)

        import pybind11  # build requirement (pyproject.toml)

        args = [
            f"-DCMAKE_LIBRARY_OUTPUT_DIRECTORY={out_dir}{os.sep}",
            f"-DPython_EXECUTABLE={sys.executable}",
            f"-Dpybind11_DIR={pybind11.get_cmake_dir()}",
            f"-DCMAKE_BUILD_TYPE={os.environ.get('SPIRAL_RT_BUILD_TYPE', 'Release')}",
            f"-DSPIRAL_RT_CUDA={'OFF' if os.environ.get('SPIRAL_RT_CUDA', '1') == '0' else 'ON'}",
            f"-DSPIRAL_RT_CUDA_ARCHS={os.environ.get('SPIRAL_RT_CUDA_ARCHS', '90a;80')}",
        ]
        if shutil.which("ninja"):
            args.append("-GNinja")
        args += [a for a in os.environ.get("CMAKE_ARGS", "").split() if a]
        jobs = os.environ.get("CMAKE_BUILD_PARALLEL_LEVEL", str(os.cpu_count() or 2))
        subprocess.run([cmake, str(ext.source_dir), *args], cwd=build_temp, check=True)
        subprocess.run([cmake, "--build", ".", "--parallel", jobs], cwd=build_temp, check=True)


setup(
    # Every subpackage of spiral_rt/ plus kernels/ mapped to spiral_rt.kernels.
    packages=["spiral_rt", *[f"spiral_rt.{p}" for p in find_packages("spiral_rt")], "spiral_rt.kernels"],
    package_dir={"spiral_rt": "spiral_rt", "spiral_rt.kernels": "kernels"},
    package_data={"spiral_rt.world": ["goals.json"], "spiral_rt.world.model": ["weights/*.safetensors"]},
    ext_modules=[CMakeExtension("spiral_rt._C")],
    cmdclass={"build_ext": CMakeBuild},
    zip_safe=False,
)
