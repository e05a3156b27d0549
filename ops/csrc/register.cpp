// The operator schemas of the maskrcnn_ops library, declared once. The kernels register themselves
// per backend (CPU in *_cpu.cpp, CUDA in *.cu, autocast rules in autocast.cpp); autograd formulas
// and fake (meta) kernels are registered from Python (ops/_registration.py).
#include <torch/library.h>

TORCH_LIBRARY(maskrcnn_ops, m) {
  // RoIAlign over one feature map. `mode` is "bilinear" or "bicubic". The output is [K, C, PH, PW]
  // contiguous whatever the input's layout. The backward ops return the input gradients
  // channels-last when `channels_last` (the layout of the features, read in place).
  m.def(
      "roi_align(Tensor input, Tensor rois, float spatial_scale, int pooled_height, "
      "int pooled_width, int sampling_ratio, bool aligned, str mode) -> Tensor");
  m.def(
      "roi_align_backward(Tensor grad, Tensor rois, float spatial_scale, int pooled_height, "
      "int pooled_width, SymInt batch_size, SymInt channels, SymInt height, SymInt width, "
      "int sampling_ratio, bool aligned, str mode, bool channels_last=False) -> Tensor");

  // The fused FPN pooler: RoI k is pooled from features[levels[k]] at spatial_scales[levels[k]],
  // all RoIs in one pass.
  m.def(
      "multilevel_roi_align(Tensor[] features, Tensor rois, Tensor levels, float[] spatial_scales, "
      "int pooled_height, int pooled_width, int sampling_ratio, bool aligned, str mode) -> Tensor");
  m.def(
      "multilevel_roi_align_backward(Tensor grad, Tensor rois, Tensor levels, "
      "float[] spatial_scales, SymInt[] heights, SymInt[] widths, SymInt batch_size, "
      "SymInt channels, int pooled_height, int pooled_width, int sampling_ratio, bool aligned, "
      "str mode, bool channels_last=False) -> Tensor[]");

  // Kept box indices (int64) in decreasing score order, ties by increasing index.
  m.def("nms(Tensor boxes, Tensor scores, float iou_threshold) -> Tensor");
  // Boxes of different idxs never suppress each other.
  m.def("batched_nms(Tensor boxes, Tensor scores, Tensor idxs, float iou_threshold) -> Tensor");
  // The 64-box bitmask algorithm of the CUDA kernel (block masks, then the keep walk); on the CPU
  // it is the testable twin of the GPU code path. idxs, when given, makes it batched.
  m.def(
      "nms_bitmask(Tensor boxes, Tensor scores, float iou_threshold, Tensor? idxs=None) -> Tensor");
  // Fixed-size NMS: a bool [N] mask, True for the boxes nms (idxs None) or batched_nms keeps; no
  // output length depends on the data, so the host never waits for it. Boxes whose idxs are
  // negative are padding: never kept, and they suppress nothing.
  m.def(
      "nms_keep_mask(Tensor boxes, Tensor scores, float iou_threshold, Tensor? idxs=None) -> "
      "Tensor");
}
