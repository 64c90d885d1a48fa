"""The native module: it builds and imports on any machine, with CUDA kernels when nvcc exists."""

import shutil

import pytest


def test_native_module_imports_and_reports_its_build():
    from spiral_rt import _C

    info = _C.build_info()
    assert set(info) >= {"cuda", "cuda_version", "cuda_archs"}
    assert hasattr(_C, "philox4x32") and hasattr(_C, "philox_normals")
    assert hasattr(_C, "sampler_step") == info["cuda"]


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="no nvcc: the module is CPU-only by design")
def test_cuda_kernels_compiled_when_nvcc_is_present():
    from spiral_rt import _C

    info = _C.build_info()
    assert info["cuda"], "nvcc is on PATH but spiral_rt._C was built without CUDA"
    assert info["cuda_archs"].split(",")[0] == "sm_90a"
    assert "compute_80" in info["cuda_archs"]


def test_cli_info_reports_backends(capsys):
    from spiral_rt.cli import main

    assert main(["info"]) == 0
    out = capsys.readouterr().out
    assert "spiral_rt" in out and "sampler_step" in out
