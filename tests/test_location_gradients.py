"""Location gradients at cell edges: what the operator tests compare, and why.

d out / d x of bilinear sampling jumps where x * W - 1/2 crosses an integer. A float32
implementation and the float64 reference can put a point within rounding of such an
edge on different sides, and then return different one-sided derivatives: both right.
The operator tests therefore compare location gradients with
``op_inputs.assert_location_grads_close`` (elementwise away from edges, one of the two
one-sided derivatives within a few float32 ulps of one). These tests show, on the CPU,
that the jump is the function's own (finite differences of the output in float64 see
it), that float32 implementations land on the side their rounding picks, and that the
check still fails for a real bug (an off-by-one corner index).
"""
import math

import pytest
import torch

from ddetr.ops import ms_deform_attn_reference
from op_inputs import (assert_location_grads_close, assert_matches_reference, make_inputs,
                       near_cell_edges, outputs_and_grads)
from test_kernel import built_kernel, fused  # noqa: F401 (the CPU kernel, built once)


def one_point(x, y, dtype, H=3, W=4, seed=0):
    """One query, head, level and point at (x, y) on an H x W map of 3 random channels."""
    gen = torch.Generator().manual_seed(seed)
    value = torch.randn(1, H * W, 1, 3, generator=gen, dtype=torch.float64).to(dtype)
    ss, lsi = torch.tensor([[H, W]]), torch.tensor([0])
    loc = torch.tensor([x, y], dtype=dtype).view(1, 1, 1, 1, 1, 2)
    w = torch.ones(1, 1, 1, 1, 1, dtype=dtype)
    return [value.requires_grad_(), ss, lsi, loc.requires_grad_(), w.requires_grad_()]


def grad_x(fn, inputs):
    """d (sum of the output) / d x of the one point."""
    (g,) = torch.autograd.grad(fn(*inputs).sum(), inputs[3])
    return g[..., 0].item()


def test_the_jump_at_a_cell_edge_is_the_functions():
    """x = 1.5 / 4 puts u = x * W - 1/2 exactly on the edge between columns 0-1 and 1-2
    (a float32 number); its float32 neighbours lie one ulp left and right of it."""
    edge = torch.tensor(1.5 / 4, dtype=torch.float32)
    left = torch.nextafter(edge, torch.tensor(0.0)).item()
    right = torch.nextafter(edge, torch.tensor(1.0)).item()
    y = 0.4
    # the function itself, in float64: one-sided finite differences at the edge
    f = lambda x: ms_deform_attn_reference(*one_point(x, y, torch.float64)).sum().item()  # noqa: E731
    h = 1e-7
    slope_left = (f(edge.item()) - f(edge.item() - h)) / h
    slope_right = (f(edge.item() + h) - f(edge.item())) / h
    jump = abs(slope_right - slope_left)
    assert jump > 0.1 * max(abs(slope_left), abs(slope_right), 1), (slope_left, slope_right)
    # the float64 derivatives one float32 ulp either side are those one-sided slopes
    exact_left = grad_x(ms_deform_attn_reference, one_point(left, y, torch.float64))
    exact_right = grad_x(ms_deform_attn_reference, one_point(right, y, torch.float64))
    assert exact_left == pytest.approx(slope_left, rel=1e-5)
    assert exact_right == pytest.approx(slope_right, rel=1e-5)
    # float32 implementations give the side of their own rounding, one ulp apart
    for fn in (ms_deform_attn_reference, fused):
        assert grad_x(fn, one_point(left, y, torch.float32)) == pytest.approx(exact_left,
                                                                             rel=1e-4)
        assert grad_x(fn, one_point(right, y, torch.float32)) == pytest.approx(exact_right,
                                                                              rel=1e-4)


def test_the_edge_aware_check_accepts_either_side_and_only_near_edges():
    """A float32 gradient taken one ulp to the left of an edge, compared with the
    float64 reference at the point one ulp to the right: elementwise comparison fails,
    the edge-aware check passes. The same pair 1/8 pixel either side of the edge is no
    rounding matter: the check fails."""
    edge = torch.tensor(1.5 / 4, dtype=torch.float32)
    left = torch.nextafter(edge, torch.tensor(0.0)).item()
    right = torch.nextafter(edge, torch.tensor(1.0)).item()
    inputs = one_point(right, 0.4, torch.float32)
    got = outputs_and_grads(fused, one_point(left, 0.4, torch.float32))[2]
    want = outputs_and_grads(ms_deform_attn_reference,
                             [t.detach().double().requires_grad_() if t.is_floating_point()
                              else t for t in inputs])[2]
    with pytest.raises(AssertionError):
        torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-4)
    assert assert_location_grads_close(got, want, inputs, ms_deform_attn_reference,
                                       rtol=1e-4, atol=1e-4) == 1
    away = one_point(right + 0.125 / 4, 0.4, torch.float32)  # 1/8 pixel right of the edge
    want_away = outputs_and_grads(ms_deform_attn_reference,
                                  [t.detach().double().requires_grad_()
                                   if t.is_floating_point() else t for t in away])[2]
    got_away = outputs_and_grads(fused, one_point(left - 0.125 / 4, 0.4, torch.float32))[2]
    assert not near_cell_edges(away[3], away[1])[0][..., 0].any()
    with pytest.raises(AssertionError, match="away from cell edges"):
        assert_location_grads_close(got_away, want_away, away, ms_deform_attn_reference,
                                    rtol=1e-4, atol=1e-4)


def edge_heavy_inputs():
    """Model-like sizes with a third of the coordinates snapped onto cell edges (the
    rest random): float32, so rounding decides the side of the snapped ones."""
    inputs = make_inputs(2, [(24, 32), (12, 16), (6, 8), (3, 4)], 8, 32, 60, 4)
    loc = inputs[3].detach().double()
    size = inputs[1].flip(1).double().view(1, 1, 1, -1, 1, 2)
    snapped = ((loc * size - 0.5).round() + 0.5) / size
    pick = torch.rand(loc.shape, generator=torch.Generator().manual_seed(3)) < 1 / 3
    inputs[3] = torch.where(pick, snapped, loc).float().requires_grad_()
    return inputs


def test_cpu_kernel_and_float32_reference_pass_the_edge_aware_check():
    inputs = edge_heavy_inputs()
    near, _ = near_cell_edges(inputs[3], inputs[1])
    assert near.float().mean() > 0.2  # the test does exercise the edges
    for fn in (fused, ms_deform_attn_reference):
        got = outputs_and_grads(fn, inputs)
        assert assert_matches_reference(got, inputs, ms_deform_attn_reference,
                                        rtol=1e-4, atol=2e-4) == int(near.sum())


def test_the_check_fails_for_an_off_by_one_corner_index():
    """A kernel that reads column col0 + 1 where it should read col0 (the same as
    sampling one pixel to the right) is caught, at edges and away from them."""
    inputs = edge_heavy_inputs()
    one_pixel = 1 / inputs[1][:, 1].double().view(1, 1, 1, -1, 1)

    def off_by_one(value, ss, lsi, loc, w):
        shifted = torch.stack([loc[..., 0] + one_pixel.to(loc), loc[..., 1]], -1)
        return ms_deform_attn_reference(value, ss, lsi, shifted, w)

    got = outputs_and_grads(off_by_one, inputs)
    want = outputs_and_grads(ms_deform_attn_reference,
                             [t.detach().double().requires_grad_() if t.is_floating_point()
                              else t for t in inputs])
    with pytest.raises(AssertionError, match="grad sampling_locations"):
        assert_location_grads_close(got[2], want[2], inputs, ms_deform_attn_reference,
                                    rtol=1e-3, atol=1e-3)
    near, _ = near_cell_edges(inputs[3], inputs[1])  # and among the near-edge entries alone
    only_near = torch.where(near, got[2].double(), want[2])
    with pytest.raises(AssertionError, match="matches neither one-sided derivative"):
        assert_location_grads_close(only_near, want[2], inputs, ms_deform_attn_reference,
                                    rtol=1e-3, atol=1e-3)
    assert math.isfinite(float(got[2].sum()))
