"""Loads the compiled kernels: ``ops._C`` (schemas + CPU) and, when built, ``ops._C_cuda``.

Both are plain shared libraries that register operators with the dispatcher under
``torch.ops.maskrcnn_ops``; they are loaded with ``torch.ops.load_library``, not imported.
"""

import importlib.util
import warnings

import torch

__all__ = ["HAS_CPU_KERNELS", "HAS_CUDA_KERNELS", "use_reference"]


def _load(module: str) -> None:
    spec = importlib.util.find_spec(f"{__package__}.{module}")
    if spec is None or spec.origin is None:
        raise ImportError(f"{__package__}.{module} is not built")
    torch.ops.load_library(spec.origin)


def _load_cpu() -> bool:
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
        return False
    return True


def _load_cuda() -> bool:
    try:
        _load("_C_cuda")
    except (ImportError, OSError) as error:
        # A CPU-only build, or a CPU-only torch / machine without the CUDA libraries: that is
        # expected and silent. Only a machine with a usable GPU deserves to hear about it.
        if torch.cuda.is_available():
            warnings.warn(
                f"ops: the CUDA kernels could not be loaded ({error}); CUDA tensors use the "
                "pure-PyTorch reference implementation (slow).",
                RuntimeWarning,
                stacklevel=3,
            )
        return False
    return True


HAS_CPU_KERNELS: bool = _load_cpu()
HAS_CUDA_KERNELS: bool = HAS_CPU_KERNELS and _load_cuda()


def use_reference(tensor: torch.Tensor) -> bool:
    """Whether calls on ``tensor``'s device must go to ``ops.reference`` (no compiled kernel)."""
    if tensor.device.type == "cuda":
        return not HAS_CUDA_KERNELS
    return not HAS_CPU_KERNELS
