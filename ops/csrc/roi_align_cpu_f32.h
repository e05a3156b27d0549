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

#include "cpu_memory.h"
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

// Bicubic: pools one RoI from one float plane (cf. pool_roi_plane), one row of bins at a time:
// each sample row's plane rows and weights are set up once and swept across all the bins of the
// row, a window row per 4-wide vector. O is the output storage type (float, or float16/bfloat16
// for reduced-precision features). Bilinear takes pool_roi_plane_bilinear below.
template <typename O>
inline void pool_roi_plane_bicubic(const float* __restrict plane, int64_t width,
                                   const AxisTaps<float, 4>* __restrict ty,
                                   const ColumnWindow<4>* __restrict tx, int grid_h, int grid_w,
                                   const CountDivisor<float>& divide_by_count, int pooled_h,
                                   int pooled_w, O* __restrict out) {
  f32x4 bin_sums[kMaxVectorBins];
  const int samples_per_row = pooled_w * grid_w;
  for (int ph = 0; ph < pooled_h; ++ph) {
    for (int pw = 0; pw < pooled_w; ++pw) bin_sums[pw] = f32x4{0, 0, 0, 0};
    for (int iy = 0; iy < grid_h; ++iy) {
      const AxisTaps<float, 4>& row = ty[ph * grid_h + iy];
      if (!row.valid) continue;
      const float* row_ptr[4];
      for (int i = 0; i < 4; ++i) row_ptr[i] = plane + row.index[i] * width;
      for (int s = 0, pw = 0; s < samples_per_row; s += grid_w, ++pw) {
        f32x4 sum = bin_sums[pw];
        for (int ix = s; ix < s + grid_w; ++ix) {
          const ColumnWindow<4>& col = tx[ix];
          if (col.start < 0) continue;
          const f32x4 lanes = column_lanes(col);
          for (int i = 0; i < 4; ++i) {
            sum += (row.weight[i] * lanes) * load_f32x4(row_ptr[i] + col.start);
          }
        }
        bin_sums[pw] = sum;
      }
    }
    for (int pw = 0; pw < pooled_w; ++pw) {
      out[ph * pooled_w + pw] = static_cast<O>(divide_by_count(lane_sum(bin_sums[pw])));
    }
  }
}

// Bilinear pooling vectorised across bins: the four lanes are four neighbouring bins of an output
// row, at the same sample of each bin. A lane computes exactly torchvision's sample value,
// ((w1*v1 + w2*v2) + w3*v3) + w4*v4, and adds the samples of its bin in torchvision's order, so
// the result stays bit-identical, while no horizontal sums are needed: each sample costs a
// quarter of eight pair loads, four shuffles and eight vector products and sums.
//
// A ColumnQuad holds the column windows of one sample column (ix) of four neighbouring bins.
// Sample columns outside the map read a static zero pair with zero weights (in RoIs flagged as
// having such columns), so they add nothing, as the skipped samples of the generic path. Lanes
// past the row's last bin read column 0 with zero weights and are never stored.
struct ColumnQuad {
  f32x4 weight0;  // weight of column `start`, per lane
  f32x4 weight1;  // weight of column `start + 1`
  int start[4];   // -1: the lane's sample column is outside the map
};

inline int quads_per_row(int pooled_w) { return (pooled_w + 3) / 4; }

// Every RoI's column quads (quads[offset[k] ..], quads_per_row x grid_w of them, row-major),
// and for each RoI whether all its lanes lie on the map.
struct QuadPlan {
  std::vector<ColumnQuad> quads;
  std::vector<int64_t> offset;
  std::vector<char> all_on_map;
  std::vector<int> first_column;  // the columns RoI k reads: first_column[k] .. last_column[k]
  std::vector<int> last_column;
};

template <typename P>
QuadPlan column_quads(const SamplingPlan<float, 2>& plan,
                      const std::vector<LevelPlanes<P>>& levels, int pooled_w) {
  const int64_t num_rois = static_cast<int64_t>(plan.windows.size());
  const int num_quads = quads_per_row(pooled_w);
  QuadPlan qp;
  qp.offset.resize(num_rois + 1, 0);
  qp.all_on_map.resize(num_rois, 1);
  qp.first_column.resize(num_rois, 0);
  qp.last_column.resize(num_rois, -1);
  for (int64_t k = 0; k < num_rois; ++k) {
    qp.offset[k + 1] = qp.offset[k] + num_quads * std::max(plan.windows[k].grid_w, 0);
  }
  qp.quads.resize(qp.offset[num_rois]);
  for (int64_t k = 0; k < num_rois; ++k) {  // serial: cheap, see make_sampling_plan
    const int grid_w = plan.windows[k].grid_w;
    const int64_t width = levels[plan.roi_level[k]].width;
    const AxisTaps<float, 2>* tx = plan.x_taps.data() + plan.x_offset[k];
    for (int q = 0; q < num_quads; ++q) {
      for (int ix = 0; ix < grid_w; ++ix) {
        ColumnQuad& quad = qp.quads[qp.offset[k] + q * grid_w + ix];
        for (int lane = 0; lane < 4; ++lane) {
          const int pw = 4 * q + lane;
          ColumnWindow<2> window{};  // past the last bin: column 0, weight 0, never stored
          if (pw < pooled_w) window = column_window<2>(tx[pw * grid_w + ix], width);
          if (window.start < 0) qp.all_on_map[k] = 0;
          if (pw < pooled_w && window.start >= 0) {
            const bool first = qp.last_column[k] < 0;
            qp.first_column[k] = first ? window.start : std::min(qp.first_column[k], window.start);
            qp.last_column[k] = std::max(qp.last_column[k], window.start + 1);
          }
          quad.weight0[lane] = window.weight[0];
          quad.weight1[lane] = window.weight[1];
          quad.start[lane] = window.start;
        }
      }
    }
  }
  return qp;
}

template <int kLane>
inline f32x4 lane_of_pair(f32x4 a, f32x4 b) {
  return __builtin_shufflevector(a, b, kLane, kLane + 2, kLane + 4, kLane + 6);
}

// Asks for the rows of a RoI's window (its sample rows, first to last column) ahead of pooling
// it: issued for the next RoI while the current one is pooled, the plane reads of a RoI then
// mostly hit the L1 cache instead of waiting on the L2 cache one sample at a time.
inline void prefetch_roi_window(const float* plane, int64_t width, const AxisTaps<float, 2>* ty,
                                int num_rows, int first_column, int last_column) {
  constexpr int kFloatsPerLine = 64 / sizeof(float);
  int previous = -1;
  for (int r = 0; r < num_rows; ++r) {
    if (!ty[r].valid) continue;
    for (int tap = 0; tap < 2; ++tap) {
      const int y = ty[r].index[tap];
      if (y == previous) continue;
      previous = y;
      const float* row = plane + y * width;
      for (int x = first_column; x <= last_column; x += kFloatsPerLine) {
        __builtin_prefetch(row + x, 0, 3);
      }
      __builtin_prefetch(row + last_column, 0, 3);
    }
  }
}

// Not inlined: inside the plane loop's lambda the compiler ran out of registers and spilled the
// lane offsets to the stack on every sample; on its own it keeps them in registers.
template <bool kAllOnMap, typename O>
__attribute__((noinline)) void pool_roi_plane_bilinear(const float* __restrict plane, int64_t width,
                                    const AxisTaps<float, 2>* __restrict ty,
                                    const ColumnQuad* __restrict quads, int grid_h, int grid_w,
                                    const CountDivisor<float>& divide_by_count, int pooled_h,
                                    int pooled_w, O* __restrict out) {
  alignas(16) static const float kZeroPair[2] = {0.0f, 0.0f};
  const int num_quads = quads_per_row(pooled_w);
  for (int ph = 0; ph < pooled_h; ++ph) {
    for (int q = 0; q < num_quads; ++q) {
      const ColumnQuad* cq = quads + q * grid_w;
      f32x4 sum = {0, 0, 0, 0};
      for (int iy = ph * grid_h; iy < (ph + 1) * grid_h; ++iy) {
        const AxisTaps<float, 2>& row = ty[iy];
        if (!row.valid) continue;
        const float* low = plane + row.index[0] * width;
        const float* high = plane + row.index[1] * width;
        const float hy = row.weight[0], ly = row.weight[1];
        for (int ix = 0; ix < grid_w; ++ix) {
          const ColumnQuad& c = cq[ix];
          f32x4 low01, low23, high01, high23;
          if constexpr (kAllOnMap) {
            const int s0 = c.start[0], s1 = c.start[1], s2 = c.start[2], s3 = c.start[3];
            low01 = load_pairs(low + s0, low + s1);
            high01 = load_pairs(high + s0, high + s1);
            low23 = load_pairs(low + s2, low + s3);
            high23 = load_pairs(high + s2, high + s3);
          } else {
            const float* a[4];
            const float* b[4];
            for (int lane = 0; lane < 4; ++lane) {
              a[lane] = c.start[lane] < 0 ? kZeroPair : low + c.start[lane];
              b[lane] = c.start[lane] < 0 ? kZeroPair : high + c.start[lane];
            }
            low01 = load_pairs(a[0], a[1]);
            low23 = load_pairs(a[2], a[3]);
            high01 = load_pairs(b[0], b[1]);
            high23 = load_pairs(b[2], b[3]);
          }
          const f32x4 v1 = lane_of_pair<0>(low01, low23), v2 = lane_of_pair<1>(low01, low23);
          const f32x4 v3 = lane_of_pair<0>(high01, high23), v4 = lane_of_pair<1>(high01, high23);
          // torchvision's w1 = hy * hx, w2 = hy * lx, w3 = ly * hx, w4 = ly * lx.
          f32x4 value = (hy * c.weight0) * v1 + (hy * c.weight1) * v2;
          value = value + (ly * c.weight0) * v3;
          value = value + (ly * c.weight1) * v4;
          sum += value;
        }
      }
      const int lanes = std::min(4, pooled_w - 4 * q);
      for (int lane = 0; lane < lanes; ++lane) {
        out[ph * pooled_w + 4 * q + lane] = static_cast<O>(divide_by_count(sum[lane]));
      }
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

// The cache fetches around pooling `task`'s plane (see PlaneStream): the plane itself, whole, if
// it is its thread's first (no earlier plane streamed it in), and the stream of `next`'s plane
// over `task`'s RoIs.
template <int kForWriting, int kTaps, typename P>
PlaneStream<kForWriting> stream_planes(const SamplingPlan<float, kTaps>& plan,
                                       const std::vector<LevelPlanes<P>>& levels,
                                       int64_t channels, const PlaneTask& task,
                                       const PlaneTask* next) {
  const int64_t num_rois = rois_of(plan, task);
  if (task.first) {
    const LevelPlanes<P>& lv = levels[task.level];
    PlaneStream<kForWriting>(plane_data(levels, task, channels), lv.height * lv.width, num_rois, 1)
        .step();
  }
  if (next == nullptr) return {};
  const LevelPlanes<P>& next_lv = levels[next->level];
  return PlaneStream<kForWriting>(plane_data(levels, *next, channels),
                                  next_lv.height * next_lv.width, rois_of(plan, *next), num_rois);
}

// pool_forward for float32 computation (features stored as S: float, float16 or bfloat16), where
// fits_column_windows.
template <int kTaps, typename S>
void pool_forward_f32(const SamplingPlan<float, kTaps>& plan,
                      const std::vector<LevelPlanes<const S>>& levels, int64_t batch_size,
                      int64_t channels, int pooled_h, int pooled_w, S* out) {
  // Bilinear takes the across-bins loop (column quads); bicubic the per-sample window loop.
  QuadPlan quad_plan;
  std::vector<ColumnWindow<kTaps>> windows;
  if constexpr (kTaps == 2) {
    quad_plan = column_quads(plan, levels, pooled_w);
  } else {
    windows = column_windows(plan, levels, batch_size);
  }
  const int64_t bins = static_cast<int64_t>(pooled_h) * pooled_w;
  for_each_plane(
      plan, levels.size(), batch_size, channels,
      [&](const PlaneTask& task, const PlaneTask* next) {
        const LevelPlanes<const S>& lv = levels[task.level];
        const int64_t size = lv.height * lv.width;
        const S* stored = plane_data(levels, task, channels);
        PlaneStream</*kForWriting=*/0> next_stream;
        if constexpr (std::is_same_v<S, float>) {  // reduced-precision planes are copied in order
          next_stream = stream_planes<0>(plan, levels, channels, task, next);
        }
        const float* plane = plane_as<float>(stored, size);
        for (int64_t g = plan.group_start[task.group]; g < plan.group_start[task.group + 1];
             ++g) {
          next_stream.step();
          const int64_t k = plan.grouped_rois[g];
          const RoiWindow<float>& win = plan.windows[k];
          const AxisTaps<float, kTaps>* ty = plan.y_taps.data() + plan.y_offset[k];
          S* roi_out = out + (k * channels + task.channel) * bins;
          if constexpr (kTaps == 2) {
            if (g + 1 < plan.group_start[task.group + 1]) {
              const int64_t after = plan.grouped_rois[g + 1];
              prefetch_roi_window(plane, lv.width, plan.y_taps.data() + plan.y_offset[after],
                                  static_cast<int>(plan.y_offset[after + 1] - plan.y_offset[after]),
                                  quad_plan.first_column[after], quad_plan.last_column[after]);
            }
            const ColumnQuad* quads = quad_plan.quads.data() + quad_plan.offset[k];
            if (quad_plan.all_on_map[k]) {
              pool_roi_plane_bilinear<true, S>(plane, lv.width, ty, quads, win.grid_h,
                                               win.grid_w, win.divide_by_count, pooled_h,
                                               pooled_w, roi_out);
            } else {
              pool_roi_plane_bilinear<false, S>(plane, lv.width, ty, quads, win.grid_h,
                                                win.grid_w, win.divide_by_count, pooled_h,
                                                pooled_w, roi_out);
            }
          } else {
            pool_roi_plane_bicubic<S>(plane, lv.width, ty, windows.data() + plan.x_offset[k],
                                      win.grid_h, win.grid_w, win.divide_by_count, pooled_h,
                                      pooled_w, roi_out);
          }
        }
      });
}

// The gradient of the forward loops for one RoI and plane: each sample's taps receive
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
      [&](const PlaneTask& task, const PlaneTask* next) {
        const LevelPlanes<float>& lv = levels[task.level];
        float* plane = plane_data(levels, task, channels);
        auto next_stream = stream_planes</*kForWriting=*/1>(plan, levels, channels, task, next);
        for (int64_t g = plan.group_start[task.group]; g < plan.group_start[task.group + 1];
             ++g) {
          next_stream.step();
          const int64_t k = plan.grouped_rois[g];
          const RoiWindow<float>& win = plan.windows[k];
          unpool_roi_plane_f32<kTaps>(plane, lv.width, plan.y_taps.data() + plan.y_offset[k],
                                      windows.data() + plan.x_offset[k], win.grid_h, win.grid_w,
                                      win.divide_by_count, pooled_h, pooled_w,
                                      grad_out + (k * channels + task.channel) * bins);
        }
      });
}

}  // namespace cpu
}  // namespace maskrcnn_ops
