// Vectorised float32 forward and backward loops of the CPU RoIAlign engine (roi_align_cpu.h).
//
// A sample's taps are kTaps x kTaps values: kTaps rows, and in each row kTaps columns that are
// consecutive (x, x+1 for bilinear; x-1 .. x+2 for bicubic) except where the border clamps them.
// Folding the weights of clamped taps onto the border column makes every sample read one window
// of kTaps consecutive columns per row, so a sample becomes a few 4-wide vector loads and
// multiplies instead of 4 (or 16) scalar gathers. The taps and weights are ops_math.h's
// (axis_taps). Bilinear keeps torchvision's products and order of additions, so its results stay
// bit-identical (folding only moves exact zeros); bicubic sums the lanes per bin, which differs
// from the generic path by float rounding.
#pragma once

#include <algorithm>
#include <cstring>
#include <vector>

#include "roi_align_cpu.h"

namespace maskrcnn_ops {
namespace cpu {

// GCC/Clang vector extension: 4 floats, SSE on x86-64, NEON on arm64.
using f32x4 = float __attribute__((vector_size(16)));

inline f32x4 load_f32x4(const float* p) {
  f32x4 v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}

// {a[0], a[1], b[0], b[1]}: a bilinear sample's four taps, two from each row.
// Built from two 64-bit loads (as doubles, which is only a bit pattern here): assembling the
// vector in memory instead would stall on store forwarding.
inline f32x4 load_pairs(const float* a, const float* b) {
  using f64x2 = double __attribute__((vector_size(16)));
  double low, high;
  std::memcpy(&low, a, sizeof(low));
  std::memcpy(&high, b, sizeof(high));
  return reinterpret_cast<f32x4>(f64x2{low, high});
}

inline void store_f32x4(float* p, f32x4 v) { std::memcpy(p, &v, sizeof(v)); }

// a[0..1] += v[0..1]; b[0..1] += v[2..3], in that order (a and b may be the same row).
inline void add_pairs(float* a, float* b, f32x4 v) {
  using f64x2 = double __attribute__((vector_size(16)));
  const f32x4 old_a = load_pairs(a, a);
  const f64x2 sum_a = reinterpret_cast<f64x2>(old_a + v);
  std::memcpy(a, &sum_a[0], 2 * sizeof(float));
  const f32x4 old_b = load_pairs(b, b);
  const f64x2 sum_b = reinterpret_cast<f64x2>(old_b + v);
  std::memcpy(b, &sum_b[1], 2 * sizeof(float));
}

inline float lane_sum(f32x4 v) { return (v[0] + v[1]) + (v[2] + v[3]); }

// A sample column's x taps as a window of kTaps columns from `start`, with the weights of taps
// clamped onto the same column summed. Kept small (16 or 24 bytes): the windows of all RoIs are
// re-read for every channel, so they should stay in cache next to the feature plane.
template <int kTaps>
struct ColumnWindow {
  float weight[kTaps];
  int start;  // -1: the sample column is outside the map
};

// Needs width >= kTaps so that the window fits in the row.
template <int kTaps>
ColumnWindow<kTaps> column_window(const AxisTaps<float, kTaps>& taps, int64_t width) {
  ColumnWindow<kTaps> window{};
  window.start = -1;
  if (!taps.valid) return window;
  window.start = std::min(taps.index[0], static_cast<int>(width) - kTaps);
  for (int k = 0; k < kTaps; ++k) window.weight[taps.index[k] - window.start] += taps.weight[k];
  return window;
}

// The window's weights in the lane order of the sample vector: bilinear {w0, w1, w0, w1}
// (matching load_pairs), bicubic {w0, w1, w2, w3}.
template <int kTaps>
inline f32x4 column_lanes(const ColumnWindow<kTaps>& window) {
  if constexpr (kTaps == 2) {
    using f64x2 = double __attribute__((vector_size(16)));
    double pair;
    std::memcpy(&pair, window.weight, sizeof(pair));
    return reinterpret_cast<f32x4>(f64x2{pair, pair});
  } else {
    return load_f32x4(window.weight);
  }
}

constexpr int kMaxVectorBins = 32;  // widest output row of the vectorised path

// Pools one RoI from one float plane (cf. pool_roi_plane), one row of bins at a time: each sample
// row's plane rows and weights are set up once and swept across all the bins of the row. O is the
// output storage type (float, or float16/bfloat16 for reduced-precision features).
template <int kTaps, typename O>
inline void pool_roi_plane_f32(const float* __restrict plane, int64_t width,
                               const AxisTaps<float, kTaps>* __restrict ty,
                               const ColumnWindow<kTaps>* __restrict tx, int grid_h, int grid_w,
                               const CountDivisor<float>& divide_by_count, int pooled_h,
                               int pooled_w, O* __restrict out) {
  f32x4 bin_sums[kMaxVectorBins];
  const int samples_per_row = pooled_w * grid_w;
  for (int ph = 0; ph < pooled_h; ++ph) {
    for (int pw = 0; pw < pooled_w; ++pw) bin_sums[pw] = f32x4{0, 0, 0, 0};
    for (int iy = 0; iy < grid_h; ++iy) {
      const AxisTaps<float, kTaps>& row = ty[ph * grid_h + iy];
      if (!row.valid) continue;
      const float* row_ptr[kTaps];
      for (int i = 0; i < kTaps; ++i) row_ptr[i] = plane + row.index[i] * width;
      const f32x4 pair_lanes = {row.weight[0], row.weight[0], row.weight[1], row.weight[1]};
      for (int s = 0, pw = 0; s < samples_per_row; s += grid_w, ++pw) {
        f32x4 sum = bin_sums[pw];
        for (int ix = s; ix < s + grid_w; ++ix) {
          const ColumnWindow<kTaps>& col = tx[ix];
          if (col.start < 0) continue;
          const f32x4 lanes = column_lanes(col);
          if constexpr (kTaps == 2) {
            // torchvision's w1*v1 + w2*v2 + w3*v3 + w4*v4, added in its order: bit-identical.
            const f32x4 taps =
                (pair_lanes * lanes) * load_pairs(row_ptr[0] + col.start, row_ptr[1] + col.start);
            sum[0] += ((taps[0] + taps[1]) + taps[2]) + taps[3];
          } else {
            for (int i = 0; i < kTaps; ++i) {
              sum += (row.weight[i] * lanes) * load_f32x4(row_ptr[i] + col.start);
            }
          }
        }
        bin_sums[pw] = sum;
      }
    }
    for (int pw = 0; pw < pooled_w; ++pw) {
      // Bilinear sums went to lane 0 only (the others stay 0), in sample order.
      out[ph * pooled_w + pw] = static_cast<O>(
          divide_by_count(kTaps == 2 ? bin_sums[pw][0] : lane_sum(bin_sums[pw])));
    }
  }
}

// Whether the vectorised paths apply: every level wide enough for the column windows, and an
// output row that fits the bin accumulators.
template <typename P>
bool fits_column_windows(const std::vector<LevelPlanes<P>>& levels, int taps, int pooled_w) {
  return pooled_w <= kMaxVectorBins &&
         std::all_of(levels.begin(), levels.end(),
                     [taps](const LevelPlanes<P>& lv) { return lv.width >= taps; });
}

// The column windows of every RoI's sample columns, from the plan's x taps.
template <int kTaps, typename P>
std::vector<ColumnWindow<kTaps>> column_windows(const SamplingPlan<float, kTaps>& plan,
                                                const std::vector<LevelPlanes<P>>& levels,
                                                int64_t batch_size) {
  const int64_t num_groups = static_cast<int64_t>(plan.group_start.size()) - 1;
  std::vector<ColumnWindow<kTaps>> windows(plan.x_taps.size());
  for (int64_t group = 0; group < num_groups; ++group) {  // serial: cheap, see make_sampling_plan
    const int64_t width = levels[group / batch_size].width;
    for (int64_t g = plan.group_start[group]; g < plan.group_start[group + 1]; ++g) {
      const int64_t k = plan.grouped_rois[g];
      for (int64_t t = plan.x_offset[k]; t < plan.x_offset[k + 1]; ++t) {
        windows[t] = column_window<kTaps>(plan.x_taps[t], width);
      }
    }
  }
  return windows;
}

// Asks for a whole plane ahead of the scattered accesses of its RoIs: a plane comes from main
// memory, and fetching it in order is faster than missing on every sample. Only for planes that
// fit in the L2 cache and that several RoIs share (a large plane read by one small RoI, like a
// full-image mask, would be fetched mostly for nothing).
template <int kForWriting>
inline void prefetch_plane(const float* plane, int64_t size, int64_t num_rois) {
  constexpr int64_t kMaxPrefetchBytes = 512 * 1024;
  constexpr int64_t kMinRois = 4;
  if (size * static_cast<int64_t>(sizeof(float)) > kMaxPrefetchBytes || num_rois < kMinRois) {
    return;
  }
  for (int64_t i = 0; i < size; i += 64 / sizeof(float)) {
    __builtin_prefetch(plane + i, kForWriting, 2);
  }
}

// pool_forward for float32 computation (features stored as S: float, float16 or bfloat16), where
// fits_column_windows.
template <int kTaps, typename S>
void pool_forward_f32(const SamplingPlan<float, kTaps>& plan,
                      const std::vector<LevelPlanes<const S>>& levels, int64_t batch_size,
                      int64_t channels, int pooled_h, int pooled_w, S* out) {
  const auto windows = column_windows(plan, levels, batch_size);
  const int64_t bins = static_cast<int64_t>(pooled_h) * pooled_w;
  for_each_plane(
      plan, levels.size(), batch_size, channels,
      [&](int64_t group, int64_t level, int64_t batch, int64_t channel) {
        const LevelPlanes<const S>& lv = levels[level];
        const int64_t size = lv.height * lv.width;
        const S* stored = lv.data + (batch * channels + channel) * size;
        if constexpr (std::is_same_v<S, float>) {
          prefetch_plane</*kForWriting=*/0>(stored, size,
                                             plan.group_start[group + 1] - plan.group_start[group]);
        }
        const float* plane = plane_as<float>(stored, size);
        for (int64_t g = plan.group_start[group]; g < plan.group_start[group + 1]; ++g) {
          const int64_t k = plan.grouped_rois[g];
          const RoiWindow<float>& win = plan.windows[k];
          pool_roi_plane_f32<kTaps, S>(plane, lv.width, plan.y_taps.data() + plan.y_offset[k],
                                    windows.data() + plan.x_offset[k], win.grid_h, win.grid_w,
                                    win.divide_by_count, pooled_h, pooled_w,
                                    out + (k * channels + channel) * bins);
        }
      });
}

// The gradient of pool_roi_plane_f32 for one RoI and plane: each sample's taps receive
// grad * (wy * wx) / count, as scatter_gradient does, a window row per vector read-modify-write.
// Bilinear taps are added in scatter_gradient's order, so the result is bit-identical.
template <int kTaps>
inline void unpool_roi_plane_f32(float* __restrict plane, int64_t width,
                                 const AxisTaps<float, kTaps>* __restrict ty,
                                 const ColumnWindow<kTaps>* __restrict tx, int grid_h, int grid_w,
                                 const CountDivisor<float>& divide_by_count, int pooled_h,
                                 int pooled_w, const float* __restrict grad) {
  const f32x4 count = {divide_by_count.count, divide_by_count.count, divide_by_count.count,
                       divide_by_count.count};
  const f32x4 inverse = {divide_by_count.inverse, divide_by_count.inverse,
                         divide_by_count.inverse, divide_by_count.inverse};
  const bool exact_inverse = divide_by_count.exact_inverse;
  // Bins, then samples, then taps: the order in which torchvision accumulates overlapping taps.
  for (int ph = 0; ph < pooled_h; ++ph) {
    for (int pw = 0; pw < pooled_w; ++pw) {
      const float bin_grad = grad[ph * pooled_w + pw];
      for (int iy = ph * grid_h; iy < (ph + 1) * grid_h; ++iy) {
        const AxisTaps<float, kTaps>& row = ty[iy];
        if (!row.valid) continue;
        float* row_ptr[kTaps];
        for (int i = 0; i < kTaps; ++i) row_ptr[i] = plane + row.index[i] * width;
        const f32x4 pair_lanes = {row.weight[0], row.weight[0], row.weight[1], row.weight[1]};
        for (int ix = pw * grid_w; ix < (pw + 1) * grid_w; ++ix) {
          const ColumnWindow<kTaps>& col = tx[ix];
          if (col.start < 0) continue;
          const f32x4 lanes = column_lanes(col);
          if constexpr (kTaps == 2) {
            f32x4 taps = bin_grad * (pair_lanes * lanes);
            taps = exact_inverse ? taps * inverse : taps / count;
            add_pairs(row_ptr[0] + col.start, row_ptr[1] + col.start, taps);
          } else {
            for (int i = 0; i < kTaps; ++i) {
              f32x4 taps = bin_grad * (row.weight[i] * lanes);
              taps = exact_inverse ? taps * inverse : taps / count;
              float* dst = row_ptr[i] + col.start;
              store_f32x4(dst, load_f32x4(dst) + taps);
            }
          }
        }
      }
    }
  }
}

// pool_backward for float32 gradients, where fits_column_windows.
template <int kTaps>
void pool_backward_f32(const SamplingPlan<float, kTaps>& plan,
                       const std::vector<LevelPlanes<float>>& levels, int64_t batch_size,
                       int64_t channels, int pooled_h, int pooled_w, const float* grad_out) {
  const auto windows = column_windows(plan, levels, batch_size);
  const int64_t bins = static_cast<int64_t>(pooled_h) * pooled_w;
  for_each_plane(
      plan, levels.size(), batch_size, channels,
      [&](int64_t group, int64_t level, int64_t batch, int64_t channel) {
        const LevelPlanes<float>& lv = levels[level];
        float* plane = lv.data + (batch * channels + channel) * lv.height * lv.width;
        prefetch_plane</*kForWriting=*/1>(plane, lv.height * lv.width,
                                           plan.group_start[group + 1] - plan.group_start[group]);
        for (int64_t g = plan.group_start[group]; g < plan.group_start[group + 1]; ++g) {
          const int64_t k = plan.grouped_rois[g];
          const RoiWindow<float>& win = plan.windows[k];
          unpool_roi_plane_f32<kTaps>(plane, lv.width, plan.y_taps.data() + plan.y_offset[k],
                                      windows.data() + plan.x_offset[k], win.grid_h, win.grid_w,
                                      win.divide_by_count, pooled_h, pooled_w,
                                      grad_out + (k * channels + channel) * bins);
        }
      });
}

}  // namespace cpu
}  // namespace maskrcnn_ops
