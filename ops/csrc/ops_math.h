// Per-element math shared by the CPU (.cpp) and CUDA (.cu) kernels.
//
// Everything here is a plain inline function, marked __host__ __device__ when nvcc compiles it, so
// the CPU tests exercise the exact arithmetic the GPU kernels run. The RoIAlign formulas replicate
// torchvision's kernels operation for operation (same order of evaluation), which is what makes the
// bilinear results match torchvision.ops.roi_align to the last bit on the CPU.
#pragma once

#include <cmath>
#include <cstdint>
#include <limits>

#if defined(__CUDACC__)
#define OPS_HOST_DEVICE __host__ __device__
#else
#define OPS_HOST_DEVICE
#endif
#define OPS_INLINE OPS_HOST_DEVICE inline

namespace maskrcnn_ops {

constexpr int kNmsBlock = 64;  // boxes per NMS block: one bit each in a uint64_t
constexpr int kMaxLevels = 8;  // feature levels a multilevel pooler call may pass

template <typename T>
OPS_INLINE T max_of(T a, T b) {
  return a < b ? b : a;  // the std::max convention, which torchvision's kernels use
}

template <typename T>
OPS_INLINE T min_of(T a, T b) {
  return b < a ? b : a;
}

// A product the CUDA compiler may not fuse into a neighbouring add (a fused multiply-add rounds once
// instead of twice), so the device computes IoUs bit for bit like the host.
OPS_INLINE float mul_no_fma(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fmul_rn(a, b);
#else
  return a * b;
#endif
}

OPS_INLINE double mul_no_fma(double a, double b) {
#if defined(__CUDA_ARCH__)
  return __dmul_rn(a, b);
#else
  return a * b;
#endif
}

// ---------------------------------------------------------------------------------------------
// RoI geometry
// ---------------------------------------------------------------------------------------------

// Division by a bin's sample count, what torchvision divides the bin sums by. When the count is a
// power of two (sampling_ratio 2 gives 4) its reciprocal is exact, and multiplying by it rounds
// exactly like dividing (both round the same exact quotient once), only faster.
template <typename T>
struct CountDivisor {
  T count;
  T inverse;
  bool exact_inverse;

  OPS_INLINE T operator()(T x) const { return exact_inverse ? x * inverse : x / count; }
};

// One RoI mapped onto a feature map: where its bins start, how big they are, and how many samples
// each bin averages.
template <typename T>
struct RoiWindow {
  int batch;
  T start_h, start_w;
  T bin_h, bin_w;
  int grid_h, grid_w;  // samples per bin along each axis; <= 0 for RoIs without samples
  CountDivisor<T> divide_by_count;
};

// Bound on the adaptive grid (samples per bin along an axis): a RoI 16,384 bins wide on the map,
// far beyond any image. It keeps the float-to-int conversion and grid_h * grid_w defined, which
// torchvision's kernels leave undefined for absurd boxes.
constexpr int kMaxAdaptiveGrid = 1 << 14;

// Whether a RoI extent is a finite, non-negative number (false for NaN and infinities).
template <typename T>
OPS_INLINE bool is_valid_extent(T extent) {
  return extent >= static_cast<T>(0) && extent <= std::numeric_limits<T>::max();
}

template <typename T>
OPS_INLINE int adaptive_grid(T roi_size, int pooled) {
  const T grid = static_cast<T>(ceil(roi_size / static_cast<T>(pooled)));
  return static_cast<int>(min_of(grid, static_cast<T>(kMaxAdaptiveGrid)));
}

// `roi` points at (batch_index, x1, y1, x2, y2) already converted to the compute type T.
//
// A RoI with a NaN or infinite coordinate, or with x2 < x1 or y2 < y1 (inverted), gets no samples:
// it pools to zeros and receives no gradient, in every mode. torchvision's output for such boxes is
// an accident of its arithmetic (legacy mode stretches an inverted box to one pixel from x1, a NaN
// coordinate reads out of bounds); zero is the defined answer here.
template <typename T>
OPS_INLINE RoiWindow<T> roi_window(const T* roi, T spatial_scale, int pooled_h, int pooled_w,
                                   int sampling_ratio, bool aligned) {
  RoiWindow<T> win;
  win.batch = static_cast<int>(roi[0]);
  // aligned=True shifts by half a pixel so that pixel centres sit at integer + 0.5 coordinates.
  const T offset = aligned ? static_cast<T>(0.5) : static_cast<T>(0.0);
  win.start_w = roi[1] * spatial_scale - offset;
  win.start_h = roi[2] * spatial_scale - offset;
  const T end_w = roi[3] * spatial_scale - offset;
  const T end_h = roi[4] * spatial_scale - offset;
  T roi_w = end_w - win.start_w;
  T roi_h = end_h - win.start_h;
  const bool valid = is_valid_extent(roi_w) && is_valid_extent(roi_h);
  if (!aligned) {
    // Legacy behaviour: malformed RoIs are forced to be at least 1x1.
    roi_w = max_of(roi_w, static_cast<T>(1.));
    roi_h = max_of(roi_h, static_cast<T>(1.));
  }
  win.bin_h = roi_h / static_cast<T>(pooled_h);
  win.bin_w = roi_w / static_cast<T>(pooled_w);
  if (!valid) {
    win.grid_h = win.grid_w = 0;
  } else {
    win.grid_h = sampling_ratio > 0 ? sampling_ratio : adaptive_grid(roi_h, pooled_h);
    win.grid_w = sampling_ratio > 0 ? sampling_ratio : adaptive_grid(roi_w, pooled_w);
  }
  const int count = max_of(win.grid_h * win.grid_w, 1);
  win.divide_by_count.count = static_cast<T>(count);
  win.divide_by_count.inverse = static_cast<T>(1) / static_cast<T>(count);
  win.divide_by_count.exact_inverse = (count & (count - 1)) == 0;
  return win;
}

// Coordinate of sample `sample` (of `grid`) inside bin `bin`, evaluated in torchvision's order.
template <typename T>
OPS_INLINE T sample_coordinate(T start, int bin, T bin_size, int sample, int grid) {
  return start + bin * bin_size +
         static_cast<T>(sample + .5f) * bin_size / static_cast<T>(grid);
}

// ---------------------------------------------------------------------------------------------
// Interpolation taps, one axis at a time
// ---------------------------------------------------------------------------------------------

// The neighbours of one sample along one axis and their weights. A 2-D sample's taps are the outer
// product of its y and x taps; it contributes nothing when either axis is invalid (outside
// [-1, size], torchvision's rule).
template <typename T, int kTaps>
struct AxisTaps {
  int index[kTaps];
  T weight[kTaps];
  bool valid;
};

template <typename T, int kTaps>
OPS_INLINE void clear_taps(AxisTaps<T, kTaps>& taps) {
  taps.valid = false;
  for (int k = 0; k < kTaps; ++k) {
    taps.index[k] = 0;
    taps.weight[k] = static_cast<T>(0);
  }
}

// Written as !(in range) so that a NaN coordinate is invalid too.
template <typename T>
OPS_INLINE bool coordinate_in_range(T coord, int size) {
  return coord >= static_cast<T>(-1.0) && coord <= static_cast<T>(size);
}

// Bilinear: clamp to the map, then the two neighbours (collapsed to one at the last row/column).
template <typename T>
OPS_INLINE void axis_taps(T coord, int size, AxisTaps<T, 2>& taps) {
  if (!coordinate_in_range(coord, size)) {
    clear_taps(taps);
    return;
  }
  if (coord <= 0) coord = 0;
  int low = static_cast<int>(coord);
  int high;
  if (low >= size - 1) {
    high = low = size - 1;
    coord = static_cast<T>(low);
  } else {
    high = low + 1;
  }
  const T frac = coord - low;
  taps.valid = true;
  taps.index[0] = low;
  taps.index[1] = high;
  taps.weight[0] = static_cast<T>(1.) - frac;
  taps.weight[1] = frac;
}

// Keys cubic convolution kernel with a = -0.5 (the one PyTorch's bicubic upsampling uses), in the
// same Horner forms: near() for |t| <= 1, far() for 1 < |t| < 2.
template <typename T>
OPS_INLINE T cubic_near(T t) {
  constexpr T a = static_cast<T>(-0.5);
  return ((a + 2) * t - (a + 3)) * t * t + 1;
}

template <typename T>
OPS_INLINE T cubic_far(T t) {
  constexpr T a = static_cast<T>(-0.5);
  return ((a * t - 5 * a) * t + 8 * a) * t - 4 * a;
}

OPS_INLINE int clamp_index(int i, int size) {
  return i < 0 ? 0 : (i >= size ? size - 1 : i);
}

// Bicubic: the four neighbours floor(c)-1 .. floor(c)+2, each clamped to the border (so the edge
// row/column is replicated). The coordinate itself is not clamped.
template <typename T>
OPS_INLINE void axis_taps(T coord, int size, AxisTaps<T, 4>& taps) {
  if (!coordinate_in_range(coord, size)) {
    clear_taps(taps);
    return;
  }
  const T floor_c = floor(coord);
  const int base = static_cast<int>(floor_c);
  const T t = coord - floor_c;
  taps.valid = true;
  taps.weight[0] = cubic_far(t + static_cast<T>(1.));
  taps.weight[1] = cubic_near(t);
  taps.weight[2] = cubic_near(static_cast<T>(1.) - t);
  taps.weight[3] = cubic_far(static_cast<T>(2.) - t);
  for (int k = 0; k < 4; ++k) taps.index[k] = clamp_index(base - 1 + k, size);
}

// Value of one sample: sum over the tap grid of (wy * wx) * plane[y, x], summed row by row, which
// for two taps is torchvision's w1*v1 + w2*v2 + w3*v3 + w4*v4. `rows[i]` points at the plane row
// of y tap i (hoisted by callers that reuse a sample row), S is the storage type of the plane
// (e.g. half), T the compute type.
template <typename T, int kTaps, typename S>
OPS_INLINE T interpolate_rows(const S* const* rows, const T* row_weights,
                              const AxisTaps<T, kTaps>& tx, int64_t col_stride = 1) {
  T value = 0;
  for (int i = 0; i < kTaps; ++i) {
    for (int j = 0; j < kTaps; ++j) {
      value += (row_weights[i] * tx.weight[j]) * static_cast<T>(rows[i][tx.index[j] * col_stride]);
    }
  }
  return value;
}

// interpolate_rows on a plane whose rows are `row_stride` and columns `col_stride` elements apart:
// (W, 1) for an NCHW plane, (W * C, C) for one channel of an NHWC map.
template <typename T, int kTaps, typename S>
OPS_INLINE T interpolate(const S* plane, int64_t row_stride, int64_t col_stride,
                         const AxisTaps<T, kTaps>& ty, const AxisTaps<T, kTaps>& tx) {
  const S* rows[kTaps];
  for (int i = 0; i < kTaps; ++i) rows[i] = plane + ty.index[i] * row_stride;
  return interpolate_rows(rows, ty.weight, tx, col_stride);
}

template <typename T, int kTaps, typename S>
OPS_INLINE T interpolate(const S* plane, int64_t width, const AxisTaps<T, kTaps>& ty,
                         const AxisTaps<T, kTaps>& tx) {
  return interpolate(plane, width, 1, ty, tx);
}

// The gradient of interpolate() divided by the bin's count: each tap receives
// grad * (wy * wx) / count, as in torchvision. `add(offset, value)` accumulates into the gradient
// plane (a plain += on the CPU, an atomic add on the GPU); offsets use the plane's strides as in
// interpolate().
#if defined(__CUDACC__)
#pragma nv_exec_check_disable  // `add` is a device lambda in the CUDA kernels, a host one on the CPU
#endif
template <typename T, int kTaps, typename Add>
OPS_INLINE void scatter_gradient(int64_t row_stride, int64_t col_stride,
                                 const AxisTaps<T, kTaps>& ty, const AxisTaps<T, kTaps>& tx,
                                 T grad, const CountDivisor<T>& divide_by_count, Add&& add) {
  for (int i = 0; i < kTaps; ++i) {
    const int64_t row = ty.index[i] * row_stride;
    for (int j = 0; j < kTaps; ++j) {
      add(row + tx.index[j] * col_stride, divide_by_count(grad * (ty.weight[i] * tx.weight[j])));
    }
  }
}

#if defined(__CUDACC__)
#pragma nv_exec_check_disable
#endif
template <typename T, int kTaps, typename Add>
OPS_INLINE void scatter_gradient(int64_t width, const AxisTaps<T, kTaps>& ty,
                                 const AxisTaps<T, kTaps>& tx, T grad,
                                 const CountDivisor<T>& divide_by_count, Add&& add) {
  scatter_gradient(width, 1, ty, tx, grad, divide_by_count, add);
}

// ---------------------------------------------------------------------------------------------
// Boxes and NMS
// ---------------------------------------------------------------------------------------------

template <typename T>
OPS_INLINE T box_area(T x1, T y1, T x2, T y2) {
  return mul_no_fma(x2 - x1, y2 - y1);
}

// IoU of box a and box b given their areas, in torchvision's CPU nms order of operations. Two
// empty boxes give 0/0 = NaN, which compares false against any threshold (never suppresses).
template <typename T>
OPS_INLINE T box_iou(T ax1, T ay1, T ax2, T ay2, T area_a, T bx1, T by1, T bx2, T by2, T area_b) {
  const T w = max_of(static_cast<T>(0), min_of(ax2, bx2) - max_of(ax1, bx1));
  const T h = max_of(static_cast<T>(0), min_of(ay2, by2) - max_of(ay1, by1));
  const T inter = mul_no_fma(w, h);
  return inter / (area_a + area_b - inter);
}

// IoU of two boxes stored as (x1, y1, x2, y2).
template <typename T>
OPS_INLINE T box_iou(const T* a, const T* b) {
  return box_iou(a[0], a[1], a[2], a[3], box_area(a[0], a[1], a[2], a[3]), b[0], b[1], b[2], b[3],
                 box_area(b[0], b[1], b[2], b[3]));
}

// Bit k set when box `row` (of the row block) suppresses column box k of the column block:
// IoU > threshold, both of the same class (when classes are given; boxes of different classes never
// interact, which is what batched NMS's coordinate-offset trick achieves), and k after the row box
// when the blocks are the same. `col_boxes` holds `n_cols` boxes as (x1, y1, x2, y2).
template <typename T>
OPS_INLINE uint64_t nms_row_mask(const T* row_box, int64_t row_class, const T* col_boxes,
                                 const int64_t* col_classes, int first_col, int n_cols,
                                 T threshold) {
  uint64_t bits = 0;
  for (int k = first_col; k < n_cols; ++k) {
    if (col_classes != nullptr && col_classes[k] != row_class) continue;
    if (box_iou(row_box, col_boxes + 4 * k) > threshold) bits |= 1ULL << k;
  }
  return bits;
}

// The masks of one (row block, column block) pair: for each box of the row block, which boxes of
// the column block it suppresses. `boxes`/`classes` are the score-sorted inputs; `mask` is the
// [n, col_blocks] matrix of 64-bit words. The GPU runs one row per thread with the column block in
// shared memory; the CPU twin runs this loop.
template <typename T>
OPS_INLINE void nms_block_pair_mask(const T* boxes, const int64_t* classes, int64_t n,
                                    int64_t row_block, int64_t col_block, T threshold,
                                    uint64_t* mask, int64_t col_blocks) {
  const int64_t row_start = row_block * kNmsBlock;
  const int64_t col_start = col_block * kNmsBlock;
  const int n_rows = static_cast<int>(min_of<int64_t>(n - row_start, kNmsBlock));
  const int n_cols = static_cast<int>(min_of<int64_t>(n - col_start, kNmsBlock));
  for (int r = 0; r < n_rows; ++r) {
    const int64_t i = row_start + r;
    const int first_col = row_block == col_block ? r + 1 : 0;
    mask[i * col_blocks + col_block] =
        nms_row_mask(boxes + 4 * i, classes != nullptr ? classes[i] : 0, boxes + 4 * col_start,
                     classes != nullptr ? classes + col_start : nullptr, first_col, n_cols,
                     threshold);
  }
}

// The sequential keep pass over the mask, shared by the GPU (one thread block: `tid` of `nthreads`
// threads, `barrier` = __syncthreads) and the CPU twin (tid 0 of 1, no-op barrier).
//
// `removed` (col_blocks words, zeroed, shared by the threads) collects the boxes suppressed by the
// kept ones. Within column block b every thread keeps its own copy of word b and updates it from
// each kept row's mask, so word b is only read (after the barrier), never written, while block b is
// walked; the threads OR the kept rows' later words in parallel. Kept boxes are written by thread 0
// as order[i] (or i when order is null) to `keep`, already in decreasing score order: this is the
// compaction, done on the device. Returns the number kept (meaningful in thread 0).
#if defined(__CUDACC__)
#pragma nv_exec_check_disable  // `barrier` is __syncthreads on the GPU, a no-op on the CPU
#endif
template <typename Barrier>
OPS_INLINE int64_t nms_keep_walk(const uint64_t* mask, int64_t n, int64_t col_blocks,
                                 uint64_t* removed, const int64_t* order, int64_t* keep, int tid,
                                 int nthreads, Barrier&& barrier) {
  int64_t num_kept = 0;
  for (int64_t block = 0; block < col_blocks; ++block) {
    barrier();  // ORs into word `block` from earlier blocks are complete
    uint64_t removed_here = removed[block];
    const int64_t block_start = block * kNmsBlock;
    const int in_block = static_cast<int>(min_of<int64_t>(n - block_start, kNmsBlock));
    for (int k = 0; k < in_block; ++k) {
      if (removed_here & (1ULL << k)) continue;
      const int64_t i = block_start + k;
      if (tid == 0) keep[num_kept] = order != nullptr ? order[i] : i;
      ++num_kept;
      const uint64_t* row = mask + i * col_blocks;
      removed_here |= row[block];
      for (int64_t j = block + 1 + tid; j < col_blocks; j += nthreads) removed[j] |= row[j];
    }
  }
  return num_kept;
}

}  // namespace maskrcnn_ops
