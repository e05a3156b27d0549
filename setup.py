"""Builds the native kernels of the `ops` package; project metadata lives in pyproject.toml.

* ``ops._C``: the operator schemas and the CPU kernels, always built.
* ``ops._C_cuda``: the CUDA kernels, built when a CUDA toolkit is found (``nvcc`` on PATH, or
  CUDA_HOME / CUDA_PATH set) or when FORCE_CUDA=1; FORCE_CUDA=0 skips it. TORCH_CUDA_ARCH_LIST
  defaults to "8.0;9.0".

Install with ``pip install --no-build-isolation -e .`` once torch is installed (the build imports
it). MAX_JOBS bounds the parallel compile jobs.
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


# torch.utils.cpp_extension reads CUDA_HOME when it is imported, so settle it first.
if not (os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")):
    _home = _cuda_home_from_nvcc()
    if _home:
        os.environ["CUDA_HOME"] = _home
os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0")

from setuptools import setup  # noqa: E402
from torch.utils.cpp_extension import (  # noqa: E402
    CUDA_HOME,
    BuildExtension,
    CppExtension,
    CUDAExtension,
)

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
    force = os.environ.get("FORCE_CUDA", "")
    if force in ("0", "1"):  # 1: build even without a toolkit check; 0: CPU only
        return force == "1"
    return CUDA_HOME is not None and os.path.exists(os.path.join(CUDA_HOME, "bin", "nvcc"))


def _extensions() -> list:
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


setup(
    ext_modules=_extensions(),
    cmdclass={"build_ext": BuildExtension},
)
