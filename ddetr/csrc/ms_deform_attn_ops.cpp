// The operator's schema: what torch.ops.ddetr.ms_deform_attn takes and returns.
//
// Registering with TORCH_LIBRARY (instead of exposing a function through pybind11)
// makes the kernel a real PyTorch operator: the dispatcher picks the CPU or CUDA
// implementation from the tensors' device, and Python adds what the dispatcher needs
// for autograd, torch.compile and torch.export (ddetr/ops/kernel.py: register_fake,
// register_autograd). The implementations register themselves in
// ms_deform_attn_cpu.cpp (TORCH_LIBRARY_IMPL(ddetr, CPU, ...)) and
// ms_deform_attn_cuda.cu (TORCH_LIBRARY_IMPL(ddetr, CUDA, ...)).
#include <torch/library.h>

TORCH_LIBRARY(ddetr, m) {
  // Forward: (N, S, M, D) values + sampling points and weights -> (N, Lq, M*D).
  m.def(
      "ms_deform_attn(Tensor value, Tensor spatial_shapes, Tensor level_start_index, "
      "Tensor sampling_locations, Tensor attention_weights) -> Tensor");
  // Backward: the gradients of value, sampling_locations and attention_weights, given
  // the gradient of the output. spatial_shapes and level_start_index are integer
  // tensors and have no gradient.
  m.def(
      "ms_deform_attn_backward(Tensor grad_output, Tensor value, Tensor spatial_shapes, "
      "Tensor level_start_index, Tensor sampling_locations, Tensor attention_weights) "
      "-> (Tensor, Tensor, Tensor)");
}
