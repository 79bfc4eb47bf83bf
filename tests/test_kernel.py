"""The fused CPU kernel against the grid_sample reference (and the naive loop).

Forward and the three gradients (value, sampling_locations, attention_weights):
float32 within a tolerance over randomized shapes, float64 with gradcheck; the edges of
the sampling convention (borders, far outside, 1xW levels); empty batch and Lq = 0;
the torch.library registration (opcheck, torch.compile, torch.export); and the
dispatcher's choices and errors.
"""
import warnings

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ddetr.ops import (kernel, level_start_index_of, ms_deform_attn, ms_deform_attn_naive,
                       ms_deform_attn_reference)
from op_inputs import make_inputs, outputs_and_grads


@pytest.fixture(scope="module", autouse=True)
def built_kernel():
    status = kernel.load_kernel(with_cuda=False)
    if status["cpu"] is not True:
        pytest.fail(f"the CPU kernel did not build: {status['cpu']}")


def fused(*args):
    return ms_deform_attn(*args, backend="kernel")


NAMES = ("output", "grad value", "grad sampling_locations", "grad attention_weights")


def assert_matches_reference(inputs, rtol=1e-4, atol=1e-4):
    got = outputs_and_grads(fused, inputs)
    want = outputs_and_grads(ms_deform_attn_reference, inputs)
    for name, g, w in zip(NAMES, got, want):
        torch.testing.assert_close(g, w, rtol=rtol, atol=atol, msg=lambda m: f"{name}: {m}")


# ---- randomized shapes, float32 -------------------------------------------------------

level = st.tuples(st.integers(1, 9), st.integers(1, 9))


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(N=st.integers(1, 3), shapes=st.lists(level, min_size=1, max_size=4),
       M=st.integers(1, 4), D=st.integers(1, 9), Lq=st.integers(1, 12),
       K=st.integers(1, 5), seed=st.integers(0, 2**16))
def test_float32_matches_reference(N, shapes, M, D, Lq, K, seed):
    assert_matches_reference(make_inputs(N, shapes, M, D, Lq, K, seed=seed))


def test_float32_larger_shape_matches_reference():
    # more keys than the hypothesis shapes, D of the paper's heads, and several threads
    assert_matches_reference(make_inputs(2, [(24, 32), (12, 16), (6, 8), (3, 4)],
                                         8, 32, 50, 4), rtol=1e-4, atol=2e-4)


# ---- float64: gradcheck -----------------------------------------------------------------

@pytest.mark.parametrize("N, shapes, M, D, Lq, K, seed", [
    (1, [(3, 4)], 1, 2, 3, 2, 0),
    (2, [(4, 5), (2, 3)], 2, 3, 4, 2, 1),
    (2, [(1, 6), (5, 1), (1, 1)], 3, 2, 3, 3, 2),
])
def test_float64_gradcheck(N, shapes, M, D, Lq, K, seed):
    value, ss, lsi, loc, w = make_inputs(N, shapes, M, D, Lq, K, dtype=torch.float64,
                                         seed=seed)
    # keep points off the pixel-centre grid lines where bilinear is not differentiable
    assert torch.autograd.gradcheck(lambda v, p, a: fused(v, ss, lsi, p, a), (value, loc, w))


def test_float64_matches_reference_tightly():
    assert_matches_reference(make_inputs(2, [(6, 7), (3, 4), (1, 5)], 4, 8, 20, 4,
                                         dtype=torch.float64), rtol=1e-10, atol=1e-10)


# ---- the sampling convention at its edges ---------------------------------------------

def edge_locations(shapes, M, K):
    """Points exactly on pixel centres, on the borders of the map and of the outer
    pixel centres, and far outside; one row of (x, y) per query."""
    H, W = shapes[0]
    xs = [0.0, 1.0, 0.5 / W, 1 - 0.5 / W, -0.5 / W, 1 + 0.5 / W, 0.5, -1e6, 1e6, -3.0, 4.0,
          -0.25 / W, 1 + 0.25 / W]
    ys = [0.0, 1.0, 0.5 / H, 1 - 0.5 / H, -0.5 / H, 1 + 0.5 / H, 0.5, 1e6, -1e6, 0.3, 0.7,
          -0.25 / H, 1 + 0.25 / H]
    pairs = [(x, y) for x in xs for y in ys]
    return torch.tensor(pairs, dtype=torch.float64)


def kinks(loc, spatial_shapes):
    """(N, Lq, M, L, K, 2) bool: True where the coordinate sits on a kink of bilinear
    interpolation, i.e. u = x W - 1/2 (or v) is an integer in [-1, W - 1] (a pixel
    centre line, or the line one pixel outside the map). The derivative along that
    coordinate is one-sided there: the kernel takes the right derivative (its floor);
    grid_sample's side depends on the rounding of its own coordinate arithmetic."""
    sizes = spatial_shapes.flip(1).to(loc.dtype).view(1, 1, 1, -1, 1, 2)  # (W, H)
    u = loc * sizes - 0.5
    return (u == u.floor()) & (u >= -1) & (u <= sizes - 1)


@pytest.mark.parametrize("shapes", [[(4, 6)], [(1, 7)], [(5, 1)], [(1, 1)],
                                    [(1, 8), (3, 3), (1, 1)]])
def test_edges_match_reference_and_naive(shapes):
    M, K = 2, 1
    pairs = edge_locations(shapes, M, K)  # (P, 2)
    Lq = pairs.shape[0]
    value, ss, lsi, _, w = make_inputs(1, shapes, M, 3, Lq, K, dtype=torch.float64,
                                       requires_grad=False)
    L = len(shapes)
    loc = pairs.view(1, Lq, 1, 1, 1, 2).expand(1, Lq, M, L, K, 2).contiguous()
    inputs = [value.requires_grad_(), ss, lsi, loc.requires_grad_(), w.requires_grad_()]
    got = outputs_and_grads(fused, inputs)
    want = outputs_and_grads(ms_deform_attn_reference, inputs)
    # the output and the gradients of value and weights are continuous: equal everywhere;
    # the location gradient is compared away from the kinks
    smooth = ~kinks(loc.detach(), ss)
    assert smooth.any()
    got[2], want[2] = got[2][smooth], want[2][smooth]
    for name, g, r in zip(NAMES, got, want):
        torch.testing.assert_close(g, r, rtol=1e-9, atol=1e-9, msg=lambda m: f"{name}: {m}")
    # the independent loop agrees on the forward (it is slow: a few queries suffice)
    few = [t.detach() for t in inputs]
    few[3], few[4] = few[3][:, :20], few[4][:, :20]
    torch.testing.assert_close(fused(*few), ms_deform_attn_naive(*few))


def test_gradient_at_a_kink_is_the_right_derivative():
    """On a pixel-centre line the kernel differentiates towards the next pixel."""
    value = torch.tensor([0.0, 1.0, 5.0], dtype=torch.float64).view(1, 3, 1, 1)
    ss = torch.tensor([[1, 3]])
    lsi = torch.tensor([0])
    x = torch.tensor(1.5 / 3, dtype=torch.float64, requires_grad=True)  # centre of pixel 1
    loc = torch.stack([x, torch.tensor(0.5, dtype=torch.float64)]).view(1, 1, 1, 1, 1, 2)
    w = torch.ones(1, 1, 1, 1, 1, dtype=torch.float64)
    out = fused(value, ss, lsi, loc, w)
    assert out.item() == 1.0
    out.backward()
    assert x.grad.item() == pytest.approx((5.0 - 1.0) * 3)  # slope towards pixel 2, times W


def test_points_far_outside_read_zero_and_have_zero_gradient():
    value, ss, lsi, loc, w = make_inputs(1, [(4, 4)], 1, 2, 3, 1, requires_grad=False)
    loc = torch.tensor([1e30, -1e30, 1e8]).view(1, 3, 1, 1, 1, 1).expand_as(loc).clone()
    loc.requires_grad_()
    w.requires_grad_()
    out = fused(value, ss, lsi, loc, w)
    assert out.abs().max() == 0
    out.sum().backward()
    assert loc.grad.abs().max() == 0 and w.grad.abs().max() == 0


# ---- empty inputs ------------------------------------------------------------------------

@pytest.mark.parametrize("N, Lq, D", [(0, 5, 4), (2, 0, 4), (0, 0, 4), (2, 5, 0)])
def test_empty_batch_or_no_queries(N, Lq, D):
    inputs = make_inputs(N, [(3, 4), (2, 2)], 2, D, Lq, 2)
    out = fused(*inputs)
    assert out.shape == (N, Lq, 2 * D)
    out.backward(torch.zeros_like(out))  # called even for an empty output
    for i in (0, 3, 4):
        assert inputs[i].grad.shape == inputs[i].shape
        assert inputs[i].grad.abs().sum() == 0


# ---- the registered operator: opcheck, compile, export ----------------------------------

def test_opcheck():
    """torch.library's own check: schema, fake kernel, autograd registration."""
    inputs = make_inputs(2, [(3, 4), (2, 2)], 2, 4, 5, 2)
    torch.library.opcheck(torch.ops.ddetr.ms_deform_attn.default, inputs)
    grad = torch.randn(2, 5, 8)
    torch.library.opcheck(torch.ops.ddetr.ms_deform_attn_backward.default,
                          (grad, *[t.detach() for t in inputs]))


@pytest.mark.parametrize("compiler", ["aot_eager", "inductor"])
def test_torch_compile_fullgraph(compiler):
    """The default backend ("auto") inside a compiled function: one graph, the fused op
    in it (fake kernel for tracing, registered autograd for the backward)."""
    inputs = make_inputs(2, [(5, 6), (3, 3)], 2, 4, 7, 3)
    compiled = torch.compile(ms_deform_attn, backend=compiler, fullgraph=True)
    got = outputs_and_grads(compiled, inputs)
    want = outputs_and_grads(ms_deform_attn_reference, inputs)
    for name, g, w in zip(NAMES, got, want):
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-4, msg=lambda m: f"{name}: {m}")


def test_compiled_graph_calls_the_fused_op():
    graphs = []

    def record(gm, example_inputs):
        graphs.append(str(gm.graph))
        return gm.forward

    inputs = make_inputs(2, [(5, 6), (3, 3)], 2, 4, 7, 3)
    torch.compile(ms_deform_attn, backend=record, fullgraph=True)(*inputs)
    assert len(graphs) == 1 and "ddetr.ms_deform_attn" in graphs[0], graphs


def test_torch_export():
    class Attn(torch.nn.Module):
        def forward(self, value, spatial_shapes, level_start_index, locations, weights):
            return ms_deform_attn(value, spatial_shapes, level_start_index, locations,
                                  weights, backend="kernel")

    inputs = [t.detach() for t in make_inputs(2, [(5, 6), (3, 3)], 2, 4, 7, 3)]
    program = torch.export.export(Attn(), tuple(inputs))
    assert "ddetr.ms_deform_attn" in str(program.graph)
    torch.testing.assert_close(program.module()(*inputs), ms_deform_attn_reference(*inputs))


# ---- the dispatcher: choices and errors ----------------------------------------------------

def test_auto_uses_the_kernel_on_cpu(monkeypatch):
    calls = []
    real = kernel.ms_deform_attn_kernel

    def spy(*args):
        calls.append(args[0].shape)
        return real(*args)

    monkeypatch.setattr(kernel, "ms_deform_attn_kernel", spy)
    inputs = [t.detach() for t in make_inputs(1, [(3, 3)], 1, 2, 2, 1)]
    ms_deform_attn(*inputs)
    assert calls == [inputs[0].shape]
    ms_deform_attn(*inputs, backend="reference")
    assert len(calls) == 1


def test_auto_falls_back_silently_for_half_on_cpu():
    inputs = [t.detach().half() if t.is_floating_point() else t
              for t in make_inputs(1, [(3, 3)], 1, 2, 2, 1)]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out = ms_deform_attn(*inputs)
    assert out.dtype == torch.float16
    with pytest.raises(RuntimeError, match="float16"):
        fused(*inputs)


def test_failed_build_warns_once_and_falls_back(monkeypatch):
    monkeypatch.setitem(kernel._loaded, "cpu", "CalledProcessError: g++ not found")
    monkeypatch.setattr(kernel, "_warned", set())
    inputs = [t.detach() for t in make_inputs(1, [(3, 3)], 1, 2, 2, 1)]
    with pytest.warns(RuntimeWarning, match="g\\+\\+ not found"):
        out = ms_deform_attn(*inputs)
    torch.testing.assert_close(out, ms_deform_attn_reference(*inputs))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ms_deform_attn(*inputs)  # no second warning
    with pytest.raises(RuntimeError, match="failed to build"):
        fused(*inputs)


def test_real_build_failure_is_reported(monkeypatch, tmp_path):
    """A source that does not compile: the loader keeps the compiler's complaint, "auto"
    warns with it and uses the reference, "kernel" raises with it."""
    broken = tmp_path / "csrc"
    broken.mkdir()
    for source in kernel.CPU_SOURCES:
        (broken / source).write_text("#error deliberately broken for a test\n")
    monkeypatch.setattr(kernel, "CSRC", broken)
    monkeypatch.setenv("DDETR_BUILD_DIR", str(tmp_path / "build"))
    monkeypatch.setattr(kernel, "_loaded", {"cpu": None, "cuda": None})
    monkeypatch.setattr(kernel, "_warned", set())
    status = kernel.load_kernel(with_cuda=False)
    assert "deliberately broken" in status["cpu"], status
    inputs = [t.detach() for t in make_inputs(1, [(3, 3)], 1, 2, 2, 1)]
    with pytest.warns(RuntimeWarning, match="deliberately broken"):
        out = ms_deform_attn(*inputs)
    torch.testing.assert_close(out, ms_deform_attn_reference(*inputs))
    with pytest.raises(RuntimeError, match="deliberately broken"):
        fused(*inputs)


def test_auto_falls_back_by_exception_type(monkeypatch):
    """auto's choice follows the exception's type, whatever its message says: a build
    error warns and uses the reference, an unsupported device or dtype uses the
    reference silently, any other error propagates; "kernel" raises the typed error."""
    inputs = [t.detach() for t in make_inputs(1, [(3, 3)], 1, 2, 2, 1)]
    want = ms_deform_attn_reference(*inputs)

    def check_raising(error):
        def check_available(value, num_levels=None):
            raise error
        return check_available

    monkeypatch.setattr(kernel, "check_available",
                        check_raising(kernel.KernelBuildError("no compiler on this test")))
    with pytest.warns(RuntimeWarning, match="no compiler on this test"):
        torch.testing.assert_close(ms_deform_attn(*inputs), want)
    monkeypatch.setattr(kernel, "check_available", check_raising(
        kernel.KernelUnsupportedError("unsupported, though this text says failed to build")))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        torch.testing.assert_close(ms_deform_attn(*inputs), want)
    monkeypatch.setattr(kernel, "check_available", check_raising(ValueError("a bug")))
    with pytest.raises(ValueError, match="a bug"):
        ms_deform_attn(*inputs)
    monkeypatch.undo()
    half = [t.half() if t.is_floating_point() else t for t in inputs]
    with pytest.raises(kernel.KernelUnsupportedError, match="backend='kernel'.*float16"):
        fused(*half)


def test_wrapper_makes_inputs_contiguous():
    value, ss, lsi, loc, w = [t.detach() for t in make_inputs(2, [(4, 5)], 3, 4, 6, 2)]
    value_t = value.transpose(0, 1).contiguous().transpose(0, 1)  # same values, strided
    assert not value_t.is_contiguous()
    torch.testing.assert_close(fused(value_t, ss, lsi, loc, w),
                               ms_deform_attn_reference(value, ss, lsi, loc, w))


def test_cpp_checks_give_clear_errors():
    """Direct calls of torch.ops.ddetr.*: TypeError / ValueError with a clear message."""
    value, ss, lsi, loc, w = [t.detach() for t in make_inputs(2, [(4, 5)], 3, 4, 6, 2)]
    op = torch.ops.ddetr.ms_deform_attn
    strided = value.transpose(0, 1).contiguous().transpose(0, 1)
    with pytest.raises(ValueError, match="value must be contiguous"):
        op(strided, ss, lsi, loc, w)
    with pytest.raises(ValueError, match="level_start_index\\[0\\] must be 0"):
        op(value, ss, lsi + 1, loc, w)
    with pytest.raises(TypeError, match="share one dtype"):
        op(value, ss, lsi, loc.double(), w)
    with pytest.raises(TypeError, match="spatial_shapes must be int64"):
        op(value, ss.int(), lsi, loc, w)
    with pytest.raises(ValueError, match="attention_weights must be"):
        op(value, ss, lsi, loc, w[:, :3])


def test_python_checks_run_before_the_kernel():
    value, ss, lsi, loc, w = [t.detach() for t in make_inputs(2, [(4, 5)], 3, 4, 6, 2)]
    with pytest.raises(ValueError, match="sum to"):
        fused(value, torch.tensor([[4, 4]]), lsi, loc, w)
    with pytest.raises(TypeError, match="int64"):
        fused(value, ss.int(), lsi, loc, w)


# ---- NaN, Inf and huge values: as the reference ---------------------------------------------

SPECIAL = [float("nan"), float("inf"), float("-inf"), 1e30, -1e30, 1e8]


def special_inputs(dtype, seed=0):
    """Every special location coordinate (x or y, the other one ordinary) crossed with
    ordinary, NaN, +Inf, -Inf and zero weights; plus ordinary points with special
    weights. One query per case, two heads, two levels (one 1 x W)."""
    gen = torch.Generator().manual_seed(seed)
    shapes = [(3, 4), (1, 5)]
    M, D, L, K = 2, 3, len(shapes), 2
    cases = []
    ordinary = [0.3, 0.45, 0.71, -0.05, 1.02]
    for sx in SPECIAL + ordinary:
        for sy in SPECIAL + ordinary:
            if sx in ordinary and sy in ordinary and sx != sy:
                continue
            for a in (0.7, float("nan"), float("inf"), float("-inf"), 0.0):
                cases.append((sx, sy, a))
    Lq = len(cases)
    ss = torch.tensor(shapes)
    lsi = level_start_index_of(ss)
    S = int(ss.prod(1).sum())
    value = torch.randn(1, S, M, D, generator=gen, dtype=dtype)
    loc = torch.rand(1, Lq, M, L, K, 2, generator=gen, dtype=dtype)
    w = torch.rand(1, Lq, M, L, K, generator=gen, dtype=dtype)
    for q, (sx, sy, a) in enumerate(cases):
        # the special point is head 0, level q % L, point 0; the others stay ordinary
        loc[0, q, 0, q % L, 0] = torch.tensor([sx, sy], dtype=dtype)
        w[0, q, 0, q % L, 0] = a
    return [value, ss, lsi, loc, w]


def assert_same_specials(got, want, name, rtol, atol):
    """Same NaN, +Inf and -Inf entries; the finite entries close."""
    for what, test in (("NaN", torch.isnan), ("+Inf", lambda t: t == float("inf")),
                       ("-Inf", lambda t: t == float("-inf"))):
        differ = test(got) != test(want)
        assert not differ.any(), (f"{name}: {what} differs at {differ.nonzero()[:5].tolist()}"
                                  f" (kernel {got[differ][:5].tolist()}, "
                                  f"reference {want[differ][:5].tolist()})")
    finite = torch.isfinite(want)
    torch.testing.assert_close(got[finite], want[finite], rtol=rtol, atol=atol,
                               msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_nan_inf_and_huge_inputs_propagate_as_in_the_reference(dtype):
    inputs = special_inputs(dtype)
    for t in (inputs[0], inputs[3], inputs[4]):
        t.requires_grad_()
    got = outputs_and_grads(fused, inputs)
    want = outputs_and_grads(ms_deform_attn_reference, inputs)
    assert torch.isnan(want[0]).any() and torch.isnan(want[2]).any()  # the test bites
    tol = dict(rtol=1e-4, atol=1e-4) if dtype == torch.float32 else dict(rtol=1e-9, atol=1e-9)
    for name, g, w in zip(NAMES, got, want):
        assert_same_specials(g, w, name, **tol)


# ---- level tables ----------------------------------------------------------------------------

def test_inconsistent_level_tables_never_reach_the_kernel():
    value, ss, lsi, loc, w = [t.detach() for t in make_inputs(1, [(4, 5), (2, 3)], 2, 4, 6, 2)]
    op = torch.ops.ddetr.ms_deform_attn
    bad = [(torch.tensor([[4, 5], [2, 4]]), lsi, "sum to"),       # too many keys
           (torch.tensor([[4, 5], [1, 3]]), lsi, "sum to"),       # too few
           (ss, torch.tensor([0, 21]), "level_start_index"),      # start past the end
           (torch.tensor([[-4, -5], [2, 3]]), lsi, "positive"),
           (torch.tensor([[4, 5], [1 << 40, 1 << 40]]), lsi, "positive|sum to|fit")]
    for bad_ss, bad_lsi, message in bad:
        with pytest.raises(ValueError, match=message):
            fused(value, bad_ss, bad_lsi, loc, w)
        with pytest.raises(ValueError, match=message):  # the C++ entry point checks too
            op(value, bad_ss, bad_lsi, loc, w)
        with pytest.raises(ValueError, match=message):
            torch.ops.ddetr.ms_deform_attn_backward(torch.zeros(1, 6, 8), value, bad_ss,
                                                    bad_lsi, loc, w)


def test_level_tables_are_checked_once_per_tensor(monkeypatch):
    from ddetr.ops import checks

    ss, lsi = checks.level_tables([(4, 5), (2, 3)])
    torch.testing.assert_close(ss, torch.tensor([[4, 5], [2, 3]]))
    torch.testing.assert_close(lsi, torch.tensor([0, 20]))
    value, _, _, loc, w = [t.detach() for t in make_inputs(1, [(4, 5), (2, 3)], 2, 4, 6, 2)]
    reads = []
    real = checks._validate
    monkeypatch.setattr(checks, "_validate",
                        lambda *a: (reads.append(1), real(*a))[1])
    fused(value, ss, lsi, loc, w)  # built by level_tables: known valid, never read
    fused(value, ss, lsi, loc, w)
    assert reads == []
    other_ss, other_lsi = ss.clone(), lsi.clone()  # unknown tensors: checked once
    fused(value, other_ss, other_lsi, loc, w)
    fused(value, other_ss, other_lsi, loc, w)
    assert reads == [1]
    other_lsi[1] = 19  # an in-place change is noticed (version counter)
    with pytest.raises(ValueError, match="level_start_index"):
        fused(value, other_ss, other_lsi, loc, w)
    with pytest.raises(ValueError, match="sum to"):  # a known table, the wrong S
        fused(value[:, :25], ss, lsi, loc, w)
    with pytest.raises(TypeError, match="Python ints"):
        checks.level_tables([(4.0, 5)])


# ---- deterministic algorithms ------------------------------------------------------------------

def test_cpu_backward_is_allowed_and_deterministic_under_deterministic_algorithms():
    """The CPU backward splits the work by (batch, head): no atomics, the same sums in
    the same order on every run, so torch.use_deterministic_algorithms allows it."""
    before = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        inputs = make_inputs(2, [(12, 16), (6, 8)], 4, 16, 60, 4)
        first = outputs_and_grads(fused, inputs)
        second = outputs_and_grads(fused, inputs)
    finally:
        torch.use_deterministic_algorithms(before)
    for name, a, b in zip(NAMES, first, second):
        assert torch.equal(a, b), name


# ---- the build key -----------------------------------------------------------------------------

def test_cuda_library_name_depends_on_the_arch_list(monkeypatch):
    names = {kernel.cuda_library_name(archs) for archs in
             ("8.0;9.0", "8.0;9.0+PTX", "9.0", "8.6", "9.0a", "8.0 9.0")}
    assert len(names) == 5  # "8.0;9.0" and "8.0 9.0" are one list
    assert kernel.cuda_library_name("8.0;9.0+PTX") == "ddetr_msda_cuda_80_90ptx"
    monkeypatch.setenv("TORCH_CUDA_ARCH_LIST", "8.6+PTX")
    assert kernel.cuda_arch_list() == "8.6+PTX"
    with pytest.raises(ValueError, match="at least one"):
        kernel.cuda_library_name(" ; ")
