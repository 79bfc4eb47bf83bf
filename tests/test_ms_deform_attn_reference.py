"""The vectorised reference against the naive loop, and the operator's error paths."""
import functools

import pytest
import torch

import op_inputs
from ddetr.ops import ms_deform_attn, ms_deform_attn_naive, ms_deform_attn_reference

# float64 inputs without gradients, locations over [-0.3, 1.3] (some outside the maps)
make_inputs = functools.partial(op_inputs.make_inputs, dtype=torch.float64, spread=0.3,
                                requires_grad=False)

CASES = [
    # (N, spatial shapes, M, D, Lq, K)
    (2, [(4, 6)], 2, 3, 3, 2),                     # one level, H != W
    (1, [(5, 3), (1, 4)], 2, 2, 4, 3),             # a 1 x W level
    (2, [(3, 5), (2, 2), (1, 1)], 3, 2, 2, 2),     # a 1 x 1 level
    (1, [(6, 4), (3, 2), (2, 1), (1, 1)], 2, 2, 3, 2),  # four levels, odd sizes
]


@pytest.mark.parametrize("case", CASES)
def test_reference_matches_naive_loop_forward_and_gradients(case):
    value, shapes, starts, loc, w = make_inputs(*case)
    for t in (value, loc, w):
        t.requires_grad_(True)
    ref = ms_deform_attn_reference(value, shapes, starts, loc, w)
    naive = ms_deform_attn_naive(value, shapes, starts, loc, w)
    N, _, M, D, Lq, _ = case
    assert ref.shape == (N, Lq, M * D)
    torch.testing.assert_close(ref, naive, rtol=1e-12, atol=1e-12)
    grad_out = torch.randn_like(ref)
    g_ref = torch.autograd.grad(ref, (value, loc, w), grad_out)
    g_naive = torch.autograd.grad(naive, (value, loc, w), grad_out)
    for name, a, b in zip(("value", "sampling_locations", "attention_weights"),
                          g_ref, g_naive):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10, msg=name)


def test_reference_gradcheck_float64():
    value, shapes, starts, loc, w = make_inputs(1, [(3, 4), (2, 1)], 2, 2, 2, 2)
    # keep points away from pixel centres, where bilinear interpolation has kinks
    loc = (loc * 7).round() / 7 + 0.013
    inputs = [t.requires_grad_(True) for t in (value, loc, w)]
    assert torch.autograd.gradcheck(
        lambda v, l, a: ms_deform_attn_reference(v, shapes, starts, l, a), inputs)


def test_points_outside_every_map_read_zeros():
    value, shapes, starts, loc, w = make_inputs(1, [(3, 4), (2, 2)], 2, 2, 2, 2)
    far = torch.tensor([-5.0, 7.0], dtype=loc.dtype).expand_as(loc).clone()
    assert ms_deform_attn_reference(value, shapes, starts, far, w).abs().max() == 0
    assert ms_deform_attn_naive(value, shapes, starts, far, w).abs().max() == 0


def test_pixel_centre_reads_that_pixel_exactly():
    """At (j + 0.5) / W, (i + 0.5) / H bilinear interpolation returns value[i, j]."""
    H, W = 3, 5
    value, shapes, starts, _, _ = make_inputs(1, [(H, W)], 1, 4, 1, 1)
    i, j = 2, 1
    loc = torch.tensor([(j + 0.5) / W, (i + 0.5) / H], dtype=value.dtype)
    loc = loc.view(1, 1, 1, 1, 1, 2)
    w = torch.ones(1, 1, 1, 1, 1, dtype=value.dtype)
    out = ms_deform_attn_reference(value, shapes, starts, loc, w)
    torch.testing.assert_close(out[0, 0], value[0, i * W + j, 0])


def test_border_and_edge_locations_match_naive():
    """Exactly on the map's edges (0 and 1) and half a pixel outside: zero padding."""
    value, shapes, starts, _, _ = make_inputs(1, [(4, 3), (1, 5)], 1, 2, 6, 1)
    edges = torch.tensor([[0.0, 0.0], [1.0, 1.0], [0.0, 0.5], [1.0, 0.3],
                          [-0.1, 0.5], [0.5, 1.1]], dtype=value.dtype)
    loc = edges.view(1, 6, 1, 1, 1, 2).expand(1, 6, 1, 2, 1, 2).contiguous()
    w = torch.ones(1, 6, 1, 2, 1, dtype=value.dtype)
    torch.testing.assert_close(ms_deform_attn_reference(value, shapes, starts, loc, w),
                               ms_deform_attn_naive(value, shapes, starts, loc, w))


def test_empty_batch_and_no_queries():
    for N, Lq in ((0, 3), (2, 0)):
        value, shapes, starts, loc, w = make_inputs(max(N, 1), [(3, 4), (2, 2)], 2, 2, 3, 2)
        value, loc, w = value[:N], loc[:N, :Lq], w[:N, :Lq]
        out = ms_deform_attn_reference(value, shapes, starts, loc, w)
        assert out.shape == (N, Lq, 4)


def test_dispatcher_reference_backend_and_bad_backend():
    args = make_inputs(1, [(3, 4)], 2, 2, 2, 2)
    torch.testing.assert_close(ms_deform_attn(*args, backend="reference"),
                               ms_deform_attn_reference(*args))
    torch.testing.assert_close(ms_deform_attn(*args), ms_deform_attn_reference(*args))
    with pytest.raises(ValueError, match="backend must be one of"):
        ms_deform_attn(*args, backend="fast")


# --- bad input -------------------------------------------------------------------------

def _good():
    return make_inputs(2, [(3, 4), (2, 2)], 2, 4, 3, 2, dtype=torch.float32)


@pytest.mark.parametrize("op", [ms_deform_attn_reference, ms_deform_attn_naive,
                                ms_deform_attn])
@pytest.mark.parametrize("mutate, error, pattern", [
    # value length does not match the spatial shapes
    (lambda a: a.__setitem__(0, a[0][:, :-1]), ValueError, "S=15 keys .* sum to 16"),
    # wrong ranks
    (lambda a: a.__setitem__(0, a[0].flatten(2)), ValueError, r"value must have 4 dim"),
    (lambda a: a.__setitem__(3, a[3][..., 0, :]), ValueError,
     r"sampling_locations must have 6 dim"),
    (lambda a: a.__setitem__(4, a[4][None]), ValueError, r"attention_weights must have 5"),
    (lambda a: a.__setitem__(1, a[1].flatten()), ValueError, r"spatial_shapes must have 2"),
    # level_start_index inconsistent with spatial_shapes
    (lambda a: a.__setitem__(2, torch.tensor([0, 11])), ValueError,
     r"level_start_index must be \[0, 12\]"),
    (lambda a: a.__setitem__(2, torch.tensor([0])), ValueError, "L=2 entries"),
    # shapes that do not agree between tensors
    (lambda a: a.__setitem__(4, a[4][:, :, :, :, :1]), ValueError,
     r"attention_weights must be \(N, Lq, M, L, K\) = \(2, 3, 2, 2, 2\)"),
    (lambda a: a.__setitem__(3, a[3][:, :, :1]), ValueError,
     r"sampling_locations must be \(N, Lq, M, L, K, 2\)"),
    # wrong dtypes
    (lambda a: a.__setitem__(1, a[1].int()), TypeError, "spatial_shapes must be int64"),
    (lambda a: a.__setitem__(2, a[2].float()), TypeError, "level_start_index must be int64"),
    (lambda a: a.__setitem__(3, a[3].double()), TypeError,
     r"sampling_locations must have the dtype of value \(torch.float32\)"),
    (lambda a: a.__setitem__(0, a[0].long()), TypeError, "value must be a floating-point"),
    (lambda a: a.__setitem__(0, a[0].numpy()), TypeError, "value must be a torch.Tensor"),
])
def test_bad_input_names_expected_and_given(op, mutate, error, pattern):
    args = _good()
    mutate(args)
    with pytest.raises(error, match=pattern):
        op(*args)
