"""Dense and deformable attention modules against independent formulations."""
import math

import pytest
import torch

import ddetr.nn.ms_deform_attn as ms_deform_attn_module

from ddetr.config import get_config
from ddetr.models import build_model
from ddetr.nn import (DeformableAttention, DeformableTransformer, MSDeformAttn,
                      MultiHeadAttention, Transformer, set_attention_backend)
from ddetr.ops import (bilinear_sample, deform_attn, level_start_index_of,
                       ms_deform_attn_reference, scaled_dot_product_attention)


def test_multi_head_attention_matches_torch_with_copied_weights():
    torch.manual_seed(0)
    ours = MultiHeadAttention(d_model=32, n_heads=4)
    theirs = torch.nn.MultiheadAttention(32, 4, batch_first=True)
    theirs.load_state_dict(ours.state_dict())  # same parameter names
    q, kv = torch.randn(2, 5, 32), torch.randn(2, 7, 32)
    mask = torch.zeros(2, 7, dtype=torch.bool)
    mask[1, 4:] = True  # the second sample has 3 padded keys
    out, weights = ours(q, kv, kv, key_padding_mask=mask)
    ref_out, ref_weights = theirs(q, kv, kv, key_padding_mask=mask,
                                  average_attn_weights=False)
    assert out.shape == (2, 5, 32) and weights.shape == (2, 4, 5, 7)
    torch.testing.assert_close(out, ref_out, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(weights, ref_weights, rtol=1e-5, atol=1e-6)
    assert weights[1, :, :, 4:].abs().max() == 0


def test_multi_head_attention_rejects_indivisible_width():
    with pytest.raises(ValueError, match="divisible"):
        MultiHeadAttention(d_model=30, n_heads=4)


def test_bilinear_sample_matches_grid_sample():
    torch.manual_seed(0)
    H, W, C = 4, 7, 3
    value = torch.randn(2, H * W, C, dtype=torch.float64)
    points = torch.rand(2, 11, 2, dtype=torch.float64) * 1.4 - 0.2
    ours = bilinear_sample(value, (H, W), points)
    grid = (2 * points - 1).unsqueeze(2)  # (B, P, 1, 2)
    image = value.transpose(1, 2).reshape(2, C, H, W)
    ref = torch.nn.functional.grid_sample(image, grid, align_corners=False)
    torch.testing.assert_close(ours, ref[..., 0].transpose(1, 2))


def test_single_scale_op_matches_multi_scale_reference_with_one_level():
    torch.manual_seed(1)
    N, H, W, M, D, Lq, K = 2, 3, 5, 2, 4, 6, 3
    value = torch.randn(N, H * W, M, D, dtype=torch.float64, requires_grad=True)
    loc = (torch.rand(N, Lq, M, K, 2, dtype=torch.float64) * 1.4 - 0.2).requires_grad_()
    w = torch.rand(N, Lq, M, K, dtype=torch.float64, requires_grad=True)
    shapes = torch.tensor([[H, W]])
    ours = deform_attn(value, (H, W), loc, w)
    ref = ms_deform_attn_reference(value, shapes, level_start_index_of(shapes),
                                   loc[:, :, :, None], w[:, :, :, None])
    torch.testing.assert_close(ours, ref)
    g = torch.randn_like(ours)
    for a, b in zip(torch.autograd.grad(ours, (value, loc, w), g),
                    torch.autograd.grad(ref, (value, loc, w), g)):
        torch.testing.assert_close(a, b)


def test_ms_deform_attn_with_one_level_equals_single_scale_module():
    torch.manual_seed(2)
    C, M, K, H, W = 32, 4, 3, 5, 6
    multi = MSDeformAttn(d_model=C, n_levels=1, n_heads=M, n_points=K)
    single = DeformableAttention(d_model=C, n_heads=M, n_points=K)
    # give both random (not initial) weights, then copy: same names, same shapes
    for p in multi.parameters():
        torch.nn.init.normal_(p, std=0.2)
    single.load_state_dict(multi.state_dict())
    query, feats = torch.randn(2, 7, C), torch.randn(2, H * W, C)
    ref_points = torch.rand(2, 7, 2)
    mask = torch.zeros(2, H * W, dtype=torch.bool)
    mask[0, -W:] = True  # last row of the first image is padding
    shapes = torch.tensor([[H, W]])
    out_multi = multi(query, ref_points[:, :, None], feats, shapes,
                      level_start_index_of(shapes), mask)
    out_single = single(query, ref_points, feats, (H, W), mask)
    assert out_multi.shape == (2, 7, C)
    torch.testing.assert_close(out_multi, out_single, rtol=1e-5, atol=1e-6)


def test_paper_initialisation_of_ms_deform_attn():
    M, L, K = 8, 4, 4
    attn = MSDeformAttn(d_model=64, n_levels=L, n_heads=M, n_points=K)
    assert attn.sampling_offsets.weight.abs().max() == 0
    assert attn.attention_weights.weight.abs().max() == 0
    assert attn.attention_weights.bias.abs().max() == 0
    bias = attn.sampling_offsets.bias.detach().view(M, L, K, 2)
    for m in range(M):
        direction = bias[m, 0, 0]
        angle = math.atan2(direction[1].item(), direction[0].item()) % (2 * math.pi)
        assert angle == pytest.approx(2 * math.pi * m / M, abs=1e-5)
        assert direction.abs().max().item() == pytest.approx(1.0)  # one pixel on the long axis
        for k in range(K):  # point k lies k + 1 times as far, on every level
            torch.testing.assert_close(bias[m, :, k], (k + 1) * direction.expand(L, 2))
    # a freshly initialised module spreads its weights uniformly over the L*K points
    query = torch.randn(1, 3, 64)
    _, weights = attn.sampling(query, torch.rand(1, 3, L, 2),
                               torch.tensor([[8, 8], [4, 4], [2, 2], [1, 1]]))
    torch.testing.assert_close(weights, torch.full_like(weights, 1 / (L * K)))
    # xavier-initialised projections with zero bias
    for proj in (attn.value_proj, attn.output_proj):
        bound = math.sqrt(6 / (64 + 64))
        assert proj.weight.abs().max() <= bound and proj.bias.abs().max() == 0


def test_initial_offsets_are_the_papers_list_of_appendix_a4():
    """M = 8: the same (point, offset) pairs as A.4, in another head order; with a box
    reference the initial points of head m sit at k / (2K) of the box, as A.4 says
    (the bias scaled by 1 / (2K), the offset by the box size), inside the box."""
    from ddetr.nn.deformable_attention import PAPER_A4_DIRECTIONS, star_offsets
    K = 3
    ours = star_offsets(8, 1, K)[:, 0].round()                      # (M, K, 2)
    paper = torch.tensor(PAPER_A4_DIRECTIONS, dtype=torch.float32)  # (8, 2)
    for k in range(K):
        assert sorted(map(tuple, ours[:, k].tolist())) == \
            sorted(map(tuple, ((k + 1) * paper).tolist()))
    attn = MSDeformAttn(d_model=16, n_levels=1, n_heads=8, n_points=K)
    box = torch.tensor([0.5, 0.5, 0.2, 0.4]).view(1, 1, 1, 4)
    loc, _ = attn.sampling(torch.zeros(1, 1, 16), box, torch.tensor([[8, 8]]))
    expected = 0.5 + star_offsets(8, 1, K) / (2 * K) * torch.tensor([0.2, 0.4])
    torch.testing.assert_close(loc[0, 0], expected)
    assert ((loc - 0.5).abs() <= torch.tensor([0.1, 0.2]) + 1e-6).all()


def test_box_reference_points_scale_offsets_by_box_size():
    torch.manual_seed(3)
    attn = MSDeformAttn(d_model=16, n_levels=2, n_heads=2, n_points=2)
    query = torch.randn(1, 1, 16)
    boxes = torch.tensor([0.5, 0.5, 0.2, 0.4]).view(1, 1, 1, 4).expand(1, 1, 2, 4)
    loc, _ = attn.sampling(query, boxes, torch.tensor([[4, 4], [2, 2]]))
    offsets = attn.sampling_offsets(query).view(1, 1, 2, 2, 2, 2)
    expected = 0.5 + offsets / 2 * torch.tensor([0.2, 0.4]) * 0.5
    torch.testing.assert_close(loc, expected)


@pytest.mark.parametrize("backend", ["reference", "auto"])
def test_ms_deform_attn_under_bfloat16_autocast_samples_in_float32(backend):
    # autocast makes the projections bfloat16 while the reference points stay float32;
    # the module must sample in float32 and stay close to the all-float32 result
    torch.manual_seed(4)
    attn = MSDeformAttn(d_model=32, n_levels=2, n_heads=4, n_points=2)
    attn.backend = backend
    shapes = torch.tensor([[6, 5], [3, 3]])
    query, value = torch.randn(2, 7, 32), torch.randn(2, 39, 32)
    ref = torch.rand(2, 7, 2, 2)
    expected = attn(query, ref, value, shapes, level_start_index_of(shapes))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = attn(query, ref, value, shapes, level_start_index_of(shapes))
    assert out.dtype == torch.bfloat16                    # output_proj ran in bfloat16
    torch.testing.assert_close(out.float(), expected, atol=0.05, rtol=0.05)
    out.float().sum().backward()
    assert all(torch.isfinite(p.grad).all() for p in attn.parameters())


def _dtypes_given_to_the_operator(monkeypatch, device, autocast_dtype):
    """(value, locations, weights) dtypes that MSDeformAttn passes to ms_deform_attn
    under autocast on device."""
    seen = []
    real = ms_deform_attn_module.ms_deform_attn

    def spy(value, shapes, starts, locations, weights, backend="auto"):
        seen.append((value.dtype, locations.dtype, weights.dtype))
        return real(value, shapes, starts, locations, weights, backend=backend)

    monkeypatch.setattr(ms_deform_attn_module, "ms_deform_attn", spy)
    attn = MSDeformAttn(d_model=32, n_levels=2, n_heads=4, n_points=2).to(device)
    shapes = torch.tensor([[6, 5], [3, 3]], device=device)
    query = torch.randn(2, 7, 32, device=device)
    value = torch.randn(2, 39, 32, device=device)
    with torch.autocast(device, dtype=autocast_dtype):
        attn(query, torch.rand(2, 7, 2, 2, device=device), value, shapes,
             level_start_index_of(shapes))
    return seen[0]


def test_on_a_cpu_autocast_value_is_sampled_in_float32(monkeypatch):
    # the CPU kernel is float32/float64 only: a bfloat16 value would fall to the reference
    assert _dtypes_given_to_the_operator(monkeypatch, "cpu", torch.bfloat16) == \
        (torch.float32,) * 3


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_on_a_gpu_autocast_value_stays_half_with_float32_locations(monkeypatch, dtype):
    # the GPU kernels read half value with float32 locations and weights: no upcast copy
    assert _dtypes_given_to_the_operator(monkeypatch, "cuda", dtype) == \
        (dtype, torch.float32, torch.float32)


@pytest.mark.parametrize("backend", ["reference", "auto"])
def test_float64_reference_points_with_a_float32_query_sample_in_float64(backend):
    # the locations take the wider type (as under autocast), the output the query's
    torch.manual_seed(5)
    attn = MSDeformAttn(d_model=32, n_levels=2, n_heads=4, n_points=2, backend=backend)
    shapes = torch.tensor([[6, 5], [3, 3]])
    query, value = torch.randn(2, 7, 32), torch.randn(2, 39, 32)
    ref = torch.rand(2, 7, 2, 2, dtype=torch.float64)
    out = attn(query, ref, value, shapes, level_start_index_of(shapes))
    assert out.dtype == torch.float32
    wide = attn.double()(query.double(), ref, value.double(), shapes,
                         level_start_index_of(shapes))
    torch.testing.assert_close(out, wide.float(), atol=1e-5, rtol=1e-5)


def test_ms_deform_attn_rejects_mismatched_reference_points():
    attn = MSDeformAttn(d_model=16, n_levels=2, n_heads=2, n_points=2)
    shapes = torch.tensor([[4, 4], [2, 2]])
    with pytest.raises(ValueError, match=r"reference_points must be \(N, Lq, L, 2 or 4\)"):
        attn(torch.randn(1, 3, 16), torch.rand(1, 3, 1, 2), torch.randn(1, 20, 16),
             shapes, level_start_index_of(shapes))
    with pytest.raises(ValueError, match="n_levels=2"):
        attn.sampling(torch.randn(1, 3, 16), torch.rand(1, 3, 2, 2), shapes[:1])


def test_deformable_attention_sampling_every_pixel_reproduces_dense_attention():
    """The paper's remark: with one level, K = H*W points at every pixel centre and
    weights softmax(q.k / sqrt(D)), deformable attention is dense attention."""
    torch.manual_seed(4)
    N, H, W, M, D, Lq = 2, 3, 4, 2, 5, 6
    q = torch.randn(N, M, Lq, D, dtype=torch.float64)
    k = torch.randn(N, M, H * W, D, dtype=torch.float64)
    v = torch.randn(N, M, H * W, D, dtype=torch.float64)
    dense, weights = scaled_dot_product_attention(q, k, v)  # (N, M, Lq, D), (N, M, Lq, S)

    rows, cols = torch.meshgrid(torch.arange(H), torch.arange(W), indexing="ij")
    centres = torch.stack([(cols + 0.5) / W, (rows + 0.5) / H], -1)  # (H, W, 2) as (x, y)
    centres = centres.reshape(1, 1, 1, 1, H * W, 2).to(torch.float64)
    loc = centres.expand(N, Lq, M, 1, H * W, 2)
    shapes = torch.tensor([[H, W]])
    deformable = ms_deform_attn_reference(
        v.transpose(1, 2).contiguous(), shapes, level_start_index_of(shapes),
        loc, weights.transpose(1, 2)[:, :, :, None])  # weights as (N, Lq, M, 1, K=HW)
    torch.testing.assert_close(deformable, dense.transpose(1, 2).reshape(N, Lq, M * D))


# --- input checks: one line naming what was expected and what was given -------------

def ms_inputs(N=2, Lq=3, C=16, shapes=((4, 4), (2, 2))):
    """Valid arguments of MSDeformAttn(d_model=16, n_levels=2, n_heads=2, n_points=2)."""
    spatial_shapes = torch.tensor(shapes)
    S = int(spatial_shapes.prod(1).sum())
    return dict(query=torch.randn(N, Lq, C), reference_points=torch.rand(N, Lq, 2, 2),
                input_flatten=torch.randn(N, S, C), input_spatial_shapes=spatial_shapes,
                input_level_start_index=level_start_index_of(spatial_shapes),
                input_padding_mask=torch.zeros(N, S, dtype=torch.bool))


MS_DEFORM_ATTN_BAD_INPUTS = {
    "query not a tensor": ({"query": [[0.0] * 16]}, TypeError,
                           r"query must be a torch.Tensor \(N, Lq, C\), got list"),
    "query rank": ({"query": torch.randn(3, 16)}, ValueError,
                   r"query must have 3 dimensions \(N, Lq, C\), got shape \(3, 16\)"),
    "query width": ({"query": torch.randn(2, 3, 8)}, ValueError,
                    r"query must have d_model=16 channels .*got shape \(2, 3, 8\)"),
    "query dtype": ({"query": torch.ones(2, 3, 16, dtype=torch.int64)}, TypeError,
                    r"query must be a floating-point tensor, got dtype torch.int64"),
    "input_flatten width": ({"input_flatten": torch.randn(2, 20, 12)}, ValueError,
                            r"input_flatten must have d_model=16 channels .*\(2, 20, 12\)"),
    "input_flatten rank": ({"input_flatten": torch.randn(20, 16)}, ValueError,
                           r"input_flatten must have 3 dimensions \(N, S, C\)"),
    "batch sizes": ({"input_flatten": torch.randn(3, 20, 16)}, ValueError,
                    r"query, reference_points, input_flatten must have one batch size, "
                    r"got query 2, reference_points 2, input_flatten 3"),
    "reference_points rank": ({"reference_points": torch.rand(2, 3, 2)}, ValueError,
                              r"reference_points must have 4 dimensions \(N, Lq, L, 2\|4\)"),
    "reference_points last dim": ({"reference_points": torch.rand(2, 3, 2, 3)}, ValueError,
                                  r"reference_points must be \(N, Lq, L, 2 or 4\) = "
                                  r"\(2, 3, 2, 2\|4\), got \(2, 3, 2, 3\)"),
    "reference_points dtype": ({"reference_points": torch.ones(2, 3, 2, 2, dtype=torch.int64)},
                               TypeError, r"reference_points must be a floating-point "
                                          r"tensor, got dtype torch.int64"),
    "spatial_shapes dtype": ({"input_spatial_shapes": torch.tensor([[4, 4], [2, 2]],
                                                                   dtype=torch.int32)},
                             TypeError, r"spatial_shapes must be int64, got dtype torch.int32"),
    "spatial_shapes levels": ({"input_spatial_shapes": torch.tensor([[4, 5]])}, ValueError,
                              r"spatial_shapes must be \(L, 2\) = \(2, 2\) for n_levels=2, "
                              r"got shape \(1, 2\)"),
    "spatial_shapes vs S": ({"input_spatial_shapes": torch.tensor([[4, 5], [2, 2]])},
                            ValueError, r"value has S=20 keys but spatial_shapes "
                                        r"\[\(4, 5\), \(2, 2\)\] sum to 24"),
    "mask dtype": ({"input_padding_mask": torch.zeros(2, 20)}, TypeError,
                   r"input_padding_mask must be a bool tensor \(True = padding\), "
                   r"got dtype torch.float32"),
    "mask shape": ({"input_padding_mask": torch.zeros(2, 19, dtype=torch.bool)}, ValueError,
                   r"input_padding_mask must be \(N, S\) = \(2, 20\), got shape \(2, 19\)"),
}


@pytest.mark.parametrize("case", sorted(MS_DEFORM_ATTN_BAD_INPUTS))
def test_ms_deform_attn_checks_its_inputs(case):
    change, error, message = MS_DEFORM_ATTN_BAD_INPUTS[case]
    attn = MSDeformAttn(d_model=16, n_levels=2, n_heads=2, n_points=2)
    attn(**ms_inputs())                               # the valid inputs pass
    with pytest.raises(error, match=message):
        attn(**{**ms_inputs(), **change})


MODULE_BAD_ARGS = {
    "d_model divisible": (lambda: MSDeformAttn(d_model=30, n_heads=4), ValueError,
                          r"d_model=30 must be divisible by n_heads=4"),
    "n_levels >= 1": (lambda: MSDeformAttn(d_model=16, n_levels=0, n_heads=2), ValueError,
                      r"n_levels must be >= 1, got 0"),
    "n_points >= 1": (lambda: MSDeformAttn(d_model=16, n_heads=2, n_points=0), ValueError,
                      r"n_points must be >= 1, got 0"),
    "n_points int": (lambda: MSDeformAttn(d_model=16, n_heads=2, n_points=2.5), TypeError,
                     r"n_points must be an int, got float 2.5"),
    "n_heads >= 1": (lambda: MultiHeadAttention(d_model=16, n_heads=0), ValueError,
                     r"n_heads must be >= 1, got 0"),
    "dropout range": (lambda: MultiHeadAttention(d_model=16, n_heads=2, dropout=1.0),
                      ValueError, r"dropout must be in \[0, 1\), got 1.0"),
    "single-scale n_points": (lambda: DeformableAttention(d_model=16, n_heads=2, n_points=0),
                              ValueError, r"n_points must be >= 1, got 0"),
    "single-scale divisible": (lambda: DeformableAttention(d_model=18, n_heads=4),
                               ValueError, r"d_model=18 must be divisible by n_heads=4"),
    "transformer layers": (lambda: DeformableTransformer(16, 2, num_encoder_layers=0),
                           ValueError, r"num_encoder_layers must be >= 1, got 0"),
    "transformer levels": (lambda: DeformableTransformer(16, 2, num_feature_levels=0),
                           ValueError, r"num_feature_levels must be >= 1, got 0"),
    "transformer proposals": (lambda: DeformableTransformer(16, 2, two_stage=True,
                                                            two_stage_num_proposals=0),
                              ValueError, r"two_stage_num_proposals must be >= 1, got 0"),
    "transformer dropout": (lambda: DeformableTransformer(16, 2, dropout=-0.1), ValueError,
                            r"dropout must be in \[0, 1\), got -0.1"),
    "dense transformer divisible": (lambda: Transformer(d_model=20, n_heads=8), ValueError,
                                    r"d_model=20 must be divisible by n_heads=8"),
    "dense transformer layers": (lambda: Transformer(16, 2, num_decoder_layers=0),
                                 ValueError, r"num_decoder_layers must be >= 1, got 0"),
    "ms_deform_attn backend": (lambda: MSDeformAttn(16, 2, 2, 2, backend="cuda"), ValueError,
                               r"backend must be one of \['auto', 'reference', 'kernel', "
                               r"'triton'\], got 'cuda'"),
}


@pytest.mark.parametrize("case", sorted(MODULE_BAD_ARGS))
def test_modules_check_their_constructor_arguments(case):
    build, error, message = MODULE_BAD_ARGS[case]
    with pytest.raises(error, match=message):
        build()


def mha_inputs():
    return dict(query=torch.randn(2, 3, 16), key=torch.randn(2, 5, 16),
                value=torch.randn(2, 5, 16), key_padding_mask=torch.zeros(2, 5, dtype=torch.bool))


MHA_BAD_INPUTS = {
    "query width": ({"query": torch.randn(2, 3, 8)}, ValueError,
                    r"query must have d_model=16 channels .*got shape \(2, 3, 8\)"),
    "key rank": ({"key": torch.randn(5, 16)}, ValueError,
                 r"key must have 3 dimensions \(N, S, C\), got shape \(5, 16\)"),
    "value dtype": ({"value": torch.ones(2, 5, 16, dtype=torch.int32)}, TypeError,
                    r"value must be a floating-point tensor, got dtype torch.int32"),
    "key and value": ({"value": torch.randn(2, 6, 16)}, ValueError,
                      r"key and value must have the same \(N, S\), got key \(2, 5, 16\) "
                      r"and value \(2, 6, 16\)"),
    "batch sizes": ({"query": torch.randn(1, 3, 16)}, ValueError,
                    r"query, key, value must have one batch size, got query 1, key 2"),
    "mask dtype": ({"key_padding_mask": torch.zeros(2, 5, dtype=torch.uint8)}, TypeError,
                   r"key_padding_mask must be a bool tensor \(True = padding\), "
                   r"got dtype torch.uint8"),
    "mask shape": ({"key_padding_mask": torch.zeros(2, 3, dtype=torch.bool)}, ValueError,
                   r"key_padding_mask must be \(N, S\) = \(2, 5\), got shape \(2, 3\)"),
}


@pytest.mark.parametrize("case", sorted(MHA_BAD_INPUTS))
def test_multi_head_attention_checks_its_inputs(case):
    change, error, message = MHA_BAD_INPUTS[case]
    attn = MultiHeadAttention(d_model=16, n_heads=2)
    attn(**mha_inputs())
    with pytest.raises(error, match=message):
        attn(**{**mha_inputs(), **change})


def single_inputs():
    return dict(query=torch.randn(2, 3, 16), reference_points=torch.rand(2, 3, 2),
                input_flatten=torch.randn(2, 12, 16), spatial_shape=(3, 4),
                input_padding_mask=torch.zeros(2, 12, dtype=torch.bool))


SINGLE_BAD_INPUTS = {
    "query width": ({"query": torch.randn(2, 3, 4)}, ValueError,
                    r"query must have d_model=16 channels .*got shape \(2, 3, 4\)"),
    "reference_points shape": ({"reference_points": torch.rand(2, 4, 2)}, ValueError,
                               r"reference_points must be \(N, Lq, 2\) = \(2, 3, 2\), "
                               r"got \(2, 4, 2\)"),
    "reference_points dtype": ({"reference_points": torch.zeros(2, 3, 2, dtype=torch.int64)},
                               TypeError, r"reference_points must be a floating-point tensor"),
    "batch sizes": ({"input_flatten": torch.randn(1, 12, 16)}, ValueError,
                    r"query, input_flatten must have one batch size, got query 2, "
                    r"input_flatten 1"),
    "spatial_shape ints": ({"spatial_shape": (3.0, 4)}, TypeError,
                           r"H must be an int, got float 3.0"),
    "spatial_shape vs S": ({"spatial_shape": (4, 4)}, ValueError,
                           r"input_flatten has 12 positions, spatial_shape \(4, 4\) needs 16"),
    "mask shape": ({"input_padding_mask": torch.zeros(2, 13, dtype=torch.bool)}, ValueError,
                   r"input_padding_mask must be \(N, S\) = \(2, 12\), got shape \(2, 13\)"),
}


@pytest.mark.parametrize("case", sorted(SINGLE_BAD_INPUTS))
def test_deformable_attention_checks_its_inputs(case):
    change, error, message = SINGLE_BAD_INPUTS[case]
    attn = DeformableAttention(d_model=16, n_heads=2, n_points=2)
    attn(**single_inputs())
    with pytest.raises(error, match=message):
        attn(**{**single_inputs(), **change})


def transformer_inputs(C=16, shapes=((6, 5), (3, 3))):
    srcs = [torch.randn(2, C, h, w) for h, w in shapes]
    masks = [torch.zeros(2, h, w, dtype=torch.bool) for h, w in shapes]
    pos = [torch.randn(2, C, h, w) for h, w in shapes]
    return dict(srcs=srcs, masks=masks, pos_embeds=pos, query_embed=torch.randn(4, 2 * C))


def replace_level(key, lvl, value):
    inputs = transformer_inputs()
    inputs[key] = [value if i == lvl else t for i, t in enumerate(inputs[key])]
    return inputs


TRANSFORMER_BAD_INPUTS = {
    "levels": (lambda: {**transformer_inputs(), "srcs": transformer_inputs()["srcs"][:1]},
               ValueError, r"srcs must be a list of num_feature_levels=2 tensors, got list of 1"),
    "src width": (lambda: replace_level("srcs", 1, torch.randn(2, 8, 3, 3)), ValueError,
                  r"srcs\[1\] must be \(N, C, H, W\) with C = d_model = 16, got shape "
                  r"\(2, 8, 3, 3\)"),
    "src rank": (lambda: replace_level("srcs", 0, torch.randn(16, 6, 5)), ValueError,
                 r"srcs\[0\] must have 4 dimensions \(N, C, H, W\), got shape \(16, 6, 5\)"),
    "mask dtype": (lambda: replace_level("masks", 0, torch.zeros(2, 6, 5)), ValueError,
                   r"masks\[0\] must be a bool \(N, H, W\) = \(2, 6, 5\) tensor, got "
                   r"torch.float32 \(2, 6, 5\)"),
    "mask shape": (lambda: replace_level("masks", 1, torch.zeros(2, 3, 4, dtype=torch.bool)),
                   ValueError, r"masks\[1\] must be a bool \(N, H, W\) = \(2, 3, 3\) tensor"),
    "pos shape": (lambda: replace_level("pos_embeds", 1, torch.randn(2, 16, 3, 4)),
                  ValueError, r"pos_embeds\[1\] must have the shape of srcs\[1\] "
                              r"\(2, 16, 3, 3\), got \(2, 16, 3, 4\)"),
    "batch sizes": (lambda: {**replace_level("srcs", 1, torch.randn(1, 16, 3, 3)),
                             "masks": transformer_inputs()["masks"][:1]
                             + [torch.zeros(1, 3, 3, dtype=torch.bool)],
                             "pos_embeds": transformer_inputs()["pos_embeds"][:1]
                             + [torch.randn(1, 16, 3, 3)]},
                    ValueError, r"srcs\[0\], srcs\[1\] must have one batch size, got "
                                r"srcs\[0\] 2, srcs\[1\] 1"),
    "query_embed missing": (lambda: {**transformer_inputs(), "query_embed": None}, ValueError,
                            r"query_embed is required unless two_stage=True, got None"),
    "query_embed width": (lambda: {**transformer_inputs(), "query_embed": torch.randn(4, 16)},
                          ValueError, r"query_embed must be \(Lq, 32\), got shape \(4, 16\)"),
}


@pytest.mark.parametrize("case", sorted(TRANSFORMER_BAD_INPUTS))
def test_deformable_transformer_checks_its_inputs(case):
    make, error, message = TRANSFORMER_BAD_INPUTS[case]
    tr = DeformableTransformer(16, 2, 1, 1, 32, 0.0, 2, 2, 2).eval()
    tr(**transformer_inputs())
    with pytest.raises(error, match=message):
        tr(**make())


def test_two_stage_transformer_needs_proposal_heads():
    tr = DeformableTransformer(16, 2, 1, 1, 32, 0.0, 2, 2, 2, two_stage=True,
                               two_stage_num_proposals=4)
    with pytest.raises(ValueError, match=r"two_stage=True needs proposal_heads \(class "
                                         r"head, box head\), got None"):
        tr(**{**transformer_inputs(), "query_embed": None})


def encoder_decoder_inputs(C=16):
    shapes = torch.tensor([[6, 5], [3, 3]])
    return dict(src=torch.randn(2, 39, C), spatial_shapes=shapes,
                level_start_index=level_start_index_of(shapes),
                valid_ratios=torch.ones(2, 2, 2), pos=torch.randn(2, 39, C),
                padding_mask=torch.zeros(2, 39, dtype=torch.bool))


ENCODER_BAD_INPUTS = {
    "src width": ({"src": torch.randn(2, 39, 8)}, ValueError,
                  r"src must have d_model=16 channels .*got shape \(2, 39, 8\)"),
    "spatial_shapes vs S": ({"src": torch.randn(2, 40, 16), "pos": None,
                             "padding_mask": None}, ValueError,
                            r"spatial_shapes \[\[6, 5\], \[3, 3\]\] hold 39 positions, "
                            r"the flattened input has S=40"),
    "valid_ratios shape": ({"valid_ratios": torch.ones(2, 3, 2)}, ValueError,
                           r"valid_ratios must be \(N, L, 2\) = \(2, 2, 2\), got shape "
                           r"\(2, 3, 2\)"),
    "pos shape": ({"pos": torch.randn(2, 38, 16)}, ValueError,
                  r"pos must be None or a tensor of the shape of src \(2, 39, 16\), "
                  r"got \(2, 38, 16\)"),
    "mask dtype": ({"padding_mask": torch.zeros(2, 39, dtype=torch.int64)}, TypeError,
                   r"padding_mask must be a bool tensor \(True = padding\), "
                   r"got dtype torch.int64"),
}


@pytest.mark.parametrize("case", sorted(ENCODER_BAD_INPUTS))
def test_deformable_encoder_checks_its_inputs(case):
    change, error, message = ENCODER_BAD_INPUTS[case]
    encoder = DeformableTransformer(16, 2, 1, 1, 32, 0.0, 2, 2, 2).encoder
    encoder(**encoder_decoder_inputs())
    with pytest.raises(error, match=message):
        encoder(**{**encoder_decoder_inputs(), **change})


def decoder_inputs(C=16):
    inputs = encoder_decoder_inputs(C)
    del inputs["pos"]
    return dict(inputs, tgt=torch.randn(2, 4, C), reference_points=torch.rand(2, 4, 2),
                query_pos=torch.randn(2, 4, C))


DECODER_BAD_INPUTS = {
    "reference_points shape": ({"reference_points": torch.rand(2, 4, 3)}, ValueError,
                               r"reference_points must be \(N, Lq, 2 or 4\) = \(2, 4, 2\|4\) "
                               r"like tgt, got \(2, 4, 3\)"),
    "reference_points dtype": ({"reference_points": torch.ones(2, 4, 2, dtype=torch.int64)},
                               TypeError, r"reference_points must be a floating-point tensor"),
    # the memory, its mask and its tables are checked by the layers' cross-attention
    "memory width": ({"src": torch.randn(2, 39, 8)}, ValueError,
                     r"input_flatten must have d_model=16 channels .*got shape \(2, 39, 8\)"),
    "batch sizes": ({"tgt": torch.randn(1, 4, 16), "reference_points": torch.rand(1, 4, 2),
                     "query_pos": torch.randn(1, 4, 16)}, ValueError,
                    r"valid_ratios must be \(N, L, 2\) = \(1, 2, 2\), got shape \(2, 2, 2\)"),
    "query_pos missing": ({"query_pos": None}, ValueError, r"query_pos \(N, Lq, C\) is required"),
    "query_pos shape": ({"query_pos": torch.randn(2, 5, 16)}, ValueError,
                        r"query_pos must be None or a tensor of the shape of tgt "
                        r"\(2, 4, 16\), got \(2, 5, 16\)"),
    "mask shape": ({"padding_mask": torch.zeros(2, 4, dtype=torch.bool)}, ValueError,
                   r"input_padding_mask must be \(N, S\) = \(2, 39\), got shape \(2, 4\)"),
    "box heads": ({"box_heads": [torch.nn.Linear(16, 4)]}, ValueError,
                  r"box_heads must hold a head per decoder layer \(2\), got 1"),
}


@pytest.mark.parametrize("case", sorted(DECODER_BAD_INPUTS))
def test_deformable_decoder_checks_its_inputs(case):
    change, error, message = DECODER_BAD_INPUTS[case]
    decoder = DeformableTransformer(16, 2, 1, 2, 32, 0.0, 2, 2, 2).decoder
    decoder(**decoder_inputs())
    with pytest.raises(error, match=message):
        decoder(**{**decoder_inputs(), **change})


DENSE_BAD_INPUTS = {
    "src width": ({"src": torch.randn(2, 8, 5, 6)}, ValueError,
                  r"src must be \(N, C, H, W\) with C = d_model = 16, got shape \(2, 8, 5, 6\)"),
    "mask dtype": ({"mask": torch.zeros(2, 5, 6)}, ValueError,
                   r"mask must be a bool \(N, H, W\) = \(2, 5, 6\) tensor, got torch.float32"),
    "query width": ({"query_embed": torch.randn(4, 32)}, ValueError,
                    r"query_embed must be \(Lq, C\) with C = d_model = 16, got shape \(4, 32\)"),
    "pos shape": ({"pos_embed": torch.randn(2, 16, 5, 5)}, ValueError,
                  r"pos_embed must be None or a tensor of the shape of src \(2, 16, 5, 6\)"),
}


@pytest.mark.parametrize("case", sorted(DENSE_BAD_INPUTS))
def test_dense_transformer_checks_its_inputs(case):
    change, error, message = DENSE_BAD_INPUTS[case]
    tr = Transformer(16, 2, 1, 1, 32, 0.0)
    good = dict(src=torch.randn(2, 16, 5, 6), mask=torch.zeros(2, 5, 6, dtype=torch.bool),
                query_embed=torch.randn(4, 16), pos_embed=torch.randn(2, 16, 5, 6))
    tr(**good)
    with pytest.raises(error, match=message):
        tr(**{**good, **change})


def test_set_attention_backend_sets_every_ms_deform_attn_of_a_model():
    tr = DeformableTransformer(16, 2, 2, 2, 32, 0.0, 2, 2, 2)
    modules = [m for m in tr.modules() if isinstance(m, MSDeformAttn)]
    assert len(modules) == 4 and {m.backend for m in modules} == {"auto"}
    assert set_attention_backend(tr, "reference") is tr
    assert {m.backend for m in modules} == {"reference"}


def test_the_backend_is_checked_where_it_is_set():
    attn = MSDeformAttn(16, 2, 2, 2)
    message = r"backend must be one of \['auto', 'reference', 'kernel', 'triton'\], got 'gpu'"
    with pytest.raises(ValueError, match=message):
        attn.backend = "gpu"
    with pytest.raises(ValueError, match=message):          # even with no MSDeformAttn in it
        set_attention_backend(torch.nn.Linear(2, 2), "gpu")
    assert attn.backend == "auto"


def test_a_model_built_from_a_config_runs_on_its_attention_backend():
    model = build_model(get_config("cpu", {"attention_backend": "reference"}))[0]
    backends = {m.backend for m in model.modules() if isinstance(m, MSDeformAttn)}
    assert backends == {"reference"}
