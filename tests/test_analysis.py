"""ddetr.analysis: FLOP formulas against the flop counter, memory, slopes, entropy."""
import json
import math

import pytest
import torch

from ddetr.analysis import (attention_entropy, attention_sweep, deformable_attention_flops,
                            dense_attention_flops, ffn_flops, fit_loglog_slope, level_sizes,
                            load_kernel_benchmarks,
                            machine_name, measure_flops, ms_deformable_attention_flops,
                            peak_memory, pixel_reference_points, time_fn, trace_shapes,
                            uniform_entropy)
from ddetr.nn import DeformableAttention, MSDeformAttn, MultiHeadAttention


@pytest.mark.parametrize("lq,s", [(16, 16), (5, 40)])
def test_dense_flops_formula_matches_flop_counter(lq, s):
    torch.manual_seed(0)
    C = 32
    m = MultiHeadAttention(C, 4)
    q, kv = torch.randn(2, lq, C), torch.randn(2, s, C)
    with torch.no_grad():
        measured, per_op = measure_flops(lambda: m(q, kv, kv))
    assert measured == 2 * dense_attention_flops(lq, s, C)  # batch of 2
    assert set(per_op) <= {"aten.addmm", "aten.bmm", "aten.mm"}


def test_deformable_flops_formula_matches_linear_layers():
    C, M, K, side = 32, 4, 3, 6
    m = DeformableAttention(C, M, K)
    x = torch.randn(1, side * side, C)
    ref = pixel_reference_points(side, side)
    with torch.no_grad():
        measured, _ = measure_flops(lambda: m(x, ref, x, (side, side)))
    expected = deformable_attention_flops(side * side, side * side, C, M, K,
                                          with_sampling=False)
    assert measured == expected


def test_ms_deformable_flops_formula_matches_linear_layers():
    C, M, L, K = 16, 2, 2, 2
    m = MSDeformAttn(C, L, M, K, backend="reference")
    shapes = torch.tensor([[4, 4], [2, 2]])
    start = torch.tensor([0, 16])
    x = torch.randn(1, 20, C)
    ref = torch.rand(1, 7, L, 2)
    with torch.no_grad():
        measured, _ = measure_flops(lambda: m(x[:, :7], ref, x, shapes, start))
    assert measured == ms_deformable_attention_flops(7, 20, C, M, L, K, with_sampling=False)


def test_deformable_is_linear_and_dense_quadratic_in_pixels():
    C = 64
    d = [dense_attention_flops(n, n, C) for n in (10_000, 20_000)]
    f = [deformable_attention_flops(n, n, C) for n in (10_000, 20_000)]
    assert 3.8 < d[1] / d[0] < 4.0
    assert f[1] / f[0] == pytest.approx(2.0)


def test_peak_memory_sees_the_attention_matrix():
    torch.manual_seed(0)
    m = MultiHeadAttention(16, 2).eval()
    x = torch.randn(1, 300, 16)
    with torch.no_grad():
        peak, (out, weights) = peak_memory(lambda: m(x, x, x))
    assert out.shape == (1, 300, 16)
    assert peak >= weights.numel() * 4  # the (M, S, S) weights at least
    assert peak < 10 * weights.numel() * 4


def test_peak_memory_frees_dropped_tensors():
    def two_in_a_row():
        a = torch.ones(1000)  # 4000 bytes, dropped before b is made
        del a
        b = torch.ones(1000)
        return b
    peak, _ = peak_memory(two_in_a_row)
    assert peak == 4000


def test_fit_loglog_slope():
    x = [1, 2, 4, 8]
    assert fit_loglog_slope(x, [3 * v ** 2 for v in x])[0] == pytest.approx(2.0)
    with pytest.raises(ValueError):
        fit_loglog_slope([1], [1])


def test_entropy_of_uniform_is_log_n():
    for n in (1, 7, 1024):
        w = torch.full((3, n), 1 / n)
        assert torch.allclose(attention_entropy(w), torch.full((3,), math.log(n)), atol=1e-5)
        assert uniform_entropy(n) == pytest.approx(math.log(n))
    assert attention_entropy(torch.tensor([0.0, 1.0, 0.0])).item() == pytest.approx(0, abs=1e-6)
    with pytest.raises(ValueError):
        uniform_entropy(0)


def test_pixel_reference_points_are_centres_row_major():
    ref = pixel_reference_points(2, 4)
    assert ref.shape == (1, 8, 2)
    assert torch.allclose(ref[0, 1], torch.tensor([0.375, 0.25]))
    assert torch.allclose(ref[0, 4], torch.tensor([0.125, 0.75]))


def test_attention_sweep_small():
    r = attention_sweep([4, 6], d_model=16, n_heads=2, n_points=2, repeats=1)
    assert r["pixels"] == [16, 36]
    assert r["dense_flops"] == r["dense_flops_measured"]
    assert all(t > 0 for t in r["dense_seconds"] + r["deform_seconds"])
    assert all(b > 0 for b in r["dense_peak_bytes"] + r["deform_peak_bytes"])


def test_time_fn_returns_seconds():
    assert time_fn(lambda: sum(range(100)), repeats=2) >= 0


def test_load_kernel_benchmarks(tmp_path):
    result = {"device": "cpu", "machine": {"cpu": "Some CPU", "cpu_cores": 2,
                                           "torch_threads": 2, "torch": "2.x"},
              "shapes": {}}
    (tmp_path / "kernels_cpu.json").write_text(json.dumps(result))
    loaded = load_kernel_benchmarks(tmp_path)
    assert list(loaded) == ["cpu"]
    assert machine_name(loaded["cpu"]) == "Some CPU, 2 cores, 2 torch threads, torch 2.x"
    assert machine_name({"device": "cuda", "machine": {"gpu": "G", "cuda": "13.0"}}) == \
        "G, CUDA 13.0"
    with pytest.raises(FileNotFoundError, match="no benchmark folder"):
        load_kernel_benchmarks(tmp_path / "missing")


def test_trace_shapes():
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.ReLU(), torch.nn.Linear(3, 2))
    trace, out = trace_shapes(model, ["0", "2"], torch.randn(5, 4))
    assert trace == [("0", (5, 3)), ("2", (5, 2))]
    assert out.shape == (5, 2)
    with pytest.raises(ValueError):
        trace_shapes(model, ["nope"], torch.randn(5, 4))


def test_ffn_flops_matches_flop_counter():
    C, F, S = 16, 40, 7
    ffn = torch.nn.Sequential(torch.nn.Linear(C, F), torch.nn.ReLU(), torch.nn.Linear(F, C))
    with torch.no_grad():
        measured, _ = measure_flops(ffn, torch.randn(1, S, C))
    assert measured == ffn_flops(S, C, F)


def test_level_sizes_are_those_of_stride_2_convolutions():
    x = torch.zeros(1, 1, 50, 77)
    conv = torch.nn.Conv2d(1, 1, 3, stride=2, padding=1)
    sizes = []
    with torch.no_grad():
        for _ in range(4):
            x = conv(x)
            sizes.append(tuple(x.shape[-2:]))
    assert level_sizes(50, 77, strides=(2, 4, 8, 16)) == sizes
    assert level_sizes(800, 1216) == [(100, 152), (50, 76), (25, 38), (13, 19)]

