"""The fused implementations of the operator against the grid_sample reference, one suite
for every (backend, device): the C++ kernel on the CPU and on a GPU, the Triton kernels
under Triton's interpreter on the CPU and compiled on a GPU.

Forward and the three gradients (value, sampling_locations, attention_weights) in
float32 and float64 against the float64 reference, location gradients near a cell edge
either one-sided derivative (op_inputs.assert_matches_reference); the naive loop as an
independent oracle; float16 and bfloat16 against the float32 reference; gradcheck in
float64; the edges of the sampling convention (pixel centres, borders, far outside, 1xW
and Hx1 levels); empty batch, Lq = 0 and D = 0; NaN, Inf and huge values as in the
reference; torch.library's opcheck; and the shapes that ``bench kernels`` times.

The GPU parameters are marked ``cuda`` (``-m cuda`` selects them, as .ci/gpu does) and
skip without a CUDA device. What belongs to one implementation alone stays in its file:
test_kernel.py (the build, the dispatcher, the C++ checks), test_kernel_cuda.py (nvcc,
memcheck, the CUDA kernel's layouts), test_triton.py (the interpreter, sm_90 code).
"""
import pytest
import torch

from ddetr.ops import kernel, ms_deform_attn, ms_deform_attn_naive, ms_deform_attn_reference
from op_inputs import assert_matches_reference, make_inputs, outputs_and_grads

NAMES = ("output", "grad value", "grad sampling_locations", "grad attention_weights")
TOL = {torch.float32: dict(rtol=1e-4, atol=2e-4), torch.float64: dict(rtol=1e-9, atol=1e-9)}
HALF_TOL = {torch.float16: 1e-2, torch.bfloat16: 6e-2}

BACKENDS = [pytest.param(("kernel", "cpu"), id="kernel-cpu"),
            pytest.param(("triton", "cpu"), id="triton-cpu"),
            pytest.param(("kernel", "cuda"), id="kernel-cuda", marks=pytest.mark.cuda),
            pytest.param(("triton", "cuda"), id="triton-cuda", marks=pytest.mark.cuda)]


class Impl:
    """One (backend, device): ``op(*inputs)`` runs it, ``inputs(...)`` makes inputs there."""

    def __init__(self, backend, device):
        self.backend, self.device = backend, device
        self.interpreted = backend == "triton" and device == "cpu"

    def op(self, *args):
        return ms_deform_attn(*args, backend=self.backend)

    def inputs(self, *args, **kwargs):
        return make_inputs(*args, device=self.device, **kwargs)

    def half_dtypes(self):
        return () if (self.backend, self.device) == ("kernel", "cpu") else tuple(HALF_TOL)


@pytest.fixture(params=BACKENDS)
def impl(request, monkeypatch):
    backend, device = request.param
    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip(f"no CUDA device: backend={backend!r} on a GPU cannot run here")
    if backend == "triton":
        pytest.importorskip("triton", reason="Triton is not installed")
        if device == "cpu":  # read when the kernels are decorated, per call
            monkeypatch.setenv("TRITON_INTERPRET", "1")
        else:
            monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    else:
        status = kernel.load_kernel(with_cuda=device == "cuda")
        if status[device] is not True:
            pytest.fail(f"the {device} kernel did not build: {status[device]}")
    return Impl(backend, device)


def copy_of(inputs, dtype=None, device=None):
    """The same inputs as new leaves (optionally cast or moved)."""
    return [t.detach().to(device=device or t.device,
                          dtype=dtype or t.dtype).requires_grad_() if t.is_floating_point()
            else t.to(device or t.device) for t in inputs]


def assert_all_close(got, want, names=NAMES, **tol):
    for name, g, w in zip(names, got, want):
        torch.testing.assert_close(g.to(w.device), w, **tol, msg=lambda m: f"{name}: {m}")


# ---- against the float64 reference ---------------------------------------------------------

CASES = [  # (N, levels, M, D, Lq, K)
    (2, [(5, 7), (3, 4), (1, 6)], 3, 5, 7, 2),           # D = 5, a 1xW level
    (1, [(4, 1), (1, 1)], 2, 8, 5, 3),                    # an Hx1 and a 1x1 level
    (2, [(6, 6)], 1, 1, 4, 1),                            # L = K = D = 1
    (1, [(8, 9), (4, 5), (2, 3), (1, 2)], 8, 4, 9, 4),    # the paper's L = K = 4, M = 8
    (1, [(3, 4), (2, 2)], 4, 33, 5, 2),                   # D = 33
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("case", CASES)
def test_matches_reference(impl, case, dtype):
    inputs = impl.inputs(*case, dtype=dtype)
    got = outputs_and_grads(impl.op, inputs)
    assert_matches_reference(got, inputs, ms_deform_attn_reference, **TOL[dtype])


@pytest.mark.parametrize("case", CASES[:3])
def test_matches_naive_loop(impl, case):
    """The independent oracle (a loop over every sample): forward and the gradients."""
    inputs = impl.inputs(*case, dtype=torch.float64)
    got = outputs_and_grads(impl.op, inputs)
    want = outputs_and_grads(ms_deform_attn_naive, copy_of(inputs, device="cpu"))
    assert_all_close(got, want, **TOL[torch.float64])


@pytest.mark.parametrize("loc_dtype", [None, torch.float32])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision(impl, dtype, loc_dtype):
    """float16/bfloat16 value, locations and weights in the same dtype or in float32 (what
    autocast gives); float32 sums. Against the float32 reference of the same (rounded)
    inputs; every result comes back in the dtype of its input."""
    if dtype not in impl.half_dtypes():
        pytest.skip(f"backend={impl.backend!r} on {impl.device} has no {dtype}")
    if loc_dtype is not None and impl.device == "cpu":
        pytest.skip("float32 locations beside a half value: on a GPU only (autocast)")
    inputs = impl.inputs(*CASES[0], dtype=dtype, loc_dtype=loc_dtype)
    got = outputs_and_grads(impl.op, inputs)
    want = outputs_and_grads(ms_deform_attn_reference, copy_of(inputs, torch.float32))
    tol = HALF_TOL[dtype]
    for name, g, w, i in zip(NAMES, got, want, (0, 0, 3, 4)):
        assert g.dtype == inputs[i].dtype, name
        scale = w.abs().max().clamp_min(1)  # location gradients carry a factor W
        torch.testing.assert_close(g.float() / scale, w / scale, rtol=tol, atol=tol,
                                   msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("N, shapes, M, D, Lq, K, seed", [
    (1, [(3, 4)], 1, 2, 3, 2, 0),
    (2, [(4, 5), (2, 3)], 2, 3, 4, 2, 1),
    (2, [(1, 6), (5, 1), (1, 1)], 3, 2, 3, 3, 2),
])
def test_float64_gradcheck(impl, N, shapes, M, D, Lq, K, seed):
    if impl.interpreted and seed:
        pytest.skip("under the interpreter one shape (and fast mode) keeps it to a second")
    value, ss, lsi, loc, w = impl.inputs(N, shapes, M, D, Lq, K, dtype=torch.float64,
                                         seed=seed)
    # the interpreter runs each program in Python: a random projection of the Jacobian
    assert torch.autograd.gradcheck(lambda v, p, a: impl.op(v, ss, lsi, p, a),
                                    (value, loc, w), fast_mode=impl.interpreted)


# ---- the sampling convention at its edges ----------------------------------------------------

def edge_locations(H, W):
    """(P, 2) points on pixel centres, on the borders of the map and of the outer pixel
    centres, a quarter and half a pixel outside, and far outside."""
    xs = [0.0, 1.0, 0.5 / W, 1 - 0.5 / W, -0.5 / W, 1 + 0.5 / W, 0.5, -1e6, 1e6, -3.0, 4.0,
          -0.25 / W, 1 + 0.25 / W]
    ys = [0.0, 1.0, 0.5 / H, 1 - 0.5 / H, -0.5 / H, 1 + 0.5 / H, 0.5, 1e6, -1e6, 0.3, 0.7,
          -0.25 / H, 1 + 0.25 / H]
    return torch.tensor([(x, y) for x in xs for y in ys], dtype=torch.float64)


def kinks(loc, spatial_shapes):
    """(N, Lq, M, L, K, 2) bool: True where the coordinate sits on a kink of bilinear
    interpolation, i.e. u = x W - 1/2 (or v) is an integer in [-1, W - 1]; the location
    gradient is one-sided there (test_gradient_at_a_kink_is_the_right_derivative)."""
    sizes = spatial_shapes.flip(1).to(loc).view(1, 1, 1, -1, 1, 2)  # (W, H)
    u = loc * sizes - 0.5
    return (u == u.floor()) & (u >= -1) & (u <= sizes - 1)


@pytest.mark.parametrize("shapes", [[(4, 6)], [(1, 7)], [(5, 1)], [(1, 1)],
                                    [(1, 8), (3, 3), (1, 1)]])
def test_edges_match_reference_and_naive(impl, shapes):
    M, L = 2, len(shapes)
    pairs = edge_locations(*shapes[0]).to(impl.device)
    Lq = pairs.shape[0]
    value, ss, lsi, _, w = impl.inputs(1, shapes, M, 3, Lq, 1, dtype=torch.float64)
    loc = pairs.view(1, Lq, 1, 1, 1, 2).expand(1, Lq, M, L, 1, 2).contiguous().requires_grad_()
    inputs = [value, ss, lsi, loc, w]
    got = outputs_and_grads(impl.op, inputs)
    want = outputs_and_grads(ms_deform_attn_reference, copy_of(inputs))
    # the output and the value and weight gradients are continuous: equal everywhere;
    # the location gradient is compared away from the kinks
    smooth = ~kinks(loc.detach(), ss)
    assert smooth.any()
    got[2], want[2] = got[2][smooth], want[2][smooth]
    assert_all_close(got, want, **TOL[torch.float64])
    few = [t.detach() for t in inputs]  # the loop is slow: a few queries
    few[3], few[4] = few[3][:, :20], few[4][:, :20]
    torch.testing.assert_close(impl.op(*few), ms_deform_attn_naive(*few))


def test_gradient_at_a_kink_is_the_right_derivative(impl):
    """On a pixel-centre line the kernels differentiate towards the next pixel (floor)."""
    f64 = dict(dtype=torch.float64, device=impl.device)
    value = torch.tensor([0.0, 1.0, 5.0], **f64).view(1, 3, 1, 1)
    x = torch.tensor(1.5 / 3, **f64, requires_grad=True)  # centre of pixel 1
    loc = torch.stack([x, torch.tensor(0.5, **f64)]).view(1, 1, 1, 1, 1, 2)
    w = torch.ones(1, 1, 1, 1, 1, **f64)
    ss, lsi = torch.tensor([[1, 3]], device=impl.device), torch.tensor([0], device=impl.device)
    out = impl.op(value, ss, lsi, loc, w)
    assert out.item() == 1.0
    out.backward()
    assert x.grad.item() == pytest.approx((5.0 - 1.0) * 3)  # slope towards pixel 2, times W


def test_points_far_outside_read_zero_and_have_zero_gradient(impl):
    value, ss, lsi, loc, w = impl.inputs(1, [(4, 4)], 1, 2, 3, 1, requires_grad=False)
    far = torch.tensor([1e30, -1e30, 1e8], device=impl.device).view(1, 3, 1, 1, 1, 1)
    loc = far.expand_as(loc).clone().requires_grad_()
    w.requires_grad_()
    out = impl.op(value, ss, lsi, loc, w)
    assert out.abs().max() == 0
    out.sum().backward()
    assert loc.grad.abs().max() == 0 and w.grad.abs().max() == 0


@pytest.mark.parametrize("N, Lq, D", [(0, 5, 4), (2, 0, 4), (0, 0, 4), (2, 5, 0), (2, 5, 8)])
def test_empty_batch_queries_or_channels(impl, N, Lq, D):
    """No batch, no queries or no channels: with a zero output gradient every gradient
    comes out exactly zero, never uninitialised memory (on a GPU fresh allocations three
    times; D = 8 is the control that has work to do)."""
    inputs = impl.inputs(N, [(3, 4), (2, 2)], 2, D, Lq, 2)
    for _ in range(3 if impl.device == "cuda" else 1):
        for i in (0, 3, 4):
            inputs[i].grad = None
        out = impl.op(*inputs)
        assert out.shape == (N, Lq, 2 * D)
        out.backward(torch.zeros_like(out))  # called even for an empty output
        for i in (0, 3, 4):
            assert inputs[i].grad.shape == inputs[i].shape
            assert inputs[i].grad.abs().sum() == 0, (i, inputs[i].grad)


# ---- NaN, Inf and huge values: as the reference ---------------------------------------------

SPECIAL = [float("nan"), float("inf"), float("-inf"), 1e30, -1e30, 1e8]


def special_inputs(dtype, D=3, seed=0):
    """Every special location coordinate (x or y, the other one ordinary) crossed with
    ordinary, NaN, +Inf, -Inf and zero weights; plus ordinary points with special
    weights. One query per case, two heads, two levels (one 1 x W); on the CPU."""
    shapes = [(3, 4), (1, 5)]
    M, L, K = 2, len(shapes), 2
    ordinary = [0.3, 0.45, 0.71, -0.05, 1.02]
    cases = [(sx, sy, a) for sx in SPECIAL + ordinary for sy in SPECIAL + ordinary
             if not (sx in ordinary and sy in ordinary and sx != sy)
             for a in (0.7, float("nan"), float("inf"), float("-inf"), 0.0)]
    inputs = make_inputs(1, shapes, M, D, len(cases), K, dtype=dtype, seed=seed,
                         requires_grad=False)
    loc, w = inputs[3], inputs[4]
    for q, (sx, sy, a) in enumerate(cases):
        # the special point is head 0, level q % L, point 0; the others stay ordinary
        loc[0, q, 0, q % L, 0] = torch.tensor([sx, sy], dtype=dtype)
        w[0, q, 0, q % L, 0] = a
    return inputs


def assert_same_specials(got, want, name, rtol, atol, finite_only=False):
    """Same NaN, +Inf and -Inf entries (with finite_only: the same non-finite entries);
    the finite entries close."""
    tests = ((("non-finite", lambda t: ~torch.isfinite(t)),) if finite_only else
             (("NaN", torch.isnan), ("+Inf", lambda t: t == float("inf")),
              ("-Inf", lambda t: t == float("-inf"))))
    for what, test in tests:
        differ = test(got) != test(want)
        assert not differ.any(), (f"{name}: {what} differs at {differ.nonzero()[:5].tolist()}"
                                  f" (got {got[differ][:5].tolist()}, "
                                  f"reference {want[differ][:5].tolist()})")
    finite = torch.isfinite(want)
    torch.testing.assert_close(got[finite], want[finite], rtol=rtol, atol=atol,
                               msg=lambda m: f"{name}: {m}")


# numpy (under the interpreter) warns when it multiplies Inf by 0; that is the point here
@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_nan_inf_and_huge_inputs_propagate_as_in_the_reference(impl, dtype):
    """Triton sums the products of an Inf weight in another order than grid_sample, so
    its location gradients there may be NaN where the reference has Inf: for Triton only
    which entries are finite is compared in that gradient."""
    tol = TOL[dtype] if dtype == torch.float64 else dict(rtol=1e-4, atol=1e-4)
    for D in ((3, 8, 32) if impl.device == "cuda" else (3,)):  # CUDA: generic, vectorised
        inputs = special_inputs(dtype, D)
        want = outputs_and_grads(ms_deform_attn_reference, copy_of(inputs))
        assert torch.isnan(want[0]).any() and torch.isnan(want[2]).any()  # the test bites
        got = outputs_and_grads(impl.op, copy_of(inputs, device=impl.device))
        for i, (name, g, w) in enumerate(zip(NAMES, got, want)):
            assert_same_specials(g.cpu(), w, f"D={D} {name}", **tol,
                                 finite_only=i == 2 and impl.backend == "triton")


# ---- the registered operator -----------------------------------------------------------------

def test_opcheck(impl):
    """torch.library's own check: schema, fake kernel, autograd registration."""
    name = "ms_deform_attn" if impl.backend == "kernel" else "ms_deform_attn_triton"
    inputs = impl.inputs(2, [(3, 4), (2, 2)], 2, 4, 5, 2)
    torch.library.opcheck(getattr(torch.ops.ddetr, name).default, inputs)
    grad = torch.randn(2, 5, 8, device=impl.device)
    torch.library.opcheck(getattr(torch.ops.ddetr, f"{name}_backward").default,
                          (grad, *[t.detach() for t in inputs]))


# ---- the shapes that bench kernels times -----------------------------------------------------

@pytest.mark.parametrize("shape", ["book", "decoder", "encoder"])
def test_benchmark_shapes_match_reference(impl, shape):
    """The shapes that ``bench kernels`` times (the book's model, the paper's decoder and
    encoder; inputs shaped like the model's), float32 against the float64 reference: a
    location gradient within float32 rounding of a cell edge may be either one-sided
    derivative (op_inputs.assert_location_grads_close, tests/test_location_gradients.py).
    On the CPU test_location_gradients.py runs the check at model-like sizes."""
    if impl.device == "cpu":
        pytest.skip("the benchmark shapes take seconds to minutes on the CPU: GPU only "
                    "(test_location_gradients.py runs the check on the CPU)")
    from ddetr.experiments.kernel_inputs import make_inputs as model_like_inputs

    inputs = model_like_inputs(shape, impl.device, torch.float32, requires_grad=True)
    got = outputs_and_grads(impl.op, inputs)
    assert_matches_reference(got, inputs, ms_deform_attn_reference, rtol=1e-3, atol=1e-3,
                             names=[f"{impl.backend}, {name}" for name in NAMES])
