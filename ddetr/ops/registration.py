"""What Python tells PyTorch about a forward/backward pair of ms_deform_attn operators.

Both fused implementations are PyTorch operators with a forward and a backward op of
the same signatures: ``ddetr::ms_deform_attn`` / ``ddetr::ms_deform_attn_backward``
(C++/CUDA, ddetr/csrc) and ``ddetr::ms_deform_attn_triton`` / ``..._triton_backward``
(ms_deform_attn_triton.py). ``register_pair`` adds the two things an operator needs
beyond its kernels, the same way for both:

* ``torch.library.register_fake``: the output shapes, so torch.compile and torch.export
  can trace the op without running it;
* ``torch.library.register_autograd``: the forward's gradient is the backward op.
"""
import torch


def forward_shape(value, spatial_shapes, level_start_index, sampling_locations,
                  attention_weights):
    """The forward's output, empty: (N, Lq, M * D)."""
    N, _, M, D = value.shape
    return value.new_empty(N, sampling_locations.shape[1], M * D)


def backward_shapes(grad_output, value, spatial_shapes, level_start_index,
                    sampling_locations, attention_weights):
    """The backward's outputs, empty: the gradients of value, locations and weights."""
    return (torch.empty_like(value), torch.empty_like(sampling_locations),
            torch.empty_like(attention_weights))


def register_pair(forward, backward):
    """Fake shapes for both ops and the autograd formula of `forward` ("ddetr::name"
    strings; `backward` is found in torch.ops when the gradient is needed)."""
    torch.library.register_fake(forward)(forward_shape)
    torch.library.register_fake(backward)(backward_shapes)
    namespace, name = backward.split("::")

    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(*inputs)

    def gradient(ctx, grad_output):
        value, spatial_shapes, level_start_index, locations, weights = ctx.saved_tensors
        grads = getattr(getattr(torch.ops, namespace), name)(
            grad_output.contiguous(), value, spatial_shapes, level_start_index, locations,
            weights)
        return grads[0], None, None, grads[1], grads[2]

    torch.library.register_autograd(forward, gradient, setup_context=setup_context)
