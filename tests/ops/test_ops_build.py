"""setup.py's build defaults, read without building: the CUDA architectures compiled for."""

import importlib.util
import re
import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def setup_py():
    spec = importlib.util.spec_from_file_location("maskrcnn_setup", REPO / "setup.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # not __main__: defines the helpers, builds nothing
    return module


def archs(arch_list: str) -> list[str]:
    return [entry.removesuffix("+PTX") for entry in arch_list.split(";")]


@pytest.mark.parametrize("cuda_version", ["13.0", "12.8", "12.4", "11.8", None])
def test_default_arch_list_ends_with_ptx(setup_py, cuda_version):
    """A GPU newer than the newest SASS (Blackwell) runs the JIT-compiled PTX instead of failing
    with "no kernel image is available" at the first pooler call."""
    arch_list = setup_py.default_cuda_arch_list(cuda_version)
    assert arch_list.endswith("+PTX"), arch_list
    assert arch_list.count("+PTX") == 1, arch_list  # the newest arch's PTX serves every newer GPU
    versions = [tuple(map(int, arch.split("."))) for arch in archs(arch_list)]
    assert versions == sorted(versions), arch_list
    assert {"7.5", "8.0", "9.0"} <= set(archs(arch_list)), arch_list  # T4, A100, H100


def test_volta_only_before_cuda_13(setup_py):
    """CUDA 13 dropped sm_70: asking nvcc 13 for it fails the build. Before 13, V100s get SASS."""
    assert "7.0" in archs(setup_py.default_cuda_arch_list("12.8"))
    assert "7.0" not in archs(setup_py.default_cuda_arch_list("13.0"))


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="needs nvcc")
def test_default_arch_list_is_accepted_by_nvcc(setup_py):
    version = subprocess.run(["nvcc", "--version"], capture_output=True, text=True, check=True)
    release = re.search(r"release (\d+\.\d+)", version.stdout).group(1)
    listed = subprocess.run(["nvcc", "--list-gpu-arch"], capture_output=True, text=True)
    if listed.returncode != 0:
        pytest.skip("this nvcc has no --list-gpu-arch")
    supported = set(re.findall(r"compute_(\d+)", listed.stdout))
    for arch in archs(setup_py.default_cuda_arch_list(release)):
        assert arch.replace(".", "") in supported, (arch, release, sorted(supported))
