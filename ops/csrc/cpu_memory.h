// Fresh CPU buffers for the kernels' large outputs, backed by transparent huge pages.
//
// A pooled output or a P2-P5 gradient is tens of MB that the allocator takes from the OS on every
// call (glibc serves blocks over 32 MB with a fresh mmap), and the first write to each 4 KB page
// then traps into the kernel: for a 51 MB output, 12,500 page faults took 40 ms of a 200 ms
// pooling call. Asking for huge pages on the buffer before its first write (as PyTorch's own
// allocator does under THP_MEM_ALLOC_ENABLE) cut that to 9 ms on a kernel whose THP mode is
// "madvise". Elsewhere, or where the advice is refused, nothing changes.
#pragma once

#include <ATen/ATen.h>

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

}  // namespace cpu
}  // namespace maskrcnn_ops
