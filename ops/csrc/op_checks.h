// Host-side argument checks and small helpers shared by the CPU and CUDA operator wrappers.
#pragma once

#include <ATen/ATen.h>

#include <cmath>
#include <cstdlib>
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

// RoIs may have any floating dtype, the features' or not (float32 RoIs with bfloat16 features is
// what autocast produces): the kernels read them in their compute type, float32 (or float64 for
// float64 features), so reduced-precision boxes are widened and boxes never lose precision to the
// features' storage type.
inline void check_rois(const at::Tensor& rois, const at::Tensor& reference, const char* what) {
  TORCH_CHECK(rois.dim() == 2 && rois.size(1) == 5,
              "rois must have shape [K, 5] (batch_index, x1, y1, x2, y2), got ", rois.sizes());
  TORCH_CHECK(rois.device() == reference.device(), "rois must be on the same device as ", what,
              " (", reference.device(), "), got ", rois.device());
  TORCH_CHECK(at::isFloatingType(rois.scalar_type()), "rois must be a floating-point tensor, got ",
              rois.scalar_type());
  TORCH_CHECK(at::isFloatingType(reference.scalar_type()), what,
              " must be a floating-point tensor, got ", reference.scalar_type());
}

// The dtype the kernels compute in for features of `dtype`: float32 for float16, bfloat16 and
// float32 (so reduced precision is only the storage), float64 for float64.
inline at::ScalarType compute_dtype(at::ScalarType dtype) {
  return dtype == at::kDouble ? at::kDouble : at::kFloat;
}

// Whether a 4-D tensor is laid out channels-last (NHWC) and not also plain contiguous (which a
// tensor with one channel or a 1x1 map is): the layout the NHWC kernels read in place.
inline bool is_channels_last(const at::Tensor& t) {
  return t.dim() == 4 && t.is_contiguous(at::MemoryFormat::ChannelsLast) && !t.is_contiguous();
}

inline bool all_channels_last(at::TensorList features) {
  for (const at::Tensor& f : features) {
    if (!is_channels_last(f)) return false;
  }
  return true;
}

// Whether MASKRCNN_OPS_SYNC_CHECKS=1 (read once, at the first CUDA pooler call): the debug switch
// of check_roi_indices's precise, host-reading check.
inline bool sync_checks_enabled() {
  static const bool enabled = [] {
    const char* value = std::getenv("MASKRCNN_OPS_SYNC_CHECKS");
    return value != nullptr && std::string_view(value) == "1";
  }();
  return enabled;
}

// Validates each RoI's batch index (in [0, batch_size), not NaN) and level (in [0, num_levels)).
// The CPU kernels check as they plan; the CUDA wrappers call this before launching.
//  * By default without a host read: the "all valid" flag is computed on the device and checked by
//    a device-side assert (at::_assert_async), so the host does not wait for the GPU on every
//    pooler call. A bad index then fails at the next synchronisation, as a device-side assert
//    (which leaves the CUDA context unusable).
//  * With MASKRCNN_OPS_SYNC_CHECKS=1: the precise check, which raises a RuntimeError naming the
//    first offender (one device-to-host read of a flag, two more only to word the error).
inline void check_roi_indices(const at::Tensor& rois, const at::Tensor* levels, int64_t batch_size,
                              int64_t num_levels) {
  if (rois.size(0) == 0) return;
  const at::Tensor batch = rois.select(1, 0);
  const at::Tensor bad_batch = at::logical_not(at::logical_and(batch >= 0, batch < batch_size));
  at::Tensor bad = bad_batch;
  if (levels != nullptr) {
    bad = at::logical_or(bad, at::logical_or(*levels < 0, *levels >= num_levels));
  }
  if (!sync_checks_enabled()) {
    at::_assert_async(at::logical_not(bad.any()),
                      "maskrcnn_ops: a RoI has a batch index or level out of range (rerun with "
                      "MASKRCNN_OPS_SYNC_CHECKS=1 for an error naming it)");
    return;
  }
  if (!bad.any().item<bool>()) return;
  const int64_t k = bad.nonzero().select(1, 0)[0].item<int64_t>();
  TORCH_CHECK(!bad_batch[k].item<bool>(), "RoI ", k, " has batch index ",
              batch[k].item<double>(), " outside [0, ", batch_size, ")");
  TORCH_CHECK(false, "RoI ", k, " maps to level ", (*levels)[k].item<int64_t>(), " but there are ",
              num_levels, " levels");
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
  TORCH_CHECK(at::isFloatingType(boxes.scalar_type()),
              "boxes must be a floating-point tensor, got ", boxes.scalar_type());
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
