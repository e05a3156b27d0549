// Channels-last loops of the CPU RoIAlign engine (roi_align_cpu.h): features stored [N, H, W, C],
// as a channels_last model produces them, pooled in place instead of being copied back to NCHW.
//
// A sample's taps are whole pixels, each a contiguous run of C channels, so one sample is kTaps^2
// multiply-adds along the channels (which the compiler vectorises), its weights computed once for
// all channels. The vectorisation is across channels, so each channel's arithmetic keeps
// torchvision's order (w1*v1 + w2*v2 + w3*v3 + w4*v4, samples summed in order, one division by the
// count): bilinear results are bit-identical to the NCHW kernels and to torchvision.
//
//  * Forward: threads take RoIs (all channels of one RoI) from a shared counter, in (level, image)
//    order so that consecutive RoIs read the same map. A RoI's bins accumulate as [bins, C] in the
//    thread's scratch and are written transposed into the NCHW output.
//  * Backward: a task owns a block of channels of one (level, image) map and walks that map's RoIs
//    in increasing order, so the gradient needs no atomics and every element receives its
//    contributions in torchvision's order (bit-identical again).
// Computation is in T (float32, or float64); the forward reads float16/bfloat16 storage directly.
#pragma once

#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>
#include <vector>

#include "roi_align_cpu.h"

namespace maskrcnn_ops {
namespace cpu {

// acc[c] += value of the sample at (row, col) in channel c, for c < channels. `image` is one
// image of an NHWC level.
template <typename S, typename T>
inline void accumulate_sample(const S* __restrict image, int64_t width, int64_t channels,
                              const AxisTaps<T, 2>& row, const AxisTaps<T, 2>& col,
                              T* __restrict acc) {
  const T w1 = row.weight[0] * col.weight[0];
  const T w2 = row.weight[0] * col.weight[1];
  const T w3 = row.weight[1] * col.weight[0];
  const T w4 = row.weight[1] * col.weight[1];
  const S* __restrict p1 = image + (row.index[0] * width + col.index[0]) * channels;
  const S* __restrict p2 = image + (row.index[0] * width + col.index[1]) * channels;
  const S* __restrict p3 = image + (row.index[1] * width + col.index[0]) * channels;
  const S* __restrict p4 = image + (row.index[1] * width + col.index[1]) * channels;
  for (int64_t c = 0; c < channels; ++c) {
    acc[c] += ((w1 * static_cast<T>(p1[c]) + w2 * static_cast<T>(p2[c])) +
               w3 * static_cast<T>(p3[c])) +
              w4 * static_cast<T>(p4[c]);
  }
}

// Bicubic: the 16 taps summed in interpolate_rows' order.
template <typename S, typename T>
inline void accumulate_sample(const S* __restrict image, int64_t width, int64_t channels,
                              const AxisTaps<T, 4>& row, const AxisTaps<T, 4>& col,
                              T* __restrict acc) {
  T w[16];
  const S* p[16];
  for (int i = 0; i < 4; ++i) {
    for (int j = 0; j < 4; ++j) {
      w[4 * i + j] = row.weight[i] * col.weight[j];
      p[4 * i + j] = image + (row.index[i] * width + col.index[j]) * channels;
    }
  }
  for (int64_t c = 0; c < channels; ++c) {
    T value = 0;
    for (int t = 0; t < 16; ++t) value += w[t] * static_cast<T>(p[t][c]);
    acc[c] += value;
  }
}

// Sums of one RoI's samples per bin and channel into sums [PH * PW, C].
template <typename S, typename T, int kTaps>
inline void pool_roi_nhwc(const S* image, int64_t width, int64_t channels,
                          const AxisTaps<T, kTaps>* ty, const AxisTaps<T, kTaps>* tx, int grid_h,
                          int grid_w, int pooled_h, int pooled_w, T* sums) {
  for (int ph = 0; ph < pooled_h; ++ph) {
    for (int pw = 0; pw < pooled_w; ++pw) {
      T* acc = sums + (ph * pooled_w + pw) * channels;
      std::fill(acc, acc + channels, static_cast<T>(0));
      for (int iy = 0; iy < grid_h; ++iy) {
        const AxisTaps<T, kTaps>& row = ty[ph * grid_h + iy];
        if (!row.valid) continue;
        for (int ix = 0; ix < grid_w; ++ix) {
          const AxisTaps<T, kTaps>& col = tx[pw * grid_w + ix];
          if (!col.valid) continue;
          accumulate_sample(image, width, channels, row, col, acc);
        }
      }
    }
  }
}

// levels: NHWC maps of storage type S; out: [K, C, PH, PW], contiguous.
template <typename S, typename T, int kTaps>
void pool_forward_nhwc(const SamplingPlan<T, kTaps>& plan,
                       const std::vector<LevelPlanes<const S>>& levels, int64_t channels,
                       int pooled_h, int pooled_w, S* out) {
  const int64_t bins = static_cast<int64_t>(pooled_h) * pooled_w;
  const int64_t num_rois = static_cast<int64_t>(plan.windows.size());
  std::atomic<int64_t> next_roi{0};
  at::parallel_for(0, threads_for(plan.num_samples * channels), 1, [&](int64_t, int64_t) {
    std::vector<T> sums(bins * channels);
    for (int64_t g = next_roi++; g < num_rois; g = next_roi++) {
      const int64_t k = plan.grouped_rois[g];
      const RoiWindow<T>& win = plan.windows[k];
      const LevelPlanes<const S>& lv = levels[plan.roi_level[k]];
      pool_roi_nhwc<S, T, kTaps>(lv.data + win.batch * lv.height * lv.width * channels, lv.width,
                                 channels, plan.y_taps.data() + plan.y_offset[k],
                                 plan.x_taps.data() + plan.x_offset[k], win.grid_h, win.grid_w,
                                 pooled_h, pooled_w, sums.data());
      S* roi_out = out + k * channels * bins;
      for (int64_t c = 0; c < channels; ++c) {
        for (int64_t b = 0; b < bins; ++b) {
          roi_out[c * bins + b] = static_cast<S>(win.divide_by_count(sums[b * channels + c]));
        }
      }
    }
  });
}

constexpr int64_t kNhwcChannelBlock = 64;  // channels per backward task: 4 cache lines of floats

// dst[c] += grad[c] * weight / count for c < n, in scatter_gradient's order of operations.
template <typename T>
inline void scatter_sample_tap(T* __restrict dst, const T* __restrict grad, int64_t n, T weight,
                               const CountDivisor<T>& divide_by_count) {
  if (divide_by_count.exact_inverse) {
    const T inverse = divide_by_count.inverse;
    for (int64_t c = 0; c < n; ++c) dst[c] += (grad[c] * weight) * inverse;
  } else {
    const T count = divide_by_count.count;
    for (int64_t c = 0; c < n; ++c) dst[c] += (grad[c] * weight) / count;
  }
}

// levels: the zeroed NHWC input gradients; grad_out: [K, C, PH, PW], contiguous.
template <typename T, int kTaps>
void pool_backward_nhwc(const SamplingPlan<T, kTaps>& plan,
                        const std::vector<LevelPlanes<T>>& levels, int64_t batch_size,
                        int64_t channels, int pooled_h, int pooled_w, const T* grad_out) {
  const int64_t bins = static_cast<int64_t>(pooled_h) * pooled_w;
  const int64_t num_groups = static_cast<int64_t>(levels.size()) * batch_size;
  const int64_t num_blocks = (channels + kNhwcChannelBlock - 1) / kNhwcChannelBlock;
  const int64_t num_tasks = num_groups * num_blocks;
  std::atomic<int64_t> next_task{0};
  at::parallel_for(0, threads_for(plan.num_samples * channels), 1, [&](int64_t, int64_t) {
    std::vector<T> bin_grads(bins * std::min(channels, kNhwcChannelBlock));
    for (int64_t task = next_task++; task < num_tasks; task = next_task++) {
      const int64_t group = task / num_blocks;
      if (plan.group_start[group] == plan.group_start[group + 1]) continue;
      const LevelPlanes<T>& lv = levels[group / batch_size];
      const int64_t first_channel = (task % num_blocks) * kNhwcChannelBlock;
      const int64_t n = std::min(kNhwcChannelBlock, channels - first_channel);
      T* image = lv.data + (group % batch_size) * lv.height * lv.width * channels + first_channel;
      for (int64_t g = plan.group_start[group]; g < plan.group_start[group + 1]; ++g) {
        const int64_t k = plan.grouped_rois[g];
        const RoiWindow<T>& win = plan.windows[k];
        if (win.grid_h <= 0 || win.grid_w <= 0) continue;  // no samples, no gradient
        // This RoI's incoming gradient for the block, transposed to [bins, n].
        const T* src = grad_out + (k * channels + first_channel) * bins;
        for (int64_t c = 0; c < n; ++c) {
          for (int64_t b = 0; b < bins; ++b) bin_grads[b * n + c] = src[c * bins + b];
        }
        const AxisTaps<T, kTaps>* ty = plan.y_taps.data() + plan.y_offset[k];
        const AxisTaps<T, kTaps>* tx = plan.x_taps.data() + plan.x_offset[k];
        for (int ph = 0; ph < pooled_h; ++ph) {
          for (int pw = 0; pw < pooled_w; ++pw) {
            const T* grad = bin_grads.data() + (ph * pooled_w + pw) * n;
            for (int iy = 0; iy < win.grid_h; ++iy) {
              const AxisTaps<T, kTaps>& row = ty[ph * win.grid_h + iy];
              if (!row.valid) continue;
              for (int ix = 0; ix < win.grid_w; ++ix) {
                const AxisTaps<T, kTaps>& col = tx[pw * win.grid_w + ix];
                if (!col.valid) continue;
                for (int i = 0; i < kTaps; ++i) {
                  T* pixel_row = image + row.index[i] * lv.width * channels;
                  for (int j = 0; j < kTaps; ++j) {
                    scatter_sample_tap(pixel_row + col.index[j] * channels, grad, n,
                                       row.weight[i] * col.weight[j], win.divide_by_count);
                  }
                }
              }
            }
          }
        }
      }
    }
  });
}

}  // namespace cpu
}  // namespace maskrcnn_ops
