"""Random inputs of the multi-scale deformable attention operator and its outputs with
gradients: the one helper of the operator tests (reference, CPU kernel, CUDA kernel,
Triton, and the memcheck script of test_kernel_cuda)."""
import torch

from ddetr.ops import level_start_index_of


def make_inputs(N, shapes, M, D, Lq, K, dtype=torch.float32, device="cpu", seed=0,
                spread=0.3, loc_dtype=None, requires_grad=True):
    """[value (N, S, M, D), spatial_shapes (L, 2), level_start_index (L,),
    sampling_locations (N, Lq, M, L, K, 2), attention_weights (N, Lq, M, L, K)].

    shapes: the levels' (H, W). The numbers are drawn in float64 and then cast, so every
    dtype and device sees the same inputs; locations lie in [-spread, 1 + spread], so
    some fall outside the maps. value is in ``dtype``, locations and weights in
    ``loc_dtype`` (default: ``dtype``)."""
    gen = torch.Generator().manual_seed(seed)
    spatial_shapes = torch.tensor(shapes, dtype=torch.int64).view(-1, 2)
    level_start_index = level_start_index_of(spatial_shapes)
    S = int(spatial_shapes.prod(1).sum())
    L = spatial_shapes.shape[0]
    value = torch.randn(N, S, M, D, generator=gen, dtype=torch.float64)
    loc = torch.rand(N, Lq, M, L, K, 2, generator=gen, dtype=torch.float64)
    loc = loc * (1 + 2 * spread) - spread
    w = torch.rand(N, Lq, M, L, K, generator=gen, dtype=torch.float64)
    value = value.to(device=device, dtype=dtype)
    loc, w = (t.to(device=device, dtype=loc_dtype or dtype) for t in (loc, w))
    for t in (value, loc, w):
        t.requires_grad_(requires_grad)
    return [value, spatial_shapes.to(device), level_start_index.to(device), loc, w]


def outputs_and_grads(fn, inputs, seed=1):
    """[fn's output, the gradients of value, locations and weights] for one random
    output gradient (the same for every fn given the same inputs); a gradient that fn
    does not produce, or any of an empty output, is zeros."""
    out = fn(*inputs)
    grad_out = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed),
                           dtype=torch.float64).to(out)
    if out.numel() == 0:
        return [out.detach()] + [torch.zeros_like(inputs[i]) for i in (0, 3, 4)]
    grads = torch.autograd.grad(out, (inputs[0], inputs[3], inputs[4]), grad_out,
                                allow_unused=True)
    grads = [torch.zeros_like(inputs[i]) if g is None else g for g, i in zip(grads, (0, 3, 4))]
    return [out.detach()] + grads
