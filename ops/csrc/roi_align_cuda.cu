// CUDA kernels of roi_align and multilevel_roi_align (forward and backward).
//
// One thread per output element (RoI, channel, bin). A single kernel serves both ops: the feature
// levels travel by value in a LevelTable, and each thread reads its RoI's level from `roi_levels`
// (null for plain roi_align, which is the one-level case). So all RoIs of all FPN levels are
// pooled by one launch. The per-sample math is ops_math.h, the code the CPU tests exercise.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/cuda/Atomic.cuh>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
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

// The pyramid as the kernel sees it. P is `const scalar_t` (features) or `scalar_t` (gradients).
template <typename P>
struct LevelTable {
  P* data[kMaxLevels];
  int height[kMaxLevels];
  int width[kMaxLevels];
  double spatial_scale[kMaxLevels];
};

inline unsigned int grid_for(int64_t total) {
  // Grid-stride loops below, so capping the grid only bounds the launch size.
  return static_cast<unsigned int>(std::min<int64_t>((total + kThreads - 1) / kThreads, 1 << 20));
}

// Decomposes an output index into (RoI, channel, bin) and sets up that RoI's window.
template <typename acc_t, typename scalar_t>
struct OutputElement {
  int64_t roi, channel;
  int ph, pw, level;
  RoiWindow<acc_t> win;

  __device__ OutputElement(int64_t index, const scalar_t* rois, const int64_t* roi_levels,
                           const double* spatial_scales, int num_levels, int64_t batch_size,
                           int64_t channels, int pooled_h, int pooled_w, int sampling_ratio,
                           bool aligned) {
    pw = static_cast<int>(index % pooled_w);
    ph = static_cast<int>((index / pooled_w) % pooled_h);
    channel = (index / pooled_w / pooled_h) % channels;
    roi = index / pooled_w / pooled_h / channels;
    level = roi_levels != nullptr ? static_cast<int>(roi_levels[roi]) : 0;
    CUDA_KERNEL_ASSERT(level >= 0 && level < num_levels);
    acc_t box[5];
    for (int i = 0; i < 5; ++i) box[i] = static_cast<acc_t>(rois[roi * 5 + i]);
    CUDA_KERNEL_ASSERT(box[0] >= 0 && box[0] < static_cast<acc_t>(batch_size));
    win = roi_window<acc_t>(box, static_cast<acc_t>(spatial_scales[level]), pooled_h, pooled_w,
                            sampling_ratio, aligned);
  }
};

template <typename scalar_t, int kTaps>
__global__ void pool_forward_kernel(int64_t total, LevelTable<const scalar_t> levels,
                                    int num_levels, const scalar_t* __restrict__ rois,
                                    const int64_t* __restrict__ roi_levels, int64_t batch_size,
                                    int64_t channels, int pooled_h, int pooled_w,
                                    int sampling_ratio, bool aligned, scalar_t* __restrict__ out) {
  using acc_t = at::opmath_type<scalar_t>;
  for (int64_t index = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; index < total;
       index += static_cast<int64_t>(blockDim.x) * gridDim.x) {
    const OutputElement<acc_t, scalar_t> e(index, rois, roi_levels, levels.spatial_scale,
                                           num_levels, batch_size, channels, pooled_h, pooled_w,
                                           sampling_ratio, aligned);
    const int height = levels.height[e.level];
    const int width = levels.width[e.level];
    const scalar_t* plane =
        levels.data[e.level] + (e.win.batch * channels + e.channel) * height * width;
    acc_t sum = 0;
    for (int iy = 0; iy < e.win.grid_h; ++iy) {
      AxisTaps<acc_t, kTaps> ty;
      axis_taps(sample_coordinate(e.win.start_h, e.ph, e.win.bin_h, iy, e.win.grid_h), height,
                ty);
      if (!ty.valid) continue;
      for (int ix = 0; ix < e.win.grid_w; ++ix) {
        AxisTaps<acc_t, kTaps> tx;
        axis_taps(sample_coordinate(e.win.start_w, e.pw, e.win.bin_w, ix, e.win.grid_w), width,
                  tx);
        if (!tx.valid) continue;
        sum += interpolate(plane, width, ty, tx);
      }
    }
    out[index] = static_cast<scalar_t>(e.win.divide_by_count(sum));
  }
}

template <typename scalar_t, int kTaps>
__global__ void pool_backward_kernel(int64_t total, LevelTable<scalar_t> grads, int num_levels,
                                     const scalar_t* __restrict__ grad_out,
                                     const scalar_t* __restrict__ rois,
                                     const int64_t* __restrict__ roi_levels, int64_t batch_size,
                                     int64_t channels, int pooled_h, int pooled_w,
                                     int sampling_ratio, bool aligned) {
  using acc_t = at::opmath_type<scalar_t>;
  for (int64_t index = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; index < total;
       index += static_cast<int64_t>(blockDim.x) * gridDim.x) {
    const OutputElement<acc_t, scalar_t> e(index, rois, roi_levels, grads.spatial_scale,
                                           num_levels, batch_size, channels, pooled_h, pooled_w,
                                           sampling_ratio, aligned);
    const int height = grads.height[e.level];
    const int width = grads.width[e.level];
    scalar_t* plane = grads.data[e.level] + (e.win.batch * channels + e.channel) * height * width;
    const acc_t grad = static_cast<acc_t>(grad_out[index]);
    // Bins of different RoIs overlap, so the accumulation must be atomic.
    auto add = [plane](int64_t offset, acc_t value) {
      gpuAtomicAdd(plane + offset, static_cast<scalar_t>(value));
    };
    for (int iy = 0; iy < e.win.grid_h; ++iy) {
      AxisTaps<acc_t, kTaps> ty;
      axis_taps(sample_coordinate(e.win.start_h, e.ph, e.win.bin_h, iy, e.win.grid_h), height,
                ty);
      if (!ty.valid) continue;
      for (int ix = 0; ix < e.win.grid_w; ++ix) {
        AxisTaps<acc_t, kTaps> tx;
        axis_taps(sample_coordinate(e.win.start_w, e.pw, e.win.bin_w, ix, e.win.grid_w), width,
                  tx);
        if (!tx.valid) continue;
        scatter_gradient(width, ty, tx, grad, e.win.divide_by_count, add);
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
    table.spatial_scale[l] = scales[l];
  }
  return table;
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

  std::vector<at::Tensor> planes;
  for (const at::Tensor& f : features) planes.push_back(f.contiguous());
  const at::Tensor rois_c = rois.contiguous();
  const at::Tensor levels_c = roi_levels != nullptr ? roi_levels->contiguous() : at::Tensor();
  const int64_t* levels_ptr = levels_c.defined() ? levels_c.data_ptr<int64_t>() : nullptr;
  const int num_levels = static_cast<int>(planes.size());
  const int64_t total = out.numel();
  cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, out.scalar_type(), "roi_align_forward_cuda", [&] {
        const auto table = make_table<const scalar_t>(planes, spatial_scales);
        auto kernel = taps == 2 ? pool_forward_kernel<scalar_t, 2> : pool_forward_kernel<scalar_t, 4>;
        kernel<<<grid_for(total), kThreads, 0, stream>>>(
            total, table, num_levels, rois_c.data_ptr<scalar_t>(), levels_ptr, batch_size,
            channels, static_cast<int>(pooled_h), static_cast<int>(pooled_w),
            static_cast<int>(sampling_ratio), aligned, out.data_ptr<scalar_t>());
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
                                        std::string_view mode) {
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
  std::vector<at::Tensor> grads;
  for (size_t l = 0; l < heights.size(); ++l) {
    grads.push_back(at::zeros({batch_size, channels, heights[l], widths[l]}, grad.options()));
  }
  if (grad.numel() == 0) return grads;
  for (size_t l = 0; l < heights.size(); ++l) {
    TORCH_CHECK(heights[l] > 0 && widths[l] > 0, "feature maps must be non-empty");
  }

  const at::Tensor grad_c = grad.contiguous();
  const at::Tensor rois_c = rois.contiguous();
  const at::Tensor levels_c = roi_levels != nullptr ? roi_levels->contiguous() : at::Tensor();
  const int64_t* levels_ptr = levels_c.defined() ? levels_c.data_ptr<int64_t>() : nullptr;
  const int num_levels = static_cast<int>(grads.size());
  const int64_t total = grad_c.numel();
  cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, grad.scalar_type(), "roi_align_backward_cuda", [&] {
        const auto table = make_table<scalar_t>(grads, spatial_scales);
        auto kernel =
            taps == 2 ? pool_backward_kernel<scalar_t, 2> : pool_backward_kernel<scalar_t, 4>;
        kernel<<<grid_for(total), kThreads, 0, stream>>>(
            total, table, num_levels, grad_c.data_ptr<scalar_t>(), rois_c.data_ptr<scalar_t>(),
            levels_ptr, batch_size, channels, static_cast<int>(pooled_h),
            static_cast<int>(pooled_w), static_cast<int>(sampling_ratio), aligned);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      });
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
                                   c10::string_view mode) {
  return pooled_backward(grad, rois, nullptr, {spatial_scale}, {height}, {width}, batch_size,
                         channels, pooled_h, pooled_w, sampling_ratio, aligned, mode)[0];
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
    int64_t sampling_ratio, bool aligned, c10::string_view mode) {
  check_roi_levels(levels, rois);
  return pooled_backward(grad, rois, &levels, spatial_scales, heights, widths, batch_size,
                         channels, pooled_h, pooled_w, sampling_ratio, aligned, mode);
}

}  // namespace
}  // namespace maskrcnn_ops

TORCH_LIBRARY_IMPL(maskrcnn_ops, CUDA, m) {
  m.impl("roi_align", &maskrcnn_ops::roi_align_cuda);
  m.impl("roi_align_backward", &maskrcnn_ops::roi_align_backward_cuda);
  m.impl("multilevel_roi_align", &maskrcnn_ops::multilevel_roi_align_cuda);
  m.impl("multilevel_roi_align_backward", &maskrcnn_ops::multilevel_roi_align_backward_cuda);
}
