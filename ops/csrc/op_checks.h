// Host-side argument checks and small helpers shared by the CPU and CUDA operator wrappers.
#pragma once

#include <ATen/ATen.h>

#include <cmath>
#include <limits>
#include <string_view>
#include <vector>

#include "ops_math.h"

namespace maskrcnn_ops {

// Taps per axis of an interpolation mode: 2 for bilinear, 4 for bicubic.
inline int taps_for_mode(std::string_view mode) {
  if (mode == "bilinear") return 2;
  if (mode == "bicubic") return 4;
  TORCH_CHECK(false, "mode must be \"bilinear\" or \"bicubic\", got \"", mode, "\"");
}

inline void check_rois(const at::Tensor& rois, const at::Tensor& reference, const char* what) {
  TORCH_CHECK(rois.dim() == 2 && rois.size(1) == 5,
              "rois must have shape [K, 5] (batch_index, x1, y1, x2, y2), got ", rois.sizes());
  TORCH_CHECK(rois.device() == reference.device(), "rois must be on the same device as ", what,
              " (", reference.device(), "), got ", rois.device());
  TORCH_CHECK(rois.scalar_type() == reference.scalar_type(), "rois must have the dtype of ", what,
              " (", reference.scalar_type(), "), got ", rois.scalar_type());
}

inline void check_pool_params(int64_t pooled_height, int64_t pooled_width) {
  TORCH_CHECK(pooled_height > 0 && pooled_width > 0, "output_size must be positive, got (",
              pooled_height, ", ", pooled_width, ")");
}

// The feature levels of a multilevel call: same device, dtype, batch size and channels, 4-D.
inline void check_levels(at::TensorList features, at::ArrayRef<double> spatial_scales) {
  TORCH_CHECK(!features.empty(), "features must hold at least one level");
  TORCH_CHECK(static_cast<int>(features.size()) <= kMaxLevels, "at most ", kMaxLevels,
              " feature levels are supported, got ", features.size());
  TORCH_CHECK(spatial_scales.size() == features.size(), "spatial_scales must have one entry per ",
              "feature level: ", features.size(), " levels, ", spatial_scales.size(), " scales");
  const at::Tensor& first = features[0];
  for (const at::Tensor& level : features) {
    TORCH_CHECK(level.dim() == 4, "each feature level must be [N, C, H, W], got ", level.sizes());
    TORCH_CHECK(level.device() == first.device() && level.scalar_type() == first.scalar_type(),
                "feature levels must share device and dtype");
    TORCH_CHECK(level.size(0) == first.size(0) && level.size(1) == first.size(1),
                "feature levels must share batch size and channels");
  }
}

inline void check_roi_levels(const at::Tensor& levels, const at::Tensor& rois) {
  TORCH_CHECK(levels.dim() == 1 && levels.size(0) == rois.size(0),
              "levels must be a [K] tensor with one entry per RoI");
  TORCH_CHECK(levels.scalar_type() == at::kLong, "levels must be int64");
  TORCH_CHECK(levels.device() == rois.device(), "levels must be on the device of rois");
}

inline void check_boxes(const at::Tensor& boxes, const at::Tensor& scores) {
  TORCH_CHECK(boxes.dim() == 2 && boxes.size(1) == 4, "boxes must have shape [N, 4], got ",
              boxes.sizes());
  TORCH_CHECK(scores.dim() == 1 && scores.size(0) == boxes.size(0),
              "scores must have shape [N] matching boxes, got ", scores.sizes());
  TORCH_CHECK(boxes.device() == scores.device(), "boxes and scores must share a device");
  TORCH_CHECK(boxes.scalar_type() == scores.scalar_type(),
              "boxes and scores must share a dtype, got ", boxes.scalar_type(), " and ",
              scores.scalar_type());
}

inline void check_idxs(const at::Tensor& idxs, const at::Tensor& boxes) {
  TORCH_CHECK(idxs.dim() == 1 && idxs.size(0) == boxes.size(0),
              "idxs must have shape [N] matching boxes, got ", idxs.sizes());
  TORCH_CHECK(idxs.device() == boxes.device(), "idxs must be on the device of boxes");
  TORCH_CHECK(!at::isFloatingType(idxs.scalar_type()) && idxs.scalar_type() != at::kBool,
              "idxs must be an integer tensor, got ", idxs.scalar_type());
}

// The largest T not above `threshold`. For any T value v, `v > threshold` (compared in double, as
// torchvision's CPU nms does) equals `v > threshold_as<T>(threshold)` compared in T, so the
// kernels can stay in T (and vectorise) without changing a single decision.
template <typename T>
T threshold_as(double threshold) {
  T t = static_cast<T>(threshold);
  if (static_cast<double>(t) > threshold) t = std::nextafter(t, -std::numeric_limits<T>::infinity());
  return t;
}

}  // namespace maskrcnn_ops
