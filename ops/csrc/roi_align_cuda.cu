// CUDA kernels of roi_align and multilevel_roi_align (forward and backward).
//
// One thread per output element (RoI, channel, bin). A single kernel serves both ops: the feature
// levels travel by value in a LevelTable, and each thread reads its RoI's level from `roi_levels`
// (null for plain roi_align, which is the one-level case). So all RoIs of all FPN levels are
// pooled by one launch. The per-sample math is ops_math.h, the code the CPU tests exercise.
//
//  * Layouts: the levels are addressed through their strides, so channels-last maps are read (and
//    their gradients written) in place. For them the output index runs channel-fastest, so a warp
//    reads one pixel's consecutive channels (coalesced); NCHW maps run bin-fastest as before. The
//    output is contiguous NCHW either way.
//  * dtypes: float16/bfloat16 features are computed in float32 (at::opmath_type); their backward
//    accumulates into float32 gradient buffers with float32 atomics and casts once at the end,
//    instead of adding each rounded contribution into a half-precision gradient.
//  * Bad indices: a batch index outside [0, N) or a level outside [0, L) raises before launch,
//    naming the RoI (check_roi_indices: one device-to-host read). While a CUDA graph is being
//    captured that read is impossible, and the kernels instead treat such a RoI as empty (zeros,
//    no gradient) rather than read out of bounds.
//  * Determinism: the backward adds overlapping contributions with atomics, whose order varies, so
//    it alerts under torch.use_deterministic_algorithms(True) (as torchvision's does).
#include <ATen/ATen.h>
#include <ATen/Context.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/cuda/Atomic.cuh>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGraphsC10Utils.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/macros/Macros.h>
#include <torch/library.h>

#include <algorithm>
#include <string_view>
#include <vector>

#include "op_checks.h"
#include "ops_math.h"

namespace maskrcnn_ops {
namespace {

constexpr int kThreads = 256;

// The pyramid as the kernel sees it: each level's data and its (batch, channel, row, column)
// strides. P is `const scalar_t` (features) or the accumulation type (gradients).
template <typename P>
struct LevelTable {
  P* data[kMaxLevels];
  int height[kMaxLevels];
  int width[kMaxLevels];
  int64_t stride_n[kMaxLevels];
  int64_t stride_c[kMaxLevels];
  int64_t stride_h[kMaxLevels];
  int64_t stride_w[kMaxLevels];
  double spatial_scale[kMaxLevels];
};

inline unsigned int grid_for(int64_t total) {
  // Grid-stride loops below, so capping the grid only bounds the launch size.
  return static_cast<unsigned int>(std::min<int64_t>((total + kThreads - 1) / kThreads, 1 << 20));
}

// An output element (RoI, channel, bin) from a thread index, and its offset in the contiguous
// [K, C, PH, PW] output (or incoming gradient).
struct OutputElement {
  int64_t roi, channel, offset;
  int ph, pw;

  __device__ OutputElement(int64_t index, bool channels_fastest, int64_t channels, int pooled_h,
                           int pooled_w) {
    if (channels_fastest) {
      channel = index % channels;
      int64_t rest = index / channels;
      pw = static_cast<int>(rest % pooled_w);
      rest /= pooled_w;
      ph = static_cast<int>(rest % pooled_h);
      roi = rest / pooled_h;
      offset = ((roi * channels + channel) * pooled_h + ph) * pooled_w + pw;
    } else {
      pw = static_cast<int>(index % pooled_w);
      ph = static_cast<int>((index / pooled_w) % pooled_h);
      channel = (index / pooled_w / pooled_h) % channels;
      roi = index / pooled_w / pooled_h / channels;
      offset = index;
    }
  }
};

// RoI `roi` on its level. An index out of range (only possible while a CUDA graph is captured,
// see the file comment) makes it an empty RoI on level 0: no samples, zeros.
template <typename T>
struct RoiOnLevel {
  int level;
  RoiWindow<T> win;

  __device__ RoiOnLevel(const T* rois, const int64_t* roi_levels, int64_t roi,
                        const double* spatial_scales, int num_levels, int64_t batch_size,
                        int pooled_h, int pooled_w, int sampling_ratio, bool aligned) {
    const T* box = rois + roi * 5;
    const int64_t l = roi_levels != nullptr ? roi_levels[roi] : 0;
    const bool usable =
        l >= 0 && l < num_levels && box[0] >= 0 && box[0] < static_cast<T>(batch_size);
    level = usable ? static_cast<int>(l) : 0;
    win = roi_window<T>(box, static_cast<T>(spatial_scales[level]), pooled_h, pooled_w,
                        sampling_ratio, aligned);
    if (!usable) {
      win.batch = 0;
      win.grid_h = win.grid_w = 0;
    }
  }
};

template <typename scalar_t, int kTaps>
__global__ void pool_forward_kernel(int64_t total, LevelTable<const scalar_t> levels,
                                    int num_levels,
                                    const at::opmath_type<scalar_t>* __restrict__ rois,
                                    const int64_t* __restrict__ roi_levels, int64_t batch_size,
                                    int64_t channels, int pooled_h, int pooled_w,
                                    int sampling_ratio, bool aligned, bool channels_fastest,
                                    scalar_t* __restrict__ out) {
  using acc_t = at::opmath_type<scalar_t>;
  for (int64_t index = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; index < total;
       index += static_cast<int64_t>(blockDim.x) * gridDim.x) {
    const OutputElement e(index, channels_fastest, channels, pooled_h, pooled_w);
    const RoiOnLevel<acc_t> r(rois, roi_levels, e.roi, levels.spatial_scale, num_levels,
                              batch_size, pooled_h, pooled_w, sampling_ratio, aligned);
    const int l = r.level;
    const scalar_t* plane =
        levels.data[l] + r.win.batch * levels.stride_n[l] + e.channel * levels.stride_c[l];
    acc_t sum = 0;
    for (int iy = 0; iy < r.win.grid_h; ++iy) {
      AxisTaps<acc_t, kTaps> ty;
      axis_taps(sample_coordinate(r.win.start_h, e.ph, r.win.bin_h, iy, r.win.grid_h),
                levels.height[l], ty);
      if (!ty.valid) continue;
      for (int ix = 0; ix < r.win.grid_w; ++ix) {
        AxisTaps<acc_t, kTaps> tx;
        axis_taps(sample_coordinate(r.win.start_w, e.pw, r.win.bin_w, ix, r.win.grid_w),
                  levels.width[l], tx);
        if (!tx.valid) continue;
        sum += interpolate(plane, levels.stride_h[l], levels.stride_w[l], ty, tx);
      }
    }
    out[e.offset] = static_cast<scalar_t>(r.win.divide_by_count(sum));
  }
}

// acc_t is float or double: the gradients accumulate in it whatever the features' dtype.
template <typename acc_t, int kTaps>
__global__ void pool_backward_kernel(int64_t total, LevelTable<acc_t> grads, int num_levels,
                                     const acc_t* __restrict__ grad_out,
                                     const acc_t* __restrict__ rois,
                                     const int64_t* __restrict__ roi_levels, int64_t batch_size,
                                     int64_t channels, int pooled_h, int pooled_w,
                                     int sampling_ratio, bool aligned, bool channels_fastest) {
  for (int64_t index = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; index < total;
       index += static_cast<int64_t>(blockDim.x) * gridDim.x) {
    const OutputElement e(index, channels_fastest, channels, pooled_h, pooled_w);
    const RoiOnLevel<acc_t> r(rois, roi_levels, e.roi, grads.spatial_scale, num_levels,
                              batch_size, pooled_h, pooled_w, sampling_ratio, aligned);
    const int l = r.level;
    acc_t* plane = grads.data[l] + r.win.batch * grads.stride_n[l] + e.channel * grads.stride_c[l];
    const acc_t grad = grad_out[e.offset];
    // Bins of different RoIs overlap, so the accumulation must be atomic.
    auto add = [plane](int64_t offset, acc_t value) { gpuAtomicAdd(plane + offset, value); };
    for (int iy = 0; iy < r.win.grid_h; ++iy) {
      AxisTaps<acc_t, kTaps> ty;
      axis_taps(sample_coordinate(r.win.start_h, e.ph, r.win.bin_h, iy, r.win.grid_h),
                grads.height[l], ty);
      if (!ty.valid) continue;
      for (int ix = 0; ix < r.win.grid_w; ++ix) {
        AxisTaps<acc_t, kTaps> tx;
        axis_taps(sample_coordinate(r.win.start_w, e.pw, r.win.bin_w, ix, r.win.grid_w),
                  grads.width[l], tx);
        if (!tx.valid) continue;
        scatter_gradient(grads.stride_h[l], grads.stride_w[l], ty, tx, grad,
                         r.win.divide_by_count, add);
      }
    }
  }
}

template <typename P>
LevelTable<P> make_table(const std::vector<at::Tensor>& planes, at::ArrayRef<double> scales) {
  LevelTable<P> table{};
  for (size_t l = 0; l < planes.size(); ++l) {
    table.data[l] = planes[l].data_ptr<std::remove_const_t<P>>();
    table.height[l] = static_cast<int>(planes[l].size(2));
    table.width[l] = static_cast<int>(planes[l].size(3));
    table.stride_n[l] = planes[l].stride(0);
    table.stride_c[l] = planes[l].stride(1);
    table.stride_h[l] = planes[l].stride(2);
    table.stride_w[l] = planes[l].stride(3);
    table.spatial_scale[l] = scales[l];
  }
  return table;
}

// Raises on a bad batch index or level (see the file comment), except while a graph is captured.
void check_indices_unless_capturing(const at::Tensor& rois, const at::Tensor& levels,
                                    int64_t batch_size, int64_t num_levels) {
  if (c10::cuda::currentStreamCaptureStatusMayInitCtx() != c10::cuda::CaptureStatus::None) return;
  check_roi_indices(rois, levels.defined() ? &levels : nullptr, batch_size, num_levels);
}

at::Tensor pooled_forward(at::TensorList features, const at::Tensor& rois,
                          const at::Tensor* roi_levels, at::ArrayRef<double> spatial_scales,
                          int64_t pooled_h, int64_t pooled_w, int64_t sampling_ratio, bool aligned,
                          std::string_view mode) {
  check_levels(features, spatial_scales);
  check_rois(rois, features[0], "the features");
  check_pool_params(pooled_h, pooled_w);
  TORCH_CHECK(features[0].is_cuda(), "expected CUDA tensors");
  const int taps = taps_for_mode(mode);
  const at::cuda::CUDAGuard device_guard(features[0].device());
  const int64_t batch_size = features[0].size(0);
  const int64_t channels = features[0].size(1);
  at::Tensor out = at::empty({rois.size(0), channels, pooled_h, pooled_w}, features[0].options());
  if (out.numel() == 0) return out;
  for (const at::Tensor& f : features) {
    TORCH_CHECK(f.size(2) > 0 && f.size(3) > 0, "feature maps must be non-empty, got ", f.sizes());
  }

  // Channels-last pyramids are read in place; anything else as NCHW (a copy if strided).
  const bool nhwc = all_channels_last(features);
  std::vector<at::Tensor> planes;
  for (const at::Tensor& f : features) planes.push_back(nhwc ? f : f.contiguous());
  const at::Tensor rois_c = rois.to(compute_dtype(out.scalar_type())).contiguous();
  const at::Tensor levels_c = roi_levels != nullptr ? roi_levels->contiguous() : at::Tensor();
  const int num_levels = static_cast<int>(planes.size());
  check_indices_unless_capturing(rois_c, levels_c, batch_size, num_levels);
  const int64_t* levels_ptr = levels_c.defined() ? levels_c.data_ptr<int64_t>() : nullptr;
  const int64_t total = out.numel();
  cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, out.scalar_type(), "roi_align_forward_cuda", [&] {
        using acc_t = at::opmath_type<scalar_t>;
        const auto table = make_table<const scalar_t>(planes, spatial_scales);
        auto kernel =
            taps == 2 ? pool_forward_kernel<scalar_t, 2> : pool_forward_kernel<scalar_t, 4>;
        kernel<<<grid_for(total), kThreads, 0, stream>>>(
            total, table, num_levels, rois_c.data_ptr<acc_t>(), levels_ptr, batch_size, channels,
            static_cast<int>(pooled_h), static_cast<int>(pooled_w),
            static_cast<int>(sampling_ratio), aligned, nhwc, out.data_ptr<scalar_t>());
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      });
  return out;
}

std::vector<at::Tensor> pooled_backward(const at::Tensor& grad, const at::Tensor& rois,
                                        const at::Tensor* roi_levels,
                                        at::ArrayRef<double> spatial_scales,
                                        at::IntArrayRef heights, at::IntArrayRef widths,
                                        int64_t batch_size, int64_t channels, int64_t pooled_h,
                                        int64_t pooled_w, int64_t sampling_ratio, bool aligned,
                                        std::string_view mode, bool channels_last,
                                        const char* op_name) {
  TORCH_CHECK(grad.is_cuda(), "expected CUDA tensors");
  check_rois(rois, grad, "grad");
  check_pool_params(pooled_h, pooled_w);
  TORCH_CHECK(heights.size() == widths.size() && heights.size() == spatial_scales.size() &&
                  !heights.empty() && static_cast<int>(heights.size()) <= kMaxLevels,
              "heights, widths and spatial_scales must have one entry per level (at most ",
              kMaxLevels, ")");
  TORCH_CHECK(grad.dim() == 4 && grad.size(0) == rois.size(0) && grad.size(1) == channels &&
                  grad.size(2) == pooled_h && grad.size(3) == pooled_w,
              "grad must have shape [K, C, PH, PW], got ", grad.sizes());
  const int taps = taps_for_mode(mode);
  const at::cuda::CUDAGuard device_guard(grad.device());
  const at::ScalarType compute = compute_dtype(grad.scalar_type());
  const at::MemoryFormat format =
      channels_last ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Contiguous;
  std::vector<at::Tensor> grads;  // accumulated in the compute dtype
  for (size_t l = 0; l < heights.size(); ++l) {
    grads.push_back(at::empty({batch_size, channels, heights[l], widths[l]},
                              grad.options().dtype(compute), format)
                        .zero_());
  }
  if (grad.numel() != 0) {
    for (size_t l = 0; l < heights.size(); ++l) {
      TORCH_CHECK(heights[l] > 0 && widths[l] > 0, "feature maps must be non-empty");
    }
    at::globalContext().alertNotDeterministic(op_name);
    const at::Tensor grad_c = grad.to(compute).contiguous();
    const at::Tensor rois_c = rois.to(compute).contiguous();
    const at::Tensor levels_c = roi_levels != nullptr ? roi_levels->contiguous() : at::Tensor();
    const int num_levels = static_cast<int>(grads.size());
    check_indices_unless_capturing(rois_c, levels_c, batch_size, num_levels);
    const int64_t* levels_ptr = levels_c.defined() ? levels_c.data_ptr<int64_t>() : nullptr;
    const int64_t total = grad_c.numel();
    cudaStream_t stream = at::cuda::getCurrentCUDAStream();
    AT_DISPATCH_FLOATING_TYPES(compute, "roi_align_backward_cuda", [&] {
      const auto table = make_table<scalar_t>(grads, spatial_scales);
      auto kernel =
          taps == 2 ? pool_backward_kernel<scalar_t, 2> : pool_backward_kernel<scalar_t, 4>;
      kernel<<<grid_for(total), kThreads, 0, stream>>>(
          total, table, num_levels, grad_c.data_ptr<scalar_t>(), rois_c.data_ptr<scalar_t>(),
          levels_ptr, batch_size, channels, static_cast<int>(pooled_h),
          static_cast<int>(pooled_w), static_cast<int>(sampling_ratio), aligned, channels_last);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  }
  if (compute != grad.scalar_type()) {
    for (at::Tensor& g : grads) g = g.to(grad.scalar_type());  // the one rounding
  }
  return grads;
}

at::Tensor roi_align_cuda(const at::Tensor& input, const at::Tensor& rois, double spatial_scale,
                          int64_t pooled_h, int64_t pooled_w, int64_t sampling_ratio, bool aligned,
                          c10::string_view mode) {
  TORCH_CHECK(input.dim() == 4, "input must be [N, C, H, W], got ", input.sizes());
  return pooled_forward({input}, rois, nullptr, {spatial_scale}, pooled_h, pooled_w,
                        sampling_ratio, aligned, mode);
}

at::Tensor roi_align_backward_cuda(const at::Tensor& grad, const at::Tensor& rois,
                                   double spatial_scale, int64_t pooled_h, int64_t pooled_w,
                                   int64_t batch_size, int64_t channels, int64_t height,
                                   int64_t width, int64_t sampling_ratio, bool aligned,
                                   c10::string_view mode, bool channels_last) {
  return pooled_backward(grad, rois, nullptr, {spatial_scale}, {height}, {width}, batch_size,
                         channels, pooled_h, pooled_w, sampling_ratio, aligned, mode,
                         channels_last, "roi_align_backward_cuda")[0];
}

at::Tensor multilevel_roi_align_cuda(at::TensorList features, const at::Tensor& rois,
                                     const at::Tensor& levels,
                                     at::ArrayRef<double> spatial_scales, int64_t pooled_h,
                                     int64_t pooled_w, int64_t sampling_ratio, bool aligned,
                                     c10::string_view mode) {
  check_roi_levels(levels, rois);
  return pooled_forward(features, rois, &levels, spatial_scales, pooled_h, pooled_w,
                        sampling_ratio, aligned, mode);
}

std::vector<at::Tensor> multilevel_roi_align_backward_cuda(
    const at::Tensor& grad, const at::Tensor& rois, const at::Tensor& levels,
    at::ArrayRef<double> spatial_scales, at::IntArrayRef heights, at::IntArrayRef widths,
    int64_t batch_size, int64_t channels, int64_t pooled_h, int64_t pooled_w,
    int64_t sampling_ratio, bool aligned, c10::string_view mode, bool channels_last) {
  check_roi_levels(levels, rois);
  return pooled_backward(grad, rois, &levels, spatial_scales, heights, widths, batch_size,
                         channels, pooled_h, pooled_w, sampling_ratio, aligned, mode,
                         channels_last, "multilevel_roi_align_backward_cuda");
}

}  // namespace
}  // namespace maskrcnn_ops

TORCH_LIBRARY_IMPL(maskrcnn_ops, CUDA, m) {
  m.impl("roi_align", &maskrcnn_ops::roi_align_cuda);
  m.impl("roi_align_backward", &maskrcnn_ops::roi_align_backward_cuda);
  m.impl("multilevel_roi_align", &maskrcnn_ops::multilevel_roi_align_cuda);
  m.impl("multilevel_roi_align_backward", &maskrcnn_ops::multilevel_roi_align_backward_cuda);
}
