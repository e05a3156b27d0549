// CPU non-maximum suppression: nms, batched_nms, nms_bitmask (the GPU algorithm's twin) and
// nms_keep_mask (the fixed-size form: a keep mask).
//
// nms / batched_nms run greedy NMS (the same decisions as torchvision's kernel) with a layout made
// for speed: boxes are gathered once into score order as separate x1/y1/x2/y2/area arrays, so the
// inner loop over later boxes is a branch-free, contiguous, vectorisable sweep. Boxes are taken
// 64 at a time: the block's survivors are settled among themselves first, then suppress all later
// boxes in one sweep that is split over threads by columns.
//
// float16 and bfloat16 boxes are compared in float32 (each coordinate converted exactly once).
//
// batched_nms groups the score-ordered boxes by class (stable, so each class stays in score
// order) and runs the greedy pass per class, classes in parallel. Boxes of different classes never
// interact, which is what torchvision's coordinate-offset trick achieves; working per class does it
// in one pass without the offset (so no float precision is lost on large offsets) and without
// comparing boxes across classes.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <optional>
#include <vector>

#include "op_checks.h"
#include "ops_math.h"

namespace maskrcnn_ops {
namespace {

constexpr int64_t kColumnTile = 2048;  // columns per cache-resident sweep tile
constexpr int64_t kRowChunk = 2048;    // rows settled before one (possibly parallel) sweep
// IoUs (~10 ms of work) that a parallel region must have to be worth it: waking the threads costs
// microseconds on an idle machine but can take a scheduler time slice on a loaded one.
constexpr int64_t kParallelWork = 1 << 24;

// Boxes in processing order, one array per coordinate.
template <typename T>
struct BoxColumns {
  std::vector<T> x1, y1, x2, y2, area;

  BoxColumns(const T* boxes, const int64_t* order, int64_t n)
      : x1(n), y1(n), x2(n), y2(n), area(n) {
    for (int64_t p = 0; p < n; ++p) {
      const T* b = boxes + 4 * order[p];
      x1[p] = b[0];
      y1[p] = b[1];
      x2[p] = b[2];
      y2[p] = b[3];
      area[p] = box_area(b[0], b[1], b[2], b[3]);
    }
  }
};

// removed[j] |= IoU(i, j) > threshold for j in [begin, end).
template <typename T>
inline void suppress_columns(const BoxColumns<T>& b, int64_t i, int64_t begin, int64_t end,
                             T threshold, uint8_t* __restrict removed) {
  const T ix1 = b.x1[i], iy1 = b.y1[i], ix2 = b.x2[i], iy2 = b.y2[i], iarea = b.area[i];
  const T* __restrict x1 = b.x1.data();
  const T* __restrict y1 = b.y1.data();
  const T* __restrict x2 = b.x2.data();
  const T* __restrict y2 = b.y2.data();
  const T* __restrict area = b.area.data();
  for (int64_t j = begin; j < end; ++j) {
    const T iou = box_iou(ix1, iy1, ix2, iy2, iarea, x1[j], y1[j], x2[j], y2[j], area[j]);
    removed[j] |= static_cast<uint8_t>(iou > threshold);
  }
}

// The rows' suppression of columns [begin, end), a tile of columns at a time so that the tile stays
// in L1 while every row sweeps it. In parallel, threads take tiles from a shared counter (so a
// thread that the OS runs less does fewer tiles).
template <typename T>
void sweep(const BoxColumns<T>& b, const std::vector<int64_t>& rows, int64_t begin, int64_t end,
           T threshold, uint8_t* removed, bool parallel) {
  const int64_t num_tiles = (end - begin + kColumnTile - 1) / kColumnTile;
  auto run_tile = [&](int64_t tile) {
    const int64_t start = begin + tile * kColumnTile;
    const int64_t stop = std::min(start + kColumnTile, end);
    for (const int64_t i : rows) suppress_columns(b, i, start, stop, threshold, removed);
  };
  const int64_t work = (end - begin) * static_cast<int64_t>(rows.size());
  if (!parallel || num_tiles < 2 || work < kParallelWork) {
    for (int64_t tile = 0; tile < num_tiles; ++tile) run_tile(tile);
    return;
  }
  std::atomic<int64_t> next_tile{0};
  at::parallel_for(0, at::get_num_threads(), 1, [&](int64_t, int64_t) {
    for (int64_t tile = next_tile++; tile < num_tiles; tile = next_tile++) run_tile(tile);
  });
}

// Greedy NMS over positions [begin, end) of `b`; sets kept[p] for the survivors.
//
// Rows are settled in chunks of kRowChunk: within a chunk, 64-row blocks are settled one after
// the other (the block's own rows in order, then its survivors sweep the rest of the chunk); then
// the chunk's survivors sweep all later rows at once, the only step worth threads. Few, large
// parallel steps keep the cost of waking and joining threads (which grows on a loaded machine)
// small next to the work.
template <typename T>
void suppress_segment(const BoxColumns<T>& b, int64_t begin, int64_t end, T threshold,
                      uint8_t* removed, uint8_t* kept, bool parallel) {
  std::vector<int64_t> chunk_rows, block_rows;
  for (int64_t chunk = begin; chunk < end; chunk += kRowChunk) {
    const int64_t chunk_end = std::min(chunk + kRowChunk, end);
    chunk_rows.clear();
    for (int64_t block = chunk; block < chunk_end; block += kNmsBlock) {
      const int64_t block_end = std::min(block + kNmsBlock, chunk_end);
      block_rows.clear();
      for (int64_t i = block; i < block_end; ++i) {
        if (removed[i]) continue;
        kept[i] = 1;
        block_rows.push_back(i);
        suppress_columns(b, i, i + 1, block_end, threshold, removed);
      }
      sweep(b, block_rows, block_end, chunk_end, threshold, removed, /*parallel=*/false);
      chunk_rows.insert(chunk_rows.end(), block_rows.begin(), block_rows.end());
    }
    if (!chunk_rows.empty() && chunk_end < end) {
      sweep(b, chunk_rows, chunk_end, end, threshold, removed, parallel);
    }
  }
}

// The boxes in the dtype their IoUs are computed in: float64 stays, the rest is float32.
at::Tensor boxes_for_iou(const at::Tensor& boxes) {
  return boxes.to(boxes.scalar_type() == at::kDouble ? at::kDouble : at::kFloat).contiguous();
}

at::Tensor score_order(const at::Tensor& scores) {
  // Stable: equal scores keep increasing index order, as torchvision's CPU nms does.
  return std::get<1>(scores.sort(/*stable=*/true, /*dim=*/0, /*descending=*/true));
}

// The indices order[p] of the kept positions p, in position (= decreasing score) order.
at::Tensor gather_kept(const int64_t* order, const std::vector<uint8_t>& kept) {
  const int64_t num_kept = std::count(kept.begin(), kept.end(), 1);
  at::Tensor keep = at::empty({num_kept}, at::TensorOptions().dtype(at::kLong));
  int64_t* out = keep.mutable_data_ptr<int64_t>();
  for (size_t p = 0; p < kept.size(); ++p) {
    if (kept[p]) *out++ = order[p];
  }
  return keep;
}

at::Tensor nms_cpu(const at::Tensor& boxes, const at::Tensor& scores, double iou_threshold) {
  check_boxes(boxes, scores);
  TORCH_CHECK(boxes.device().is_cpu(), "expected CPU tensors");
  const int64_t n = boxes.size(0);
  if (n == 0) return at::empty({0}, boxes.options().dtype(at::kLong));
  const at::Tensor order = score_order(scores);
  const at::Tensor boxes_c = boxes_for_iou(boxes);
  at::Tensor keep;
  AT_DISPATCH_FLOATING_TYPES(boxes_c.scalar_type(), "nms_cpu", [&] {
    const BoxColumns<scalar_t> columns(boxes_c.const_data_ptr<scalar_t>(),
                                       order.const_data_ptr<int64_t>(), n);
    std::vector<uint8_t> removed(n, 0), kept(n, 0);
    suppress_segment(columns, 0, n, threshold_as<scalar_t>(iou_threshold), removed.data(),
                     kept.data(), /*parallel=*/true);
    keep = gather_kept(order.const_data_ptr<int64_t>(), kept);
  });
  return keep;
}

at::Tensor batched_nms_cpu(const at::Tensor& boxes, const at::Tensor& scores,
                           const at::Tensor& idxs, double iou_threshold) {
  check_boxes(boxes, scores);
  check_idxs(idxs, boxes);
  TORCH_CHECK(boxes.device().is_cpu(), "expected CPU tensors");
  const int64_t n = boxes.size(0);
  if (n == 0) return at::empty({0}, boxes.options().dtype(at::kLong));
  const at::Tensor order = score_order(scores);
  const int64_t* score_pos = order.const_data_ptr<int64_t>();
  const at::Tensor classes_t = idxs.to(at::kLong).index_select(0, order);
  const int64_t* classes = classes_t.const_data_ptr<int64_t>();

  // Positions grouped by class, each class in score order; `by_class` maps back to the original
  // box index so the per-class pass reads the boxes directly.
  std::vector<int64_t> grouped(n);
  for (int64_t p = 0; p < n; ++p) grouped[p] = p;
  std::stable_sort(grouped.begin(), grouped.end(),
                   [classes](int64_t a, int64_t b) { return classes[a] < classes[b]; });
  std::vector<int64_t> by_class(n);
  std::vector<int64_t> segment_start{0};
  int64_t largest_segment = 0;
  for (int64_t g = 0; g < n; ++g) {
    by_class[g] = score_pos[grouped[g]];
    if (g > 0 && classes[grouped[g]] != classes[grouped[g - 1]]) {
      largest_segment = std::max(largest_segment, g - segment_start.back());
      segment_start.push_back(g);
    }
  }
  largest_segment = std::max(largest_segment, n - segment_start.back());
  segment_start.push_back(n);
  const int64_t num_segments = static_cast<int64_t>(segment_start.size()) - 1;

  const at::Tensor boxes_c = boxes_for_iou(boxes);
  at::Tensor keep;
  AT_DISPATCH_FLOATING_TYPES(boxes_c.scalar_type(), "batched_nms_cpu", [&] {
    const BoxColumns<scalar_t> columns(boxes_c.const_data_ptr<scalar_t>(), by_class.data(), n);
    const scalar_t threshold = threshold_as<scalar_t>(iou_threshold);
    std::vector<uint8_t> removed(n, 0), kept_grouped(n, 0);
    auto run_segments = [&](int64_t first, int64_t last, bool parallel_inside) {
      for (int64_t s = first; s < last; ++s) {
        suppress_segment(columns, segment_start[s], segment_start[s + 1], threshold,
                         removed.data(), kept_grouped.data(), parallel_inside);
      }
    };
    // One dominant class is parallelised inside; many classes are spread over the threads; little
    // work stays on this thread.
    int64_t work = 0;  // bound on the IoUs: each class's pairs
    for (int64_t s = 0; s < num_segments; ++s) {
      const int64_t size = segment_start[s + 1] - segment_start[s];
      work += size * size / 2;
    }
    if (work < kParallelWork) {
      run_segments(0, num_segments, /*parallel_inside=*/false);
    } else if (2 * largest_segment > n) {
      run_segments(0, num_segments, /*parallel_inside=*/true);
    } else {
      at::parallel_for(0, num_segments, 1, [&](int64_t first, int64_t last) {
        run_segments(first, last, /*parallel_inside=*/false);
      });
    }
    std::vector<uint8_t> kept(n, 0);  // back to score order
    for (int64_t g = 0; g < n; ++g) kept[grouped[g]] = kept_grouped[g];
    keep = gather_kept(score_pos, kept);
  });
  return keep;
}

// The GPU algorithm on the CPU: the full [n, n/64] suppression bitmask from the shared block-pair
// function, then the shared sequential keep walk (tid 0 of 1 thread).
at::Tensor nms_bitmask_cpu(const at::Tensor& boxes, const at::Tensor& scores,
                           double iou_threshold, const std::optional<at::Tensor>& idxs) {
  check_boxes(boxes, scores);
  TORCH_CHECK(boxes.device().is_cpu(), "expected CPU tensors");
  if (idxs.has_value()) check_idxs(*idxs, boxes);
  const int64_t n = boxes.size(0);
  if (n == 0) return at::empty({0}, boxes.options().dtype(at::kLong));
  const at::Tensor order = score_order(scores);
  const at::Tensor sorted_boxes = boxes_for_iou(boxes.index_select(0, order));
  const at::Tensor classes_t =
      idxs.has_value() ? idxs->to(at::kLong).index_select(0, order) : at::Tensor();
  const int64_t* classes = classes_t.defined() ? classes_t.const_data_ptr<int64_t>() : nullptr;
  const int64_t col_blocks = (n + kNmsBlock - 1) / kNmsBlock;
  std::vector<uint64_t> mask(static_cast<size_t>(n) * col_blocks, 0);
  at::Tensor keep = at::empty({n}, boxes.options().dtype(at::kLong));
  int64_t num_kept = 0;
  AT_DISPATCH_FLOATING_TYPES(sorted_boxes.scalar_type(), "nms_bitmask_cpu", [&] {
    const scalar_t* sorted = sorted_boxes.const_data_ptr<scalar_t>();
    const scalar_t threshold = threshold_as<scalar_t>(iou_threshold);
    at::parallel_for(0, col_blocks, 1, [&](int64_t first, int64_t last) {
      for (int64_t row_block = first; row_block < last; ++row_block) {
        for (int64_t col_block = row_block; col_block < col_blocks; ++col_block) {
          nms_block_pair_mask(sorted, classes, n, row_block, col_block, threshold, mask.data(),
                              col_blocks);
        }
      }
    });
  });
  std::vector<uint64_t> removed(col_blocks, 0);
  num_kept = nms_keep_walk(mask.data(), n, col_blocks, removed.data(),
                           order.const_data_ptr<int64_t>(), keep.mutable_data_ptr<int64_t>(),
                           /*tid=*/0, /*nthreads=*/1, [] {});
  return keep.narrow(0, 0, num_kept);
}

// Fixed-size NMS: a bool [N] keep mask in box order, from nms / batched_nms. Boxes whose idxs are
// negative are no candidates: they are left out before the greedy pass (never kept, suppress
// nothing), so padding costs no IoUs.
at::Tensor nms_keep_mask_cpu(const at::Tensor& boxes, const at::Tensor& scores,
                             double iou_threshold, const std::optional<at::Tensor>& idxs) {
  check_boxes(boxes, scores);
  TORCH_CHECK(boxes.device().is_cpu(), "expected CPU tensors");
  if (idxs.has_value()) check_idxs(*idxs, boxes);
  const int64_t n = boxes.size(0);
  at::Tensor mask = at::zeros({n}, boxes.options().dtype(at::kBool));
  if (n == 0) return mask;
  if (!idxs.has_value()) return mask.index_fill_(0, nms_cpu(boxes, scores, iou_threshold), true);
  const at::Tensor candidates = at::nonzero(*idxs >= 0).select(1, 0);
  if (candidates.numel() == 0) return mask;
  if (candidates.numel() == n) {
    return mask.index_fill_(0, batched_nms_cpu(boxes, scores, *idxs, iou_threshold), true);
  }
  const at::Tensor kept =
      batched_nms_cpu(boxes.index_select(0, candidates), scores.index_select(0, candidates),
                      idxs->index_select(0, candidates), iou_threshold);
  return mask.index_fill_(0, candidates.index_select(0, kept), true);
}

}  // namespace
}  // namespace maskrcnn_ops

TORCH_LIBRARY_IMPL(maskrcnn_ops, CPU, m) {
  m.impl("nms", &maskrcnn_ops::nms_cpu);
  m.impl("batched_nms", &maskrcnn_ops::batched_nms_cpu);
  m.impl("nms_bitmask", &maskrcnn_ops::nms_bitmask_cpu);
  m.impl("nms_keep_mask", &maskrcnn_ops::nms_keep_mask_cpu);
}
