// CUDA non-maximum suppression with the 64-box bitmask algorithm, the keep pass on the device.
//
//  1. Sort by score (stable, so ties resolve as on the CPU) and gather the boxes in that order.
//  2. nms_mask_kernel: block (row block, column block) computes, for each of its 64 row boxes, the
//     64-bit mask of column boxes it suppresses (ops_math.h: nms_row_mask).
//  3. nms_keep_kernel: one thread block walks the mask in score order (ops_math.h:
//     nms_keep_walk); thread 0 writes each kept box's original index, so the indices come out
//     compacted and sorted on the device. Neither the mask nor the keep flags go to the host.
//  4. The one host synchronisation of nms / batched_nms / nms_bitmask: reading the number of kept
//     boxes, which is the length of the returned tensor and so cannot be known on the host
//     otherwise. nms_keep_mask returns a [N] keep mask instead and reads nothing.
//
// batched_nms passes the class of each box and the mask skips pairs of different classes, the
// effect of the coordinate-offset trick without offsetting (and rounding) the coordinates.
// Memory: the mask holds n * ceil(n / 64) words (50 MB for 20,000 boxes), as torchvision's.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <algorithm>
#include <optional>

#include "op_checks.h"
#include "ops_math.h"

namespace maskrcnn_ops {
namespace {

template <typename T>
__global__ void nms_mask_kernel(int64_t n, int64_t col_blocks, const T* __restrict__ boxes,
                                const int64_t* __restrict__ classes, T threshold,
                                uint64_t* __restrict__ mask) {
  const int64_t row_block = blockIdx.y;
  const int64_t col_block = blockIdx.x;
  // The keep walk reads only words at or right of the diagonal.
  if (row_block > col_block) return;
  const int64_t row_start = row_block * kNmsBlock;
  const int64_t col_start = col_block * kNmsBlock;
  const int n_rows = static_cast<int>(min(n - row_start, static_cast<int64_t>(kNmsBlock)));
  const int n_cols = static_cast<int>(min(n - col_start, static_cast<int64_t>(kNmsBlock)));

  __shared__ T col_boxes[kNmsBlock * 4];
  __shared__ int64_t col_classes[kNmsBlock];
  const int t = threadIdx.x;
  if (t < n_cols) {
    for (int d = 0; d < 4; ++d) col_boxes[4 * t + d] = boxes[4 * (col_start + t) + d];
    if (classes != nullptr) col_classes[t] = classes[col_start + t];
  }
  __syncthreads();
  if (t < n_rows) {
    const int64_t i = row_start + t;
    const int first_col = row_block == col_block ? t + 1 : 0;
    mask[i * col_blocks + col_block] =
        nms_row_mask(boxes + 4 * i, classes != nullptr ? classes[i] : 0, col_boxes,
                     classes != nullptr ? col_classes : nullptr, first_col, n_cols, threshold);
  }
}

struct BlockBarrier {
  __device__ void operator()() const { __syncthreads(); }
};

__global__ void nms_keep_kernel(const uint64_t* __restrict__ mask, int64_t n, int64_t col_blocks,
                                const int64_t* __restrict__ order, int64_t* __restrict__ keep,
                                int64_t* __restrict__ num_kept) {
  extern __shared__ uint64_t removed[];
  for (int64_t j = threadIdx.x; j < col_blocks; j += blockDim.x) removed[j] = 0;
  // nms_keep_walk starts with a barrier, which publishes the zeroing.
  const int64_t kept = nms_keep_walk(mask, n, col_blocks, removed, order, keep, threadIdx.x,
                                     blockDim.x, BlockBarrier{});
  if (threadIdx.x == 0) *num_kept = kept;
}

// Steps 1-3 for n > 0 boxes: `keep` [n] gets the kept indices in its first num_kept entries (the
// rest stay `fill`), `num_kept` [1] their count, both on the device.
void nms_cuda_launch(const at::Tensor& boxes, const at::Tensor& scores, double iou_threshold,
                     const at::Tensor* idxs, int64_t fill, at::Tensor& keep,
                     at::Tensor& num_kept) {
  const int64_t n = boxes.size(0);
  const int64_t col_blocks = (n + kNmsBlock - 1) / kNmsBlock;
  TORCH_CHECK(col_blocks <= 65535, "nms supports at most ", 65535 * kNmsBlock, " boxes, got ", n);

  const at::Tensor order = std::get<1>(scores.sort(/*stable=*/true, /*dim=*/0, /*descending=*/true));
  // Half and bfloat16 boxes are compared in float.
  const at::ScalarType compute = boxes.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  const at::Tensor sorted_boxes = boxes.index_select(0, order).to(compute).contiguous();
  const at::Tensor classes =
      idxs != nullptr ? idxs->index_select(0, order).to(at::kLong).contiguous() : at::Tensor();
  at::Tensor mask = at::empty({n, col_blocks}, boxes.options().dtype(at::kLong));
  keep = at::full({n}, fill, boxes.options().dtype(at::kLong));
  num_kept = at::empty({1}, boxes.options().dtype(at::kLong));
  uint64_t* mask_ptr = reinterpret_cast<uint64_t*>(mask.data_ptr<int64_t>());
  cudaStream_t stream = at::cuda::getCurrentCUDAStream();

  AT_DISPATCH_FLOATING_TYPES(compute, "nms_mask_cuda", [&] {
    const dim3 blocks(col_blocks, col_blocks);
    nms_mask_kernel<scalar_t><<<blocks, kNmsBlock, 0, stream>>>(
        n, col_blocks, sorted_boxes.data_ptr<scalar_t>(),
        classes.defined() ? classes.data_ptr<int64_t>() : nullptr,
        threshold_as<scalar_t>(iou_threshold), mask_ptr);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });

  // One word of `removed` per column block in shared memory; past 48 KB, opt in to more.
  const size_t shared_bytes = col_blocks * sizeof(uint64_t);
  if (shared_bytes > 48 * 1024) {
    const int max_bytes = at::cuda::getCurrentDeviceProperties()->sharedMemPerBlockOptin;
    TORCH_CHECK(shared_bytes <= static_cast<size_t>(max_bytes), "nms: too many boxes (", n,
                ") for the keep pass's shared memory");
    C10_CUDA_CHECK(cudaFuncSetAttribute(nms_keep_kernel,
                                        cudaFuncAttributeMaxDynamicSharedMemorySize,
                                        static_cast<int>(shared_bytes)));
  }
  const int threads = static_cast<int>(std::clamp<int64_t>((col_blocks + 31) / 32 * 32, 32, 1024));
  nms_keep_kernel<<<1, threads, shared_bytes, stream>>>(mask_ptr, n, col_blocks,
                                                        order.data_ptr<int64_t>(),
                                                        keep.data_ptr<int64_t>(),
                                                        num_kept.data_ptr<int64_t>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

at::Tensor nms_cuda_impl(const at::Tensor& boxes, const at::Tensor& scores, double iou_threshold,
                         const at::Tensor* idxs) {
  check_boxes(boxes, scores);
  if (idxs != nullptr) check_idxs(*idxs, boxes);
  TORCH_CHECK(boxes.is_cuda(), "expected CUDA tensors");
  const at::cuda::CUDAGuard device_guard(boxes.device());
  const int64_t n = boxes.size(0);
  if (n == 0) return at::empty({0}, boxes.options().dtype(at::kLong));
  at::Tensor keep, num_kept;
  nms_cuda_launch(boxes, scores, iou_threshold, idxs, /*fill=*/0, keep, num_kept);
  // The single device-to-host read: the output's length.
  return keep.narrow(0, 0, num_kept.item<int64_t>());
}

// The fixed-size form, without any host read: the kept indices (the rest of `keep` filled with n,
// a spare slot) are scattered into a [n + 1] mask whose spare slot is dropped. Boxes of negative
// idxs are a class apart from every valid box, so they suppress none of them, and are unmarked at
// the end.
at::Tensor nms_keep_mask_cuda(const at::Tensor& boxes, const at::Tensor& scores,
                              double iou_threshold, const std::optional<at::Tensor>& idxs) {
  check_boxes(boxes, scores);
  if (idxs.has_value()) check_idxs(*idxs, boxes);
  TORCH_CHECK(boxes.is_cuda(), "expected CUDA tensors");
  const at::cuda::CUDAGuard device_guard(boxes.device());
  const int64_t n = boxes.size(0);
  at::Tensor mask = at::zeros({n + 1}, boxes.options().dtype(at::kBool));
  if (n == 0) return mask.narrow(0, 0, 0);
  // Every padding box in one class (-1), so that no valid class meets them.
  const std::optional<at::Tensor> classes =
      idxs.has_value() ? std::optional<at::Tensor>(idxs->to(at::kLong).clamp_min(-1)) : idxs;
  at::Tensor keep, num_kept;
  nms_cuda_launch(boxes, scores, iou_threshold, classes.has_value() ? &*classes : nullptr,
                  /*fill=*/n, keep, num_kept);
  mask.index_fill_(0, keep, true);
  mask = mask.narrow(0, 0, n);
  if (classes.has_value()) mask = at::logical_and(mask, *classes >= 0);
  return mask;
}

at::Tensor nms_cuda(const at::Tensor& boxes, const at::Tensor& scores, double iou_threshold) {
  return nms_cuda_impl(boxes, scores, iou_threshold, nullptr);
}

at::Tensor batched_nms_cuda(const at::Tensor& boxes, const at::Tensor& scores,
                            const at::Tensor& idxs, double iou_threshold) {
  return nms_cuda_impl(boxes, scores, iou_threshold, &idxs);
}

at::Tensor nms_bitmask_cuda(const at::Tensor& boxes, const at::Tensor& scores,
                            double iou_threshold, const std::optional<at::Tensor>& idxs) {
  return nms_cuda_impl(boxes, scores, iou_threshold, idxs.has_value() ? &*idxs : nullptr);
}

}  // namespace
}  // namespace maskrcnn_ops

TORCH_LIBRARY_IMPL(maskrcnn_ops, CUDA, m) {
  m.impl("nms", &maskrcnn_ops::nms_cuda);
  m.impl("batched_nms", &maskrcnn_ops::batched_nms_cuda);
  m.impl("nms_bitmask", &maskrcnn_ops::nms_bitmask_cuda);
  m.impl("nms_keep_mask", &maskrcnn_ops::nms_keep_mask_cuda);
}
