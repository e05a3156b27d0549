"""Loads the compiled kernels: ``ops._C`` (schemas + CPU) and, when built, ``ops._C_cuda``.

Both are plain shared libraries that register operators with the dispatcher under
``torch.ops.maskrcnn_ops``; they are loaded with ``torch.ops.load_library``, not imported.

Without ``ops._C`` the ops run ``ops.reference`` (pure PyTorch, slow) with one warning. Without
``ops._C_cuda`` they refuse CUDA tensors (:class:`CUDAKernelsNotBuiltError`) rather than run the
reference there: on the GPU it materialises per-sample index tensors (tens of GB for the mask
targets) and walks NMS on the host, which is never what a CUDA run wants.
"""

import importlib.util
import warnings

import torch

__all__ = [
    "HAS_CPU_KERNELS",
    "HAS_CUDA_KERNELS",
    "CUDAKernelsNotBuiltError",
    "use_reference",
]

# How to get the CUDA kernels: setup.py builds them when nvcc is found, FORCE_CUDA=1 insists (and
# fails loudly without a toolkit). `make install` alone re-installs nothing when no source changed.
BUILD_CUDA_HINT = (
    "build them with nvcc on PATH (or CUDA_HOME set): "
    "`FORCE_CUDA=1 pip install --no-build-isolation -e .` in the repository "
    "(or `rm .venv/.installed && FORCE_CUDA=1 make install`)"
)


class CUDAKernelsNotBuiltError(RuntimeError):
    """An op was called on a CUDA tensor but the CUDA kernels (``ops._C_cuda``) are not loaded."""


def _load(module: str) -> None:
    spec = importlib.util.find_spec(f"{__package__}.{module}")
    if spec is None or spec.origin is None:
        raise ImportError(f"{__package__}.{module} is not built")
    torch.ops.load_library(spec.origin)


def _one_line(error: BaseException) -> str:
    return " ".join(str(error).split())


def _load_cpu() -> str | None:
    """Loads ``ops._C``; returns why it could not be loaded, None when it was."""
    try:
        _load("_C")
    except (ImportError, OSError) as error:
        warnings.warn(
            f"ops: the compiled kernels could not be loaded ({error}); falling back to the "
            "pure-PyTorch reference implementation (slow). Build them with "
            "`pip install --no-build-isolation -e .`.",
            RuntimeWarning,
            stacklevel=3,
        )
        return _one_line(error)
    return None


def _load_cuda() -> str | None:
    """Loads ``ops._C_cuda``; returns why it could not be loaded, None when it was.

    Silent either way: a CPU-only build or torch is expected, and a CUDA tensor reaching an op
    without these kernels raises then (``use_reference``), naming this reason.
    """
    try:
        _load("_C_cuda")
    except (ImportError, OSError) as error:
        return _one_line(error)
    return None


_CPU_LOAD_ERROR: str | None = _load_cpu()
# ops._C holds the schemas the CUDA kernels register against: no point loading them without it.
_CUDA_LOAD_ERROR: str | None = _CPU_LOAD_ERROR or _load_cuda()
HAS_CPU_KERNELS: bool = _CPU_LOAD_ERROR is None
HAS_CUDA_KERNELS: bool = _CUDA_LOAD_ERROR is None


def cuda_kernels_missing_message() -> str:
    """The one-line error for a CUDA tensor without CUDA kernels."""
    reason = _CUDA_LOAD_ERROR or "not loaded"
    return (
        f"ops: the CUDA kernels are not built or could not be loaded ({reason}), so the ops do "
        f"not run on CUDA tensors; {BUILD_CUDA_HINT}."
    )


def use_reference(tensor: torch.Tensor) -> bool:
    """Whether calls on ``tensor``'s device go to ``ops.reference`` (no compiled kernel).

    Only on the CPU, when ``ops._C`` is not built. A CUDA tensor without ``ops._C_cuda`` raises
    :class:`CUDAKernelsNotBuiltError`: the reference is unusable at GPU scale.
    """
    if tensor.device.type == "cuda":
        if not HAS_CUDA_KERNELS:
            raise CUDAKernelsNotBuiltError(cuda_kernels_missing_message())
        return False
    return not HAS_CPU_KERNELS
