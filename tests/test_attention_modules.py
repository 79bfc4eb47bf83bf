"""Dense and deformable attention modules against independent formulations."""
import math

import pytest
import torch

from ddetr.nn import DeformableAttention, MSDeformAttn, MultiHeadAttention
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
