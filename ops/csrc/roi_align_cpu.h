// CPU RoIAlign engine shared by roi_align (one level) and multilevel_roi_align (FPN levels).
//
// Layout decisions, all for speed on NCHW features:
//  * A RoI's sample positions and interpolation weights depend only on the RoI, so they are
//    computed once (a SamplingPlan) and reused for every channel. Bilinear sampling is separable,
//    so the plan stores taps per sample row and per sample column (O(PH*grid + PW*grid) per RoI)
//    rather than per 2-D sample; the plan of ~1000 RoIs then fits in the L2 cache.
//  * Work is split over feature planes (level, image, channel): a task pools every RoI that reads
//    its plane, so the plane (a few hundred KB) stays in cache while ~500 RoIs read from it, where a
//    RoI-major loop streams the whole feature map through the cache once per RoI.
//  * Each plane is owned by exactly one task, so the backward pass accumulates into the gradient
//    without atomics or per-thread buffers, and, within a plane, in increasing RoI order (the order
//    of torchvision's sequential kernel).
//  * One parallel region per call, threads taking planes from a shared counter (see
//    for_each_plane); the small per-RoI set-up stays serial.
//  * Computation is in T, float32 (or float64 for float64 features). float16 and bfloat16 are
//    storage only: a plane is converted to float32 once, in the task that owns it, and pooled by
//    the float32 loops; the backward pass accumulates in float32 (the caller casts once at the
//    end).
// This file is the generic engine (any dtype, any map size); float32 computation takes the
// vectorised loops of roi_align_cpu_f32.h where they apply, and channels-last features the loops
// of roi_align_cpu_nhwc.h.
#pragma once

#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>
#include <type_traits>
#include <vector>

#include "op_checks.h"
#include "ops_math.h"

namespace maskrcnn_ops {
namespace cpu {

// One feature level (or its gradient) as the engine sees it: contiguous [N, C, H, W] data, or
// [N, H, W, C] for the channels-last kernels.
template <typename P>
struct LevelPlanes {
  P* data;
  int64_t height;
  int64_t width;
  double spatial_scale;
};

template <typename T, int kTaps>
struct SamplingPlan {
  std::vector<RoiWindow<T>> windows;
  std::vector<int> roi_level;  // RoI k's level
  std::vector<int64_t> y_offset;  // RoI k's sample-row taps: y_taps[y_offset[k] ..]
  std::vector<int64_t> x_offset;
  std::vector<AxisTaps<T, kTaps>> y_taps;  // PH * grid_h per RoI, bin-major
  std::vector<AxisTaps<T, kTaps>> x_taps;  // PW * grid_w per RoI
  std::vector<int64_t> group_start;        // RoIs of group g = level * N + batch ...
  std::vector<int64_t> grouped_rois;       // ... are grouped_rois[group_start[g] .. g + 1],
                                           // in increasing order (torchvision's accumulation order)
  int64_t num_samples = 0;                 // 2-D samples of all RoIs, per channel
};

// Threads worth waking for `work` sample evaluations (samples x channels). Waking a thread costs
// microseconds on an idle machine and up to a scheduler time slice on a loaded one, so small
// calls (a few RoIs, a test's maps) stay on the calling thread.
inline int64_t threads_for(int64_t work) {
  constexpr int64_t kMinWorkPerThread = 1 << 18;  // ~0.2 ms of pooling
  return std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), work / kMinWorkPerThread));
}

// `roi_levels` may be null (everything on level 0).
template <typename T, int kTaps, typename P>
SamplingPlan<T, kTaps> make_sampling_plan(const T* rois, const int64_t* roi_levels,
                                          int64_t num_rois,
                                          const std::vector<LevelPlanes<P>>& levels,
                                          int64_t batch_size, int pooled_h, int pooled_w,
                                          int sampling_ratio, bool aligned) {
  SamplingPlan<T, kTaps> plan;
  const int64_t num_levels = static_cast<int64_t>(levels.size());
  plan.windows.resize(num_rois);
  plan.roi_level.resize(num_rois);
  plan.y_offset.resize(num_rois + 1, 0);
  plan.x_offset.resize(num_rois + 1, 0);
  std::vector<int64_t> group_of(num_rois);
  for (int64_t k = 0; k < num_rois; ++k) {
    const T* roi = rois + 5 * k;
    const int64_t level = roi_levels != nullptr ? roi_levels[k] : 0;
    TORCH_CHECK(level >= 0 && level < num_levels, "RoI ", k, " maps to level ", level,
                " but there are ", num_levels, " levels");
    // Checked before the cast to int, which is undefined for out-of-range values.
    TORCH_CHECK(roi[0] >= 0 && roi[0] < static_cast<T>(batch_size), "RoI ", k,
                " has batch index ", roi[0], " outside [0, ", batch_size, ")");
    const RoiWindow<T> win = roi_window<T>(roi, static_cast<T>(levels[level].spatial_scale),
                                           pooled_h, pooled_w, sampling_ratio, aligned);
    plan.windows[k] = win;
    plan.roi_level[k] = static_cast<int>(level);
    plan.y_offset[k + 1] = plan.y_offset[k] + pooled_h * std::max(win.grid_h, 0);
    plan.x_offset[k + 1] = plan.x_offset[k] + pooled_w * std::max(win.grid_w, 0);
    plan.num_samples += (plan.y_offset[k + 1] - plan.y_offset[k]) *
                        (plan.x_offset[k + 1] - plan.x_offset[k]);
    group_of[k] = level * batch_size + win.batch;
  }
  plan.y_taps.resize(plan.y_offset[num_rois]);
  plan.x_taps.resize(plan.x_offset[num_rois]);
  // Serial: a few taps per RoI is little work, and each parallel region costs a thread wake-up,
  // which on a loaded machine can take milliseconds.
  {
    for (int64_t k = 0; k < num_rois; ++k) {
      const RoiWindow<T>& win = plan.windows[k];
      const int64_t level = roi_levels != nullptr ? roi_levels[k] : 0;
      const int height = static_cast<int>(levels[level].height);
      const int width = static_cast<int>(levels[level].width);
      AxisTaps<T, kTaps>* ty = plan.y_taps.data() + plan.y_offset[k];
      for (int ph = 0; ph < pooled_h; ++ph) {
        for (int iy = 0; iy < win.grid_h; ++iy) {
          axis_taps(sample_coordinate(win.start_h, ph, win.bin_h, iy, win.grid_h), height,
                    ty[ph * win.grid_h + iy]);
        }
      }
      AxisTaps<T, kTaps>* tx = plan.x_taps.data() + plan.x_offset[k];
      for (int pw = 0; pw < pooled_w; ++pw) {
        for (int ix = 0; ix < win.grid_w; ++ix) {
          axis_taps(sample_coordinate(win.start_w, pw, win.bin_w, ix, win.grid_w), width,
                    tx[pw * win.grid_w + ix]);
        }
      }
    }
  }
  // Stable counting sort of the RoIs by (level, batch).
  const int64_t num_groups = num_levels * batch_size;
  plan.group_start.assign(num_groups + 1, 0);
  for (int64_t k = 0; k < num_rois; ++k) ++plan.group_start[group_of[k] + 1];
  for (int64_t g = 0; g < num_groups; ++g) plan.group_start[g + 1] += plan.group_start[g];
  std::vector<int64_t> fill(plan.group_start.begin(), plan.group_start.end() - 1);
  plan.grouped_rois.resize(num_rois);
  for (int64_t k = 0; k < num_rois; ++k) plan.grouped_rois[fill[group_of[k]]++] = k;
  return plan;
}

// One (level, image, channel) feature plane, as for_each_plane hands it out.
struct PlaneTask {
  int64_t group;  // level * batch_size + batch: the plane's RoIs are the plan's group
  int64_t level;
  int64_t batch;
  int64_t channel;
  bool first;  // the first plane of its thread: no earlier call could have prefetched it
};

// The RoIs of a plane's group.
template <typename T, int kTaps>
inline int64_t rois_of(const SamplingPlan<T, kTaps>& plan, const PlaneTask& task) {
  return plan.group_start[task.group + 1] - plan.group_start[task.group];
}

// The first value of `task`'s plane in `levels` (NCHW planes).
template <typename P>
inline P* plane_data(const std::vector<LevelPlanes<P>>& levels, const PlaneTask& task,
                     int64_t channels) {
  const LevelPlanes<P>& lv = levels[task.level];
  return lv.data + (task.batch * channels + task.channel) * lv.height * lv.width;
}

// Calls fn(task, next) for every (level, batch, channel) plane that some RoI reads, in parallel,
// each plane on exactly one thread. `next` is the plane the same thread pools after `task` (null
// after its last), claimed before `task` is pooled so that fn can prefetch it meanwhile. The
// threads claim planes one at a time from a shared counter rather than fixed halves of the list:
// on a loaded machine a thread that gets less CPU time then simply does fewer planes instead of
// holding everyone up at the end.
template <typename T, int kTaps, typename Fn>
void for_each_plane(const SamplingPlan<T, kTaps>& plan, int64_t num_levels, int64_t batch_size,
                    int64_t channels, Fn&& fn) {
  const std::vector<int64_t>& group_start = plan.group_start;
  const int64_t num_planes = channels * num_levels * batch_size;
  std::atomic<int64_t> next_plane{0};
  // Group-major: one (level, image)'s channels one after another, so that the metadata of the
  // group's RoIs and their output rows (channel c's bins share cache lines with channel c + 1's)
  // stay in cache from one channel to the next.
  auto claim = [&]() {
    for (int64_t p = next_plane++; p < num_planes; p = next_plane++) {
      const int64_t group = p / channels;
      if (group_start[group] != group_start[group + 1]) return p;  // skips planes no RoI reads
    }
    return num_planes;
  };
  auto task_of = [&](int64_t p, bool first) {
    const int64_t group = p / channels;
    return PlaneTask{group, group / batch_size, group % batch_size, p % channels, first};
  };
  at::parallel_for(0, threads_for(plan.num_samples * channels), 1, [&](int64_t, int64_t) {
    bool first = true;
    for (int64_t p = claim(); p < num_planes; first = false) {
      const int64_t q = claim();
      const PlaneTask next = task_of(q, false);
      fn(task_of(p, first), q < num_planes ? &next : nullptr);
      p = q;
    }
  });
}

// The plane at `plane` (`size` values of storage type S) in compute type T: the plane itself when
// the types agree, else a float32 copy in this thread's scratch buffer (valid until the next call
// on the thread).
template <typename T, typename S>
inline const T* plane_as(const S* plane, int64_t size) {
  if constexpr (std::is_same_v<S, T>) {
    return plane;
  } else {
    thread_local std::vector<T> buffer;
    buffer.resize(size);
    for (int64_t i = 0; i < size; ++i) buffer[i] = static_cast<T>(plane[i]);
    return buffer.data();
  }
}

// Pools one RoI from one plane into its PH x PW bins. A separate function with everything in
// locals, so the compiler keeps the hot loop's state in registers. O is the output storage type.
template <typename T, int kTaps, typename O>
inline void pool_roi_plane(const T* __restrict plane, int64_t width,
                           const AxisTaps<T, kTaps>* __restrict ty,
                           const AxisTaps<T, kTaps>* __restrict tx, int grid_h, int grid_w,
                           const CountDivisor<T>& divide_by_count, int pooled_h,
                           int pooled_w, O* __restrict out) {
  for (int ph = 0; ph < pooled_h; ++ph) {
    const AxisTaps<T, kTaps>* rows = ty + ph * grid_h;
    for (int pw = 0; pw < pooled_w; ++pw) {
      const AxisTaps<T, kTaps>* cols = tx + pw * grid_w;
      T sum = 0;
      for (int iy = 0; iy < grid_h; ++iy) {
        const AxisTaps<T, kTaps> row = rows[iy];
        if (!row.valid) continue;
        for (int ix = 0; ix < grid_w; ++ix) {
          const AxisTaps<T, kTaps> col = cols[ix];
          if (!col.valid) continue;
          sum += interpolate(plane, width, row, col);
        }
      }
      out[ph * pooled_w + pw] = static_cast<O>(divide_by_count(sum));
    }
  }
}

// out: [K, C, PH, PW], contiguous, of the features' storage type S.
template <typename S, typename T, int kTaps>
void pool_forward(const SamplingPlan<T, kTaps>& plan,
                  const std::vector<LevelPlanes<const S>>& levels, int64_t batch_size,
                  int64_t channels, int pooled_h, int pooled_w, S* out) {
  const int64_t bins = static_cast<int64_t>(pooled_h) * pooled_w;
  for_each_plane(
      plan, levels.size(), batch_size, channels,
      [&](const PlaneTask& task, const PlaneTask*) {
        const LevelPlanes<const S>& lv = levels[task.level];
        const int64_t size = lv.height * lv.width;
        const T* plane = plane_as<T>(plane_data(levels, task, channels), size);
        for (int64_t g = plan.group_start[task.group]; g < plan.group_start[task.group + 1];
             ++g) {
          const int64_t k = plan.grouped_rois[g];
          const RoiWindow<T>& win = plan.windows[k];
          pool_roi_plane<T, kTaps>(plane, lv.width, plan.y_taps.data() + plan.y_offset[k],
                                   plan.x_taps.data() + plan.x_offset[k], win.grid_h,
                                   win.grid_w, win.divide_by_count, pooled_h, pooled_w,
                                   out + (k * channels + task.channel) * bins);
        }
      });
}

// grad_out: [K, C, PH, PW], contiguous; the level planes are the zeroed input gradients.
template <typename T, int kTaps>
void pool_backward(const SamplingPlan<T, kTaps>& plan, const std::vector<LevelPlanes<T>>& levels,
                   int64_t batch_size, int64_t channels, int pooled_h, int pooled_w,
                   const T* grad_out) {
  const int64_t bins = static_cast<int64_t>(pooled_h) * pooled_w;
  for_each_plane(
      plan, levels.size(), batch_size, channels,
      [&](const PlaneTask& task, const PlaneTask*) {
        const LevelPlanes<T>& lv = levels[task.level];
        T* plane = plane_data(levels, task, channels);
        auto add = [plane](int64_t offset, T value) { plane[offset] += value; };
        for (int64_t g = plan.group_start[task.group]; g < plan.group_start[task.group + 1];
             ++g) {
          const int64_t k = plan.grouped_rois[g];
          const RoiWindow<T>& win = plan.windows[k];
          const AxisTaps<T, kTaps>* ty = plan.y_taps.data() + plan.y_offset[k];
          const AxisTaps<T, kTaps>* tx = plan.x_taps.data() + plan.x_offset[k];
          const T* bin_grad = grad_out + (k * channels + task.channel) * bins;
          for (int ph = 0; ph < pooled_h; ++ph) {
            for (int pw = 0; pw < pooled_w; ++pw) {
              const T grad = bin_grad[ph * pooled_w + pw];
              for (int iy = 0; iy < win.grid_h; ++iy) {
                const AxisTaps<T, kTaps>& row = ty[ph * win.grid_h + iy];
                if (!row.valid) continue;
                for (int ix = 0; ix < win.grid_w; ++ix) {
                  const AxisTaps<T, kTaps>& col = tx[pw * win.grid_w + ix];
                  if (!col.valid) continue;
                  scatter_gradient(lv.width, row, col, grad, win.divide_by_count, add);
                }
              }
            }
          }
        }
      });
}

}  // namespace cpu
}  // namespace maskrcnn_ops
