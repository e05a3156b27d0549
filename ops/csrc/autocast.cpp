// Autocast rules of the maskrcnn_ops operators on the CPU and CUDA autocast keys, as torchvision
// registers them for its own ops: under autocast the convolutions give float16/bfloat16 features
// while RoIs and boxes stay float32, and every op here runs in float32 and gives its floating
// outputs back in the dtype of its first floating tensor argument (the features for the pooling
// ops, the incoming gradient for their backward ops). Boxes are never cast down.
//
//  * NMS ops: their reduced-precision floating tensor arguments are cast up to float32 (autocast's
//    cached_cast, which leaves float32 and float64 tensors alone), so bfloat16 scores meet
//    float32 boxes; the int64 indices they return need no cast back.
//  * Pooling ops: no cast at all. Their kernels already compute float16/bfloat16 features in
//    float32 and round each output (and each input gradient) once, which is exactly what casting
//    the features up, pooling in float32 and casting the result back would give, bit for bit,
//    without a float32 copy of the whole pyramid per call. RoIs of any floating dtype are read in
//    float32. Their rule just runs them below autocast.
#include <ATen/ATen.h>
#include <ATen/autocast_mode.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/core/stack.h>
#include <c10/core/impl/LocalDispatchKeySet.h>
#include <torch/library.h>

#include <optional>

namespace maskrcnn_ops {
namespace {

template <c10::DeviceType kDevice>
constexpr c10::DispatchKey autocast_key() {
  return kDevice == c10::DeviceType::CPU ? c10::DispatchKey::AutocastCPU
                                         : c10::DispatchKey::AutocastCUDA;
}

template <c10::DeviceType kDevice>
at::Tensor cast_up(const at::Tensor& t) {
  return at::autocast::cached_cast(at::kFloat, t, kDevice);
}

// The NMS rule: one boxed kernel for every op, rewriting the arguments on the stack, calling the
// op below autocast, and rewriting floating outputs (none for NMS, but the rule is general).
template <c10::DeviceType kDevice>
void run_in_float32(const c10::OperatorHandle& op, c10::DispatchKeySet, torch::jit::Stack* stack) {
  const size_t num_args = op.schema().arguments().size();
  std::optional<at::ScalarType> out_dtype;  // the first floating tensor argument's dtype
  auto note_dtype = [&](const at::Tensor& t) {
    if (!out_dtype.has_value() && t.defined() && t.is_floating_point()) {
      out_dtype = t.scalar_type();
    }
  };
  for (size_t i = stack->size() - num_args; i < stack->size(); ++i) {
    c10::IValue& arg = (*stack)[i];
    if (arg.isTensor()) {
      const at::Tensor t = arg.toTensor();
      note_dtype(t);
      arg = cast_up<kDevice>(t);
    } else if (arg.isTensorList()) {
      c10::List<at::Tensor> cast;
      for (const at::Tensor& t : arg.toTensorVector()) {
        note_dtype(t);
        cast.push_back(cast_up<kDevice>(t));
      }
      arg = cast;
    }
  }
  {
    const c10::impl::ExcludeDispatchKeyGuard no_autocast(autocast_key<kDevice>());
    op.callBoxed(stack);
  }
  if (!out_dtype.has_value()) return;
  auto cast_back = [&](const at::Tensor& t) {
    return t.defined() && t.is_floating_point() ? t.to(*out_dtype) : t;
  };
  const size_t num_returns = op.schema().returns().size();
  for (size_t i = stack->size() - num_returns; i < stack->size(); ++i) {
    c10::IValue& out = (*stack)[i];
    if (out.isTensor()) {
      out = cast_back(out.toTensor());
    } else if (out.isTensorList()) {
      c10::List<at::Tensor> cast;
      for (const at::Tensor& t : out.toTensorVector()) cast.push_back(cast_back(t));
      out = cast;
    }
  }
}

// The pooling rule (see the file comment): the kernels' own float32 computation.
template <c10::DeviceType kDevice>
void run_below_autocast(const c10::OperatorHandle& op, c10::DispatchKeySet,
                        torch::jit::Stack* stack) {
  const c10::impl::ExcludeDispatchKeyGuard no_autocast(autocast_key<kDevice>());
  op.callBoxed(stack);
}

template <c10::DeviceType kDevice>
void register_autocast(torch::Library& m) {
  for (const char* name : {"nms", "batched_nms", "nms_bitmask", "nms_keep_mask"}) {
    m.impl(name, torch::CppFunction::makeFromBoxedFunction<&run_in_float32<kDevice>>());
  }
  for (const char* name : {"roi_align", "roi_align_backward", "multilevel_roi_align",
                           "multilevel_roi_align_backward"}) {
    m.impl(name, torch::CppFunction::makeFromBoxedFunction<&run_below_autocast<kDevice>>());
  }
}

}  // namespace
}  // namespace maskrcnn_ops

TORCH_LIBRARY_IMPL(maskrcnn_ops, AutocastCPU, m) {
  maskrcnn_ops::register_autocast<c10::DeviceType::CPU>(m);
}

TORCH_LIBRARY_IMPL(maskrcnn_ops, AutocastCUDA, m) {
  maskrcnn_ops::register_autocast<c10::DeviceType::CUDA>(m);
}
