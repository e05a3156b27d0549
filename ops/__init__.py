"""Native detection ops for the Mask R-CNN pipeline: RoIAlign, the FPN pooler, NMS.

Box convention, for every op here: boxes are (x1, y1, x2, y2) in absolute image pixels, without
the legacy "+1" on widths; a RoI row is (batch_index, x1, y1, x2, y2). RoIAlign is
``aligned=True`` by default: box coordinates are shifted by -0.5 pixel so that a box sampled at
``spatial_scale`` lines up with the pixel centres of the feature map. ``aligned=False`` is
torchvision's legacy behaviour (and its default).

Mixed precision: the pooling ops take float16/bfloat16 features (computed and accumulated in
float32) with RoIs of any floating dtype, and under autocast (CPU or CUDA) every op runs in float32
and gives its output back in the features' dtype. Channels-last features are pooled in place.

The kernels live in ``ops/csrc`` and register the ``torch.ops.maskrcnn_ops`` operators (CPU and,
when built, CUDA). Without the compiled kernels, the functions below fall back on CPU tensors to
the pure-PyTorch ``ops.reference`` implementations with a single warning. On CUDA tensors without
the CUDA kernels they raise ``CUDAKernelsNotBuiltError`` (a RuntimeError) saying how to build them:
the reference does not scale to the GPU's workloads.
"""

from . import _extension
from .fpn_levels import default_spatial_scales, map_rois_to_levels
from .nms import batched_nms, nms, nms_keep_mask
from .roi_align import multilevel_roi_align, roi_align

if _extension.HAS_CPU_KERNELS:
    from . import _registration  # noqa: F401  (fake kernels and autograd formulas)

HAS_CPU_KERNELS = _extension.HAS_CPU_KERNELS
HAS_CUDA_KERNELS = _extension.HAS_CUDA_KERNELS
CUDAKernelsNotBuiltError = _extension.CUDAKernelsNotBuiltError

__all__ = [
    "HAS_CPU_KERNELS",
    "HAS_CUDA_KERNELS",
    "CUDAKernelsNotBuiltError",
    "batched_nms",
    "default_spatial_scales",
    "map_rois_to_levels",
    "multilevel_roi_align",
    "nms",
    "nms_keep_mask",
    "roi_align",
]
