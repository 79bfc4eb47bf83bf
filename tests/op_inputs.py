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


# ---- comparing location gradients at cell edges ------------------------------------------
#
# Bilinear sampling is continuous in the location, but its derivative is not: d out / d x
# jumps where the pixel coordinate u = x * W - 1/2 crosses an integer (the point moves
# into the next cell, and the pair of columns it interpolates between changes), and
# d out / d y jumps where v = y * H - 1/2 does. A point within rounding of such an edge
# can land in either cell, depending on how an implementation rounds x * W - 1/2: two
# correct implementations then return the two one-sided derivatives, which differ by
# O(1). So location gradients are compared elementwise only away from edges; within
# `ulps` float32 ulps of an edge, each entry must equal one of the two one-sided
# derivatives of the float64 reference (computed at the location nudged just past the
# edge on either side). Everything else (output, value and weight gradients) is
# continuous there and compared elementwise everywhere.

def near_cell_edges(locations, spatial_shapes, ulps=4):
    """(mask, nearest edge) in pixel units, both (N, Lq, M, L, K, 2): whether x (y) lies
    within `ulps` float32 ulps of a column (row) edge of its level, and that edge's
    integer u (v)."""
    size = spatial_shapes.flip(1).to(torch.float64).view(1, 1, 1, -1, 1, 2).to(locations.device)
    scaled = locations.detach().to(torch.float64) * size  # x * W, y * H
    u = scaled - 0.5
    edge = u.round()
    ulp = torch.finfo(torch.float32).eps * scaled.abs().clamp_min(1)
    return (u - edge).abs() <= ulps * ulp, edge


def one_sided_location_grads(reference, inputs, edge, near, grad_seed=1, delta=1e-9):
    """The float64 reference's location gradients with every near-edge coordinate moved
    `delta` pixels below and above its edge: (below, above)."""
    size = inputs[1].flip(1).to(torch.float64).view(1, 1, 1, -1, 1, 2).to(inputs[3].device)
    base = inputs[3].detach().to(torch.float64)
    sides = []
    for sign in (-1, 1):
        moved = torch.where(near, (edge + sign * delta + 0.5) / size, base)
        args = [inputs[0].detach().double().requires_grad_(), inputs[1], inputs[2],
                moved.requires_grad_(), inputs[4].detach().double().requires_grad_()]
        sides.append(outputs_and_grads(reference, args, seed=grad_seed)[2])
    return sides


def assert_location_grads_close(got, want, inputs, reference, rtol, atol, ulps=4,
                                grad_seed=1):
    """Location gradients `got` against the float64 reference's `want`, both divided by
    the level's W (x) or H (y), i.e. as derivatives in pixel units: elementwise where
    the coordinate is away from a cell edge, and equal to one of the two one-sided
    derivatives within `ulps` float32 ulps of one. Returns the number of near-edge
    entries."""
    near, edge = near_cell_edges(inputs[3], inputs[1], ulps)
    # in pixel units (d / du = d / dx / W): the terms of a location gradient scale
    # with the level's size, and so does its rounding error
    size = inputs[1].flip(1).to(torch.float64).view(1, 1, 1, -1, 1, 2).to(got.device)
    got, want = got.detach().to(torch.float64) / size, want.detach().to(torch.float64) / size
    far = ~near
    torch.testing.assert_close(got[far], want[far], rtol=rtol, atol=atol,
                               msg=lambda m: f"grad sampling_locations (away from cell "
                                             f"edges): {m}")
    if near.any():
        below, above = one_sided_location_grads(reference, inputs, edge, near, grad_seed)
        g, lo, hi = got[near], (below.to(got) / size)[near], (above.to(got) / size)[near]
        close = lambda a, b: (a - b).abs() <= atol + rtol * b.abs()  # noqa: E731
        bad = ~(close(g, lo) | close(g, hi))
        assert not bad.any(), (
            f"grad sampling_locations at {int(bad.sum())} of {int(near.sum())} near-edge "
            f"entries matches neither one-sided derivative: got {g[bad][:5].tolist()}, "
            f"below {lo[bad][:5].tolist()}, above {hi[bad][:5].tolist()}")
    return int(near.sum())


def assert_matches_reference(got, inputs, reference, rtol, atol, ulps=4, names=None,
                             grad_seed=1):
    """[output, grad value, grad locations, grad weights] of some implementation against
    the float64 reference on the same inputs: elementwise, except the location gradients
    at cell edges (assert_location_grads_close). Returns the number of near-edge entries."""
    exact = [t.detach().double().requires_grad_() if t.is_floating_point() else t
             for t in inputs]
    want = outputs_and_grads(reference, exact, seed=grad_seed)
    names = names or ("output", "grad value", "grad sampling_locations",
                      "grad attention_weights")
    for i in (0, 1, 3):
        torch.testing.assert_close(got[i].double(), want[i], rtol=rtol, atol=atol,
                                   msg=lambda m, i=i: f"{names[i]}: {m}")
    return assert_location_grads_close(got[2], want[2], inputs, reference, rtol, atol,
                                       ulps, grad_seed)
