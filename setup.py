"""Builds the native kernels of the `ops` package; project metadata lives in pyproject.toml.

* ``ops._C``: the operator schemas and the CPU kernels, always built.
* ``ops._C_cuda``: the CUDA kernels, built when a CUDA toolkit is found (``nvcc`` on PATH, or
  CUDA_HOME / CUDA_PATH set) or when FORCE_CUDA=1; FORCE_CUDA=0 skips it. TORCH_CUDA_ARCH_LIST
  defaults to :func:`default_cuda_arch_list` ("7.5;8.0;9.0+PTX" with CUDA 13).

Install with ``pip install --no-build-isolation -e .`` once torch is installed (the build imports
it). MAX_JOBS bounds the parallel compile jobs. Importing this file builds nothing (the tests read
its defaults); setuptools runs it as ``__main__``.
"""

import glob
import os
import re
import shutil
import subprocess


def _cuda_home_from_nvcc() -> str | None:
    """The toolkit root of the nvcc on PATH, asked from nvcc itself.

    torch guesses CUDA_HOME as the parent of nvcc's directory, which is wrong when nvcc on PATH is a
    wrapper (e.g. /usr/local/bin/nvcc exec'ing /usr/local/cuda-13.0/bin/nvcc): the headers and
    libraries would then be looked for under /usr/local. nvcc's dry run names its real directory.
    """
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        return None
    try:
        dry_run = subprocess.run(
            [nvcc, "--dryrun", "-x", "cu", "-c", os.devnull, "-o", os.devnull],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    match = re.search(r"^#\$ _HERE_=(.+)$", dry_run.stdout + dry_run.stderr, re.MULTILINE)
    return os.path.dirname(match.group(1).strip()) if match else None


def default_cuda_arch_list(cuda_version: str | None) -> str:
    """TORCH_CUDA_ARCH_LIST when it is not set, for the CUDA version torch was built with.

    Machine code (SASS) for 7.5 (T4), 8.0 (A100; the same cubin runs on 8.6 and 8.9: A10, L4,
    RTX 30xx/40xx) and 9.0 (H100, H200), plus 7.0 (V100) below CUDA 13, which dropped Volta (and
    Maxwell, Pascal): no CUDA 13 build can serve a V100. "+PTX" also embeds 9.0's PTX, which the
    driver compiles at first load for any newer GPU (Blackwell's 10.x and 12.x), so no supported
    GPU meets "no kernel image is available". The list stays short because each entry compiles
    every kernel once more; set TORCH_CUDA_ARCH_LIST (e.g. "10.0;12.0") for SASS of other GPUs.
    """
    major = int(cuda_version.split(".")[0]) if cuda_version else None
    archs = ["7.5", "8.0", "9.0"]
    if major is not None and major < 13:
        archs.insert(0, "7.0")
    return ";".join(archs) + "+PTX"


CSRC = os.path.join("ops", "csrc")
# -g0: no debug info (Python's default CFLAGS add -g; it triples the objects' size and build time).
# -ffp-contract=off: no fused multiply-adds, so results do not depend on the target's FMA support
# and bilinear RoIAlign stays bit-identical to torchvision's CPU kernel. -fopenmp: at::parallel_for
# is an OpenMP region compiled into the caller, so without it the kernels would run on one thread.
CXX_FLAGS = ["-O3", "-g0", "-ffp-contract=off", "-fopenmp"]
NVCC_FLAGS = ["-O3", "--expt-relaxed-constexpr"]


def _nvidia_wheel_include_dirs() -> list[str]:
    """Header dirs of the CUDA libraries torch was built against (cusparse.h, cublas.h, ...).

    torch's CUDA headers include them; pip-installed torch ships them in the `nvidia` namespace
    package (nvidia/cu13/include for CUDA 13) rather than in the toolkit nvcc comes from.
    """
    try:
        import nvidia
    except ImportError:
        return []
    found = []
    for root in nvidia.__path__:
        for include in sorted(glob.glob(os.path.join(root, "*", "include"))):
            if os.path.exists(os.path.join(include, "cusparse.h")):
                found.append(include)
    return found


def _want_cuda() -> bool:
    from torch.utils.cpp_extension import CUDA_HOME

    force = os.environ.get("FORCE_CUDA", "")
    if force in ("0", "1"):  # 1: build even without a toolkit check; 0: CPU only
        return force == "1"
    return CUDA_HOME is not None and os.path.exists(os.path.join(CUDA_HOME, "bin", "nvcc"))


def _extensions() -> list:
    from torch.utils.cpp_extension import CppExtension, CUDAExtension

    include_dirs = [os.path.abspath(CSRC)]
    extensions = [
        CppExtension(
            "ops._C",
            sorted(glob.glob(os.path.join(CSRC, "*.cpp"))),
            include_dirs=include_dirs,
            extra_compile_args={"cxx": CXX_FLAGS},
            extra_link_args=["-fopenmp"],
            py_limited_api=True,
        )
    ]
    if _want_cuda():
        cuda_ext = CUDAExtension(
            "ops._C_cuda",
            sorted(glob.glob(os.path.join(CSRC, "*.cu"))),
            include_dirs=list(include_dirs),
            extra_compile_args={"cxx": ["-O3"], "nvcc": NVCC_FLAGS},
            py_limited_api=True,
        )
        # Last, after the toolkit's own include dir that CUDAExtension added.
        cuda_ext.include_dirs.extend(_nvidia_wheel_include_dirs())
        extensions.append(cuda_ext)
    return extensions


def main() -> None:
    # torch.utils.cpp_extension reads CUDA_HOME when it is imported, so settle it first.
    if not (os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")):
        home = _cuda_home_from_nvcc()
        if home:
            os.environ["CUDA_HOME"] = home
    import torch

    # torch's CUDA version: nvcc's major must match it (torch.utils.cpp_extension checks).
    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", default_cuda_arch_list(torch.version.cuda))

    from setuptools import setup
    from torch.utils.cpp_extension import BuildExtension

    setup(ext_modules=_extensions(), cmdclass={"build_ext": BuildExtension})


if __name__ == "__main__":
    main()
