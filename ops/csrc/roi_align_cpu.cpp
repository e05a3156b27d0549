// CPU kernels of roi_align and multilevel_roi_align (forward and backward). The engine is in
// roi_align_cpu.h (with its float32 and channels-last loops); this file validates arguments, lays
// the tensors out and dispatches.
//
// dtypes: float32 and float64, and float16/bfloat16 features computed in float32 (the forward
// converts each plane once and rounds each output once; the backward accumulates into float32
// gradients and casts them once at the end).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <torch/library.h>

#include <string_view>
#include <type_traits>
#include <vector>

#include "cpu_memory.h"
#include "op_checks.h"
#include "roi_align_cpu.h"
#include "roi_align_cpu_f32.h"
#include "roi_align_cpu_nhwc.h"

namespace maskrcnn_ops {
namespace {

// Runs `fn.template operator()<S, T, kTaps>()` for the storage dtype S, its compute type T and the
// mode's taps.
template <typename Fn>
void dispatch_pool(at::ScalarType dtype, std::string_view mode, Fn&& fn) {
  const int taps = taps_for_mode(mode);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "roi_align_cpu", [&] {
    using compute_t = at::opmath_type<scalar_t>;
    if (taps == 2) {
      fn.template operator()<scalar_t, compute_t, 2>();
    } else {
      fn.template operator()<scalar_t, compute_t, 4>();
    }
  });
}

// Runs `fn.template operator()<T, kTaps>()` for a compute dtype (float32 or float64).
template <typename Fn>
void dispatch_compute(at::ScalarType dtype, std::string_view mode, Fn&& fn) {
  const int taps = taps_for_mode(mode);
  AT_DISPATCH_FLOATING_TYPES(dtype, "roi_align_backward_cpu", [&] {
    if (taps == 2) {
      fn.template operator()<scalar_t, 2>();
    } else {
      fn.template operator()<scalar_t, 4>();
    }
  });
}

at::Tensor pooled_forward(at::TensorList features, const at::Tensor& rois,
                          const at::Tensor* roi_levels, at::ArrayRef<double> spatial_scales,
                          int64_t pooled_h, int64_t pooled_w, int64_t sampling_ratio, bool aligned,
                          std::string_view mode) {
  check_levels(features, spatial_scales);
  check_rois(rois, features[0], "the features");
  check_pool_params(pooled_h, pooled_w);
  TORCH_CHECK(features[0].device().is_cpu(), "expected CPU tensors");
  const int64_t num_rois = rois.size(0);
  const int64_t batch_size = features[0].size(0);
  const int64_t channels = features[0].size(1);
  at::Tensor out =
      cpu::empty_large({num_rois, channels, pooled_h, pooled_w}, features[0].options());
  if (out.numel() == 0) return out;
  for (const at::Tensor& f : features) {
    TORCH_CHECK(f.size(2) > 0 && f.size(3) > 0, "feature maps must be non-empty, got ", f.sizes());
  }

  // Channels-last pyramids are read in place; anything else as NCHW (a copy if strided).
  const bool nhwc = all_channels_last(features);
  std::vector<at::Tensor> stored;  // keeps the NCHW copies of strided inputs alive
  for (const at::Tensor& f : features) stored.push_back(nhwc ? f : f.contiguous());
  const at::Tensor rois_c = rois.to(compute_dtype(out.scalar_type())).contiguous();
  const at::Tensor levels_c = roi_levels != nullptr ? roi_levels->contiguous() : at::Tensor();
  dispatch_pool(out.scalar_type(), mode, [&]<typename S, typename T, int K>() {
    std::vector<cpu::LevelPlanes<const S>> levels;
    for (size_t l = 0; l < stored.size(); ++l) {
      levels.push_back({stored[l].const_data_ptr<S>(), stored[l].size(2), stored[l].size(3),
                        spatial_scales[l]});
    }
    const auto plan = cpu::make_sampling_plan<T, K>(
        rois_c.const_data_ptr<T>(),
        levels_c.defined() ? levels_c.const_data_ptr<int64_t>() : nullptr, num_rois, levels,
        batch_size, pooled_h, pooled_w, sampling_ratio, aligned);
    S* out_data = out.mutable_data_ptr<S>();
    if (nhwc) {
      cpu::pool_forward_nhwc<S, T, K>(plan, levels, channels, pooled_h, pooled_w, out_data);
      return;
    }
    if constexpr (std::is_same_v<T, float>) {
      if (cpu::fits_column_windows(levels, K, pooled_w)) {
        cpu::pool_forward_f32<K, S>(plan, levels, batch_size, channels, pooled_h, pooled_w,
                                    out_data);
        return;
      }
    }
    cpu::pool_forward<S, T, K>(plan, levels, batch_size, channels, pooled_h, pooled_w, out_data);
  });
  return out;
}

// The input gradients, in grad's dtype, channels-last when `channels_last` (the layout of the
// features they belong to).
std::vector<at::Tensor> pooled_backward(const at::Tensor& grad, const at::Tensor& rois,
                                        const at::Tensor* roi_levels,
                                        at::ArrayRef<double> spatial_scales,
                                        at::IntArrayRef heights, at::IntArrayRef widths,
                                        int64_t batch_size, int64_t channels, int64_t pooled_h,
                                        int64_t pooled_w, int64_t sampling_ratio, bool aligned,
                                        std::string_view mode, bool channels_last) {
  TORCH_CHECK(grad.device().is_cpu(), "expected CPU tensors");
  check_rois(rois, grad, "grad");
  check_pool_params(pooled_h, pooled_w);
  TORCH_CHECK(heights.size() == widths.size() && heights.size() == spatial_scales.size(),
              "heights, widths and spatial_scales must have one entry per level");
  TORCH_CHECK(grad.dim() == 4 && grad.size(0) == rois.size(0) && grad.size(1) == channels &&
                  grad.size(2) == pooled_h && grad.size(3) == pooled_w,
              "grad must have shape [K, C, PH, PW], got ", grad.sizes());
  const at::ScalarType compute = compute_dtype(grad.scalar_type());
  const at::MemoryFormat format =
      channels_last ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Contiguous;
  std::vector<at::Tensor> grads;  // accumulated in the compute dtype
  for (size_t l = 0; l < heights.size(); ++l) {
    grads.push_back(cpu::empty_large({batch_size, channels, heights[l], widths[l]},
                                     grad.options().dtype(compute), format)
                        .zero_());
  }
  if (grad.numel() != 0) {
    for (size_t l = 0; l < heights.size(); ++l) {
      TORCH_CHECK(heights[l] > 0 && widths[l] > 0, "feature maps must be non-empty");
    }
    const at::Tensor grad_c = grad.to(compute).contiguous();
    const at::Tensor rois_c = rois.to(compute).contiguous();
    const at::Tensor levels_c = roi_levels != nullptr ? roi_levels->contiguous() : at::Tensor();
    dispatch_compute(compute, mode, [&]<typename T, int K>() {
      std::vector<cpu::LevelPlanes<T>> levels;
      for (size_t l = 0; l < grads.size(); ++l) {
        levels.push_back(
            {grads[l].mutable_data_ptr<T>(), heights[l], widths[l], spatial_scales[l]});
      }
      const auto plan = cpu::make_sampling_plan<T, K>(
          rois_c.const_data_ptr<T>(),
          levels_c.defined() ? levels_c.const_data_ptr<int64_t>() : nullptr, grad.size(0),
          levels, batch_size, pooled_h, pooled_w, sampling_ratio, aligned);
      const T* grad_data = grad_c.const_data_ptr<T>();
      if (channels_last) {
        cpu::pool_backward_nhwc<T, K>(plan, levels, batch_size, channels, pooled_h, pooled_w,
                                      grad_data);
        return;
      }
      if constexpr (std::is_same_v<T, float>) {
        if (cpu::fits_column_windows(levels, K, pooled_w)) {
          cpu::pool_backward_f32<K>(plan, levels, batch_size, channels, pooled_h, pooled_w,
                                    grad_data);
          return;
        }
      }
      cpu::pool_backward<T, K>(plan, levels, batch_size, channels, pooled_h, pooled_w,
                               grad_data);
    });
  }
  if (compute != grad.scalar_type()) {
    for (at::Tensor& g : grads) g = g.to(grad.scalar_type());  // the one rounding
  }
  return grads;
}

at::Tensor roi_align_cpu(const at::Tensor& input, const at::Tensor& rois, double spatial_scale,
                         int64_t pooled_h, int64_t pooled_w, int64_t sampling_ratio, bool aligned,
                         c10::string_view mode) {
  TORCH_CHECK(input.dim() == 4, "input must be [N, C, H, W], got ", input.sizes());
  return pooled_forward({input}, rois, nullptr, {spatial_scale}, pooled_h, pooled_w,
                        sampling_ratio, aligned, mode);
}

at::Tensor roi_align_backward_cpu(const at::Tensor& grad, const at::Tensor& rois,
                                  double spatial_scale, int64_t pooled_h, int64_t pooled_w,
                                  int64_t batch_size, int64_t channels, int64_t height,
                                  int64_t width, int64_t sampling_ratio, bool aligned,
                                  c10::string_view mode, bool channels_last) {
  return pooled_backward(grad, rois, nullptr, {spatial_scale}, {height}, {width}, batch_size,
                         channels, pooled_h, pooled_w, sampling_ratio, aligned, mode,
                         channels_last)[0];
}

at::Tensor multilevel_roi_align_cpu(at::TensorList features, const at::Tensor& rois,
                                    const at::Tensor& levels, at::ArrayRef<double> spatial_scales,
                                    int64_t pooled_h, int64_t pooled_w, int64_t sampling_ratio,
                                    bool aligned, c10::string_view mode) {
  check_roi_levels(levels, rois);
  return pooled_forward(features, rois, &levels, spatial_scales, pooled_h, pooled_w,
                        sampling_ratio, aligned, mode);
}

std::vector<at::Tensor> multilevel_roi_align_backward_cpu(
    const at::Tensor& grad, const at::Tensor& rois, const at::Tensor& levels,
    at::ArrayRef<double> spatial_scales, at::IntArrayRef heights, at::IntArrayRef widths,
    int64_t batch_size, int64_t channels, int64_t pooled_h, int64_t pooled_w,
    int64_t sampling_ratio, bool aligned, c10::string_view mode, bool channels_last) {
  check_roi_levels(levels, rois);
  return pooled_backward(grad, rois, &levels, spatial_scales, heights, widths, batch_size,
                         channels, pooled_h, pooled_w, sampling_ratio, aligned, mode,
                         channels_last);
}

}  // namespace
}  // namespace maskrcnn_ops

TORCH_LIBRARY_IMPL(maskrcnn_ops, CPU, m) {
  m.impl("roi_align", &maskrcnn_ops::roi_align_cpu);
  m.impl("roi_align_backward", &maskrcnn_ops::roi_align_backward_cpu);
  m.impl("multilevel_roi_align", &maskrcnn_ops::multilevel_roi_align_cpu);
  m.impl("multilevel_roi_align_backward", &maskrcnn_ops::multilevel_roi_align_backward_cpu);
}
