// CPU memory helpers of the kernels: fresh buffers for large outputs, backed by transparent huge
// pages (empty_large), and planes streamed into the cache ahead of use (PlaneStream).
//
// A pooled output or a P2-P5 gradient is tens of MB that the allocator takes from the OS on every
// call (glibc serves blocks over 32 MB with a fresh mmap), and the first write to each 4 KB page
// then traps into the kernel: for a 51 MB output, 12,500 page faults took 40 ms of a 200 ms
// pooling call. Asking for huge pages on the buffer before its first write (as PyTorch's own
// allocator does under THP_MEM_ALLOC_ENABLE) cut that to 9 ms on a kernel whose THP mode is
// "madvise". Elsewhere, or where the advice is refused, nothing changes.
#pragma once

#include <ATen/ATen.h>

#include <algorithm>
#include <cstdint>

#ifdef __linux__
#include <sys/mman.h>
#endif

namespace maskrcnn_ops {
namespace cpu {

// at::empty(sizes, options, format), with huge pages asked for its whole 2 MB-aligned pages.
inline at::Tensor empty_large(at::IntArrayRef sizes, const at::TensorOptions& options,
                              at::MemoryFormat format = at::MemoryFormat::Contiguous) {
  at::Tensor t = at::empty(sizes, options, format);
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  constexpr uintptr_t kHugePage = uintptr_t{1} << 21;
  const auto begin = reinterpret_cast<uintptr_t>(t.data_ptr());
  const uintptr_t end = begin + static_cast<uintptr_t>(t.nbytes());
  const uintptr_t first = (begin + kHugePage - 1) & ~(kHugePage - 1);
  const uintptr_t last = end & ~(kHugePage - 1);
  if (last > first) {
    // Advice only: a refusal (THP off, an old kernel) leaves ordinary pages.
    (void)madvise(reinterpret_cast<void*>(first), last - first, MADV_HUGEPAGE);
  }
#endif
  return t;
}

// Fetches a feature (or gradient) plane into the cache ahead of the scattered accesses of its
// RoIs: a plane comes from main memory, and missing on every sample costs twice the pooling
// itself. The plane a thread pools next is streamed in slice by slice, one slice per RoI of the
// current plane (`step`), so the fetch overlaps the current plane's work and stays within the
// core's outstanding misses (a burst of thousands of prefetches is partly dropped). A thread's
// first plane is fetched whole before use. Only for planes that fit in the L2 cache and that
// several RoIs share (a large plane read by one small RoI, like a full-image mask, would be
// fetched mostly for nothing).
template <int kForWriting>
class PlaneStream {
 public:
  PlaneStream() = default;
  // Slices of `plane` for `steps` calls of step(); a plane not worth it: none.
  PlaneStream(const float* plane, int64_t size, int64_t num_rois, int64_t steps) {
    constexpr int64_t kMaxBytes = 512 * 1024;
    constexpr int64_t kMinRois = 4;
    if (size * static_cast<int64_t>(sizeof(float)) > kMaxBytes || num_rois < kMinRois ||
        steps < 1) {
      return;
    }
    plane_ = plane;
    lines_ = (size + kFloatsPerLine - 1) / kFloatsPerLine;
    lines_per_step_ = (lines_ + steps - 1) / steps;
  }
  void step() {
    const int64_t end = std::min(lines_, next_line_ + lines_per_step_);
    for (; next_line_ < end; ++next_line_) {
      __builtin_prefetch(plane_ + next_line_ * kFloatsPerLine, kForWriting, 2);
    }
  }

 private:
  static constexpr int64_t kFloatsPerLine = 64 / sizeof(float);
  const float* plane_ = nullptr;
  int64_t lines_ = 0;
  int64_t lines_per_step_ = 0;
  int64_t next_line_ = 0;
};

}  // namespace cpu
}  // namespace maskrcnn_ops
