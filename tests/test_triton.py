"""The Triton kernels (backend="triton") against the reference and the naive loop.

Without a GPU the kernels run under Triton's interpreter on CPU tensors: the autouse
fixture ``interpreter`` sets TRITON_INTERPRET=1 for every test not marked ``cuda``.
Triton reads that variable when it decorates a kernel, and
``ddetr.ops.ms_deform_attn_triton`` decorates its kernels per call for the mode then in
force, so these tests share one process with any other (compiled GPU kernels
included) in any order. The shapes are small: the interpreter runs each program in
Python with numpy.

Forward and the three gradients (value, sampling_locations, attention_weights) in
float32 and float64, with float16 and bfloat16 against the float32 reference; the odd
layouts (1xW, Hx1, 1x1 levels, points outside, empty batch, Lq = 0, D not a power of
two); NaN and Inf as in the reference; the torch.library registration (opcheck,
torch.compile); the dispatcher; and the kernels compiled for sm_90 without a GPU.

The tests marked ``cuda`` run the compiled kernels on a GPU, unchanged, where one is.
"""
import importlib
import inspect

import pytest
import torch

triton = pytest.importorskip("triton")

from ddetr.ops import (kernel, ms_deform_attn, ms_deform_attn_naive,  # noqa: E402
                       ms_deform_attn_reference)
from ddetr.ops import ms_deform_attn_triton as tri  # noqa: E402
from op_inputs import (assert_location_grads_close, assert_matches_reference,  # noqa: E402
                       make_inputs, outputs_and_grads)

# the module of the dispatcher (ddetr.ops.ms_deform_attn is the function)
dispatch = importlib.import_module("ddetr.ops.ms_deform_attn")

needs_gpu = pytest.mark.skipif(not torch.cuda.is_available(),
                               reason="no CUDA device: the compiled Triton kernels need one")


@pytest.fixture(autouse=True)
def interpreter(request, monkeypatch):
    """TRITON_INTERPRET=1 for the CPU tests, unset for the GPU ones."""
    if request.node.get_closest_marker("cuda"):
        monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    else:
        monkeypatch.setenv("TRITON_INTERPRET", "1")


def triton_op(*args):
    return ms_deform_attn(*args, backend="triton")


def detached_copy(inputs, dtype=None):
    """The same inputs as new leaves (optionally cast), for a second implementation."""
    return [t.detach().to(dtype or t.dtype).requires_grad_() if t.is_floating_point() else t
            for t in inputs]


NAMES = ("output", "grad value", "grad sampling_locations", "grad attention_weights")
TOL = {torch.float32: dict(rtol=1e-5, atol=1e-5), torch.float64: dict(rtol=1e-10, atol=1e-10)}


def assert_all_close(got, want, msg="", **tol):
    for name, g, w in zip(NAMES, got, want):
        torch.testing.assert_close(g, w, **tol, msg=lambda m: f"{msg}{name}: {m}")


# ---- against the reference and the naive loop (interpreter) ------------------------------

CASES = [  # (N, levels, M, D, Lq, K)
    (2, [(5, 7), (3, 4), (1, 6)], 3, 5, 7, 2),         # D = 5 (padded to 8), a 1xW level
    (1, [(4, 1), (1, 1)], 2, 8, 5, 3),                  # an Hx1 and a 1x1 level
    (2, [(6, 6)], 1, 1, 4, 1),                          # L = K = D = 1
    (1, [(8, 9), (4, 5), (2, 3), (1, 2)], 8, 4, 9, 4),  # the paper's L = K = 4, M = 8
    (1, [(3, 4), (2, 2)], 4, 33, 5, 2),                 # D = 33: 64 lanes, 16 rows a block
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("case", CASES)
def test_matches_reference(case, dtype):
    inputs = make_inputs(*case, dtype=dtype)
    got = outputs_and_grads(triton_op, inputs)
    want = outputs_and_grads(ms_deform_attn_reference, detached_copy(inputs))
    assert_all_close(got, want, **TOL[dtype])


@pytest.mark.parametrize("case", CASES[:3])
def test_matches_naive_loop(case):
    """The independent oracle: forward and all three gradients, a few queries."""
    inputs = make_inputs(*case, dtype=torch.float64)
    got = outputs_and_grads(triton_op, inputs)
    want = outputs_and_grads(ms_deform_attn_naive, detached_copy(inputs))
    assert_all_close(got, want, **TOL[torch.float64])


@pytest.mark.parametrize("dtype, tol", [(torch.float16, 1e-2), (torch.bfloat16, 6e-2)])
def test_half_precision(dtype, tol):
    """Half inputs, float32 sums: against the float32 reference of the same (rounded)
    inputs; outputs and gradients come back in the input dtype."""
    inputs = make_inputs(*CASES[0], dtype=dtype)
    got = outputs_and_grads(triton_op, inputs)
    want = outputs_and_grads(ms_deform_attn_reference, detached_copy(inputs, torch.float32))
    for name, g, w in zip(NAMES, got, want):
        assert g.dtype == dtype, name
        scale = w.abs().max().clamp_min(1)  # location gradients carry a factor W
        torch.testing.assert_close(g.float() / scale, w / scale, rtol=tol, atol=tol,
                                   msg=lambda m: f"{name}: {m}")


def test_float64_gradcheck():
    value, ss, lsi, loc, w = make_inputs(1, [(3, 4), (1, 2)], 1, 2, 2, 2, dtype=torch.float64)
    # fast mode: a random projection of the Jacobian, few interpreter runs
    assert torch.autograd.gradcheck(lambda v, p, a: triton_op(v, ss, lsi, p, a),
                                    (value, loc, w), fast_mode=True)


def edge_locations(H, W):
    """(P, 2) points on pixel centres, on the borders of the map and of the outer
    pixel centres, half a pixel outside and far outside."""
    xs = [0.0, 1.0, 0.5 / W, 1 - 0.5 / W, -0.5 / W, 1 + 0.5 / W, 0.5, -1e6, 1e6, -0.25 / W]
    ys = [0.0, 1.0, 0.5 / H, 1 - 0.5 / H, -0.5 / H, 1 + 0.5 / H, 0.3, 1e6, -1e6, 1.25 / H]
    return torch.tensor([(x, y) for x in xs for y in ys], dtype=torch.float64)


def kinks(loc, spatial_shapes):
    """True where a coordinate sits on a kink of bilinear interpolation (u = x W - 1/2
    an integer in [-1, W - 1]); the location gradient is one-sided there."""
    sizes = spatial_shapes.flip(1).to(loc.dtype).view(1, 1, 1, -1, 1, 2)  # (W, H)
    u = loc * sizes - 0.5
    return (u == u.floor()) & (u >= -1) & (u <= sizes - 1)


@pytest.mark.parametrize("shapes", [[(4, 6)], [(1, 7)], [(5, 1)], [(1, 1)],
                                    [(1, 8), (3, 3), (1, 1)]])
def test_edges_match_reference_and_naive(shapes):
    M = 2
    pairs = edge_locations(*shapes[0])
    Lq, L = pairs.shape[0], len(shapes)
    value, ss, lsi, _, w = make_inputs(1, shapes, M, 3, Lq, 1, dtype=torch.float64)
    loc = pairs.view(1, Lq, 1, 1, 1, 2).expand(1, Lq, M, L, 1, 2).contiguous().requires_grad_()
    inputs = [value, ss, lsi, loc, w]
    got = outputs_and_grads(triton_op, inputs)
    want = outputs_and_grads(ms_deform_attn_reference, detached_copy(inputs))
    smooth = ~kinks(loc.detach(), ss)  # location gradients compared off the kinks
    assert smooth.any()
    got[2], want[2] = got[2][smooth], want[2][smooth]
    assert_all_close(got, want, **TOL[torch.float64])
    few = [t.detach() for t in inputs]
    few[3], few[4] = few[3][:, :20], few[4][:, :20]
    torch.testing.assert_close(triton_op(*few), ms_deform_attn_naive(*few))


def test_gradient_at_a_kink_is_the_right_derivative():
    """On a pixel-centre line the kernel differentiates towards the next pixel, as the
    C++ kernel and grid_sample do (floor)."""
    value = torch.tensor([0.0, 1.0, 5.0], dtype=torch.float64).view(1, 3, 1, 1)
    x = torch.tensor(1.5 / 3, dtype=torch.float64, requires_grad=True)  # centre of pixel 1
    loc = torch.stack([x, torch.tensor(0.5, dtype=torch.float64)]).view(1, 1, 1, 1, 1, 2)
    w = torch.ones(1, 1, 1, 1, 1, dtype=torch.float64)
    out = triton_op(value, torch.tensor([[1, 3]]), torch.tensor([0]), loc, w)
    assert out.item() == 1.0
    out.backward()
    assert x.grad.item() == pytest.approx((5.0 - 1.0) * 3)


@pytest.mark.parametrize("N, Lq", [(0, 5), (2, 0), (0, 0)])
def test_empty_batch_or_no_queries(N, Lq):
    inputs = make_inputs(N, [(3, 4), (2, 2)], 2, 4, Lq, 2)
    out = triton_op(*inputs)
    assert out.shape == (N, Lq, 8)
    out.sum().backward()
    for i in (0, 3, 4):
        assert inputs[i].grad.shape == inputs[i].shape
        assert inputs[i].grad.abs().sum() == 0


# ---- NaN and Inf: as in the reference ----------------------------------------------------

def with_special(inputs, which, index, special):
    """A copy of inputs with one entry of locations (which=3) or weights (4) replaced."""
    inputs = detached_copy(inputs)
    t = inputs[which].detach().clone()
    t[index] = special
    inputs[which] = t.requires_grad_()
    return inputs


SPECIALS = [float("nan"), float("inf"), float("-inf"), 1e30, -1e30]
# numpy (under the interpreter) warns when it multiplies Inf by 0; that is the point here
quiet_numpy = pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")


@quiet_numpy
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("special", SPECIALS)
@pytest.mark.parametrize("coordinate", [0, 1])
def test_nonfinite_locations_propagate_as_in_reference(dtype, special, coordinate):
    """A NaN/Inf coordinate makes its row NaN; its value gradient stays finite, its
    weight gradient is NaN, its location gradient is (0, NaN) for a bad x and (NaN, 0)
    for a bad y; a huge finite one reads zero with zero gradients."""
    base = make_inputs(2, [(4, 5), (2, 3)], 2, 3, 3, 2, dtype=dtype, spread=0)
    inputs = with_special(base, 3, (0, 1, 1, 0, 1, coordinate), special)
    got = outputs_and_grads(triton_op, inputs)
    want = outputs_and_grads(ms_deform_attn_reference, detached_copy(inputs))
    assert want[0].isnan().any() == (abs(special) == float("inf") or special != special)
    for name, g, w in zip(NAMES, got, want):
        torch.testing.assert_close(g, w, **TOL[dtype], equal_nan=True,
                                   msg=lambda m: f"{name}: {m}")


@quiet_numpy
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("special", [float("nan"), float("inf"), float("-inf")])
@pytest.mark.parametrize("inside", [True, False])
def test_nonfinite_weights_propagate_as_in_reference(dtype, special, inside):
    """NaN/Inf weights enter by multiplication. With an Inf weight the location
    gradient sums products of Inf in another order than grid_sample does, so only
    which of its entries are finite is compared there (Inf against NaN may differ)."""
    base = make_inputs(2, [(4, 5), (2, 3)], 2, 3, 3, 2, dtype=dtype, spread=0)
    base = detached_copy(base)
    if not inside:  # the point with the special weight falls outside every map
        base[3] = base[3].detach().index_put((torch.tensor([0]), torch.tensor([1]),
                                              torch.tensor([1]), torch.tensor([0]),
                                              torch.tensor([1])),
                                             torch.tensor([[5.0, -3.0]], dtype=dtype))
        base[3].requires_grad_()
    inputs = with_special(base, 4, (0, 1, 1, 0, 1), special)
    got = outputs_and_grads(triton_op, inputs)
    want = outputs_and_grads(ms_deform_attn_reference, detached_copy(inputs))
    assert want[0].isfinite().all().item() is False
    for i, (name, g, w) in enumerate(zip(NAMES, got, want)):
        if i == 2 and special != special:
            torch.testing.assert_close(g, w, **TOL[dtype], equal_nan=True,
                                       msg=lambda m: f"{name}: {m}")
        elif i == 2:
            assert torch.equal(g.isfinite(), w.isfinite()), name
            finite = w.isfinite()
            torch.testing.assert_close(g[finite], w[finite], **TOL[dtype])
        else:
            torch.testing.assert_close(g, w, **TOL[dtype], equal_nan=True,
                                       msg=lambda m: f"{name}: {m}")


# ---- the registered operator ---------------------------------------------------------------

def test_opcheck():
    """torch.library's own check: schema, fake kernel, autograd registration."""
    inputs = make_inputs(2, [(3, 4), (2, 2)], 2, 4, 5, 2)
    torch.library.opcheck(torch.ops.ddetr.ms_deform_attn_triton.default, inputs)
    grad = torch.randn(2, 5, 8)
    torch.library.opcheck(torch.ops.ddetr.ms_deform_attn_triton_backward.default,
                          (grad, *[t.detach() for t in inputs]))


def test_torch_compile_fullgraph():
    """backend="triton" inside a compiled function: one graph with the op in it (fake
    kernel for tracing, registered autograd for the backward)."""
    graphs = []

    def record(gm, example_inputs):
        graphs.append(str(gm.graph))
        return gm.forward

    inputs = make_inputs(2, [(5, 6), (3, 3)], 2, 4, 7, 3)
    compiled = torch.compile(triton_op, backend=record, fullgraph=True)
    got = outputs_and_grads(compiled, inputs)
    want = outputs_and_grads(ms_deform_attn_reference, detached_copy(inputs))
    assert len(graphs) == 1 and "ddetr.ms_deform_attn_triton" in graphs[0], graphs
    assert_all_close(got, want, **TOL[torch.float32])


def test_checks_and_errors():
    value, ss, lsi, loc, w = [t.detach() for t in make_inputs(2, [(4, 5)], 3, 4, 6, 2)]
    with pytest.raises(ValueError, match="sum to"):
        triton_op(value, torch.tensor([[4, 4]]), lsi, loc, w)
    with pytest.raises(TypeError, match="int64"):
        triton_op(value, ss.int(), lsi, loc, w)
    op = torch.ops.ddetr.ms_deform_attn_triton
    with pytest.raises(ValueError, match="attention_weights must be"):
        op(value, ss, lsi, loc, w[:, :3])
    with pytest.raises(TypeError, match="dtype of value"):
        op(value, ss, lsi, loc.double(), w)
    # strided inputs are made contiguous by the op itself
    strided = value.transpose(0, 1).contiguous().transpose(0, 1)
    torch.testing.assert_close(op(strided, ss, lsi, loc, w),
                               ms_deform_attn_reference(value, ss, lsi, loc, w))


def test_level_table_guard_reads_no_key_past_S():
    """A level table that claims more keys than value has, passed to the op directly
    (the wrapper would reject it): keys past S read zero, nothing outside is touched."""
    value, _, _, loc, w = [t.detach() for t in make_inputs(1, [(3, 4)], 2, 3, 8, 2,
                                                            spread=0)]
    wrong = torch.tensor([[4, 5]])  # 20 keys claimed, 12 there
    out = torch.ops.ddetr.ms_deform_attn_triton(value, wrong, torch.tensor([0]), loc, w)
    padded = torch.cat((value, value.new_zeros(1, 8, 2, 3)), dim=1)
    torch.testing.assert_close(out, ms_deform_attn_reference(padded, wrong,
                                                             torch.tensor([0]), loc, w))
    grad_value, _, _ = torch.ops.ddetr.ms_deform_attn_triton_backward(
        torch.ones_like(out), value, wrong, torch.tensor([0]), loc, w)
    assert grad_value.shape == value.shape and grad_value.isfinite().all()


# ---- the dispatcher ----------------------------------------------------------------------

def test_triton_on_cpu_needs_the_interpreter(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET")
    inputs = [t.detach() for t in make_inputs(1, [(3, 3)], 1, 2, 2, 1)]
    message = "backend='triton' needs a CUDA tensor or TRITON_INTERPRET=1"
    with pytest.raises(RuntimeError, match=message):
        triton_op(*inputs)
    with pytest.raises(RuntimeError, match=message):
        torch.ops.ddetr.ms_deform_attn_triton(*inputs)


def test_auto_on_cpu_never_takes_triton(monkeypatch):
    def refuse(*args):
        raise AssertionError("auto took Triton on a CPU tensor")

    def unsupported(value, num_levels=None):
        raise kernel.KernelUnsupportedError("not built in this test")

    monkeypatch.setattr(tri, "ms_deform_attn_triton", refuse)
    monkeypatch.setattr(kernel, "check_available", unsupported)
    inputs = [t.detach() for t in make_inputs(1, [(3, 3)], 1, 2, 2, 1)]
    torch.testing.assert_close(ms_deform_attn(*inputs), ms_deform_attn_reference(*inputs))


def test_the_chooser_follows_the_order(monkeypatch):
    """choose_backend's rule for a GPU tensor, run on a CPU tensor with the GPU's order
    (the interpreter makes Triton available): the first that can run; a failed build
    warns once and is passed over; with neither, the reference."""
    def no_nvcc(value, num_levels=None):
        raise kernel.KernelBuildError("no nvcc in this test")

    value, ss = torch.zeros(1, 1, 1, 1), torch.ones(1, 2, dtype=torch.int64)
    assert dispatch.AUTO_ORDER["cuda"] == ("kernel", "triton")
    monkeypatch.setitem(dispatch.AUTO_ORDER, "cpu", dispatch.AUTO_ORDER["cuda"])
    monkeypatch.setattr(kernel, "check_available", lambda value, num_levels=None: None)
    assert dispatch.choose_backend(value, ss) == "kernel"
    monkeypatch.setattr(kernel, "check_available", no_nvcc)
    monkeypatch.setattr(kernel, "_warned", set())
    with pytest.warns(RuntimeWarning, match="no nvcc in this test"):
        assert dispatch.choose_backend(value, ss) == "triton"
    monkeypatch.delenv("TRITON_INTERPRET")  # now neither fused one can run
    assert dispatch.choose_backend(value, ss) == "reference"
    assert dispatch.choose_backend(value, ss, "kernel") == "kernel"  # asked for: as asked


def test_bad_backend_lists_triton():
    inputs = [t.detach() for t in make_inputs(1, [(3, 3)], 1, 2, 2, 1)]
    with pytest.raises(ValueError, match="'triton'"):
        ms_deform_attn(*inputs, backend="tritonn")


# ---- compiled for a GPU, without one ---------------------------------------------------------

def _compile_for_sm90(fn, pointer_types, constexprs):
    from triton.backends.compiler import GPUTarget

    signature = {name: pointer_types.get(name, "*fp32") for name in fn.arg_names
                 if name.endswith("_ptr")}
    signature.update({name: "i32" for name in ("R", "S", "Lq_M", "M", "D", "L")})
    signature.update({name: "constexpr" for name in constexprs})
    source = triton.compiler.ASTSource(fn=fn, signature=signature, constexprs=constexprs)
    return triton.compile(source, target=GPUTarget("cuda", 90, 32))


@pytest.mark.skipif("constexprs" not in inspect.signature(triton.compiler.ASTSource).parameters,
                    reason="this Triton's ASTSource takes other arguments")
def test_kernels_compile_for_sm90_without_a_gpu(monkeypatch):
    """The interpreter is lax about types; the compiler is not. Both kernels go through
    Triton's whole pipeline (TTIR, TTGIR, LLVM IR, PTX, cubin) for an H100, with K = 1
    so it stays quick."""
    monkeypatch.delenv("TRITON_INTERPRET")
    forward, backward = tri._kernels()
    assert not tri.interpreting()
    block_r, block_d = tri._blocks(8)
    constexprs = dict(K=1, ACC=triton.language.float32, INDEX=triton.language.int64,
                      BLOCK_R=block_r, BLOCK_D=block_d)
    levels = {"shapes_ptr": "*i64", "starts_ptr": "*i64"}
    for fn, extra in ((forward, {"value_ptr": "*bf16"}), (backward, {})):
        compiled = _compile_for_sm90(fn, {**levels, **extra}, constexprs)
        assert "atom" in compiled.asm["ptx"] or fn is forward
        assert len(compiled.asm["cubin"]) > 0


@pytest.mark.slow
@pytest.mark.skipif("constexprs" not in inspect.signature(triton.compiler.ASTSource).parameters,
                    reason="this Triton's ASTSource takes other arguments")
def test_kernels_do_not_spill_at_the_paper_shape(monkeypatch, tmp_path):
    """K = 4, D = 32, float32, 32-bit offsets, the launch's block sizes: ptxas -v (the
    one shipped with Triton) reports no spill stores for either kernel on sm_90."""
    import subprocess
    from pathlib import Path

    ptxas = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas"
    if not ptxas.exists():
        pytest.skip("Triton ships no ptxas here")
    monkeypatch.delenv("TRITON_INTERPRET")
    block_r, block_d = tri._blocks(32)
    constexprs = dict(K=4, ACC=triton.language.float32, INDEX=triton.language.int32,
                      BLOCK_R=block_r, BLOCK_D=block_d)
    for fn in tri._kernels():
        compiled = _compile_for_sm90(fn, {"shapes_ptr": "*i64", "starts_ptr": "*i64"},
                                     constexprs)
        ptx = tmp_path / f"{fn.__name__}.ptx"
        ptx.write_text(compiled.asm["ptx"])
        report = subprocess.run([str(ptxas), "-v", "-arch=sm_90a", str(ptx), "-o", "/dev/null"],
                                capture_output=True, text=True, check=True).stderr
        print(fn.__name__, report)
        assert "0 bytes spill stores" in report, report


# ---- on a GPU: the compiled kernels ----------------------------------------------------------

# the kernel benchmark's shapes (ddetr's bench): (N, levels, M, D, Lq or None = S, K)
LEVELS = [(100, 150), (50, 75), (25, 38), (13, 19)]
BENCH_SHAPES = {
    "book": (4, [(32, 32), (16, 16), (8, 8), (4, 4)], 8, 16, None, 4),
    "decoder": (2, LEVELS, 8, 32, 300, 4),
    "encoder": (2, LEVELS, 8, 32, None, 4),
}
GPU_CASES = CASES + [
    (N, levels, M, D, Lq or sum(h * w for h, w in levels), K)
    for N, levels, M, D, Lq, K in BENCH_SHAPES.values()]
GPU_IDS = [f"case{i}" for i in range(len(CASES))] + list(BENCH_SHAPES)
GPU_TOL = {torch.float32: dict(rtol=1e-4, atol=2e-4),
           torch.float64: dict(rtol=1e-9, atol=1e-9),
           torch.float16: 1e-2, torch.bfloat16: 6e-2}


@needs_gpu
@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16,
                                   torch.bfloat16])
@pytest.mark.parametrize("case", GPU_CASES, ids=GPU_IDS)
def test_cuda_matches_reference(case, dtype):
    inputs = make_inputs(*case, dtype=dtype, device="cuda")
    got = outputs_and_grads(triton_op, inputs)
    if dtype in (torch.float32, torch.float64):  # against float64, either side of an edge
        assert_matches_reference(got, inputs, ms_deform_attn_reference, **GPU_TOL[dtype])
        return
    want = outputs_and_grads(ms_deform_attn_reference, detached_copy(inputs, torch.float32))
    tol = GPU_TOL[dtype]
    for name, g, w in zip(NAMES, got, want):
        assert g.dtype == dtype, name
        scale = w.abs().max().clamp_min(1)
        torch.testing.assert_close(g.float() / scale, w / scale, rtol=tol, atol=tol,
                                   msg=lambda m: f"{name}: {m}")


@pytest.fixture(scope="module")
def cuda_kernel():
    status = kernel.load_kernel(with_cuda=True)
    if status["cuda"] is not True:
        pytest.skip(f"the CUDA kernel is not built: {status['cuda']}")


@needs_gpu
@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("case", GPU_CASES, ids=GPU_IDS)
def test_cuda_matches_cuda_kernel(cuda_kernel, case, dtype):
    inputs = make_inputs(*case, dtype=dtype, device="cuda")
    got = outputs_and_grads(triton_op, inputs)
    want = outputs_and_grads(lambda *a: ms_deform_attn(*a, backend="kernel"),
                             detached_copy(inputs))
    for i in (0, 1, 3):
        torch.testing.assert_close(got[i], want[i], **GPU_TOL[dtype],
                                   msg=lambda m, i=i: f"{NAMES[i]}: {m}")
    # the two may round a point near a cell edge to different sides (either is right)
    assert_location_grads_close(got[2], want[2], inputs, ms_deform_attn_reference,
                                **GPU_TOL[dtype])


@needs_gpu
@pytest.mark.cuda
def test_cuda_float64_gradcheck():
    value, ss, lsi, loc, w = make_inputs(2, [(4, 5), (2, 3)], 2, 3, 4, 2,
                                         dtype=torch.float64, device="cuda")
    assert torch.autograd.gradcheck(lambda v, p, a: triton_op(v, ss, lsi, p, a), (value, loc, w))


@needs_gpu
@pytest.mark.cuda
@pytest.mark.parametrize("special", [float("nan"), float("inf"), 1e30])
def test_cuda_nonfinite_locations_as_in_reference(special):
    base = make_inputs(2, [(4, 5), (2, 3)], 2, 3, 3, 2, device="cuda", spread=0)
    inputs = with_special(base, 3, (0, 1, 1, 0, 1, 0), special)
    got = outputs_and_grads(triton_op, inputs)
    want = outputs_and_grads(ms_deform_attn_reference,
                             [t.detach().cpu().requires_grad_(t.is_floating_point())
                              for t in inputs])
    for name, g, w in zip(NAMES, got, want):
        torch.testing.assert_close(g.cpu(), w, **TOL[torch.float32], equal_nan=True,
                                   msg=lambda m: f"{name}: {m}")


@needs_gpu
@pytest.mark.cuda
@pytest.mark.parametrize("N, Lq", [(0, 5), (2, 0)])
def test_cuda_empty(N, Lq):
    inputs = make_inputs(N, [(3, 4), (2, 2)], 2, 4, Lq, 2, device="cuda")
    out = triton_op(*inputs)
    assert out.shape == (N, Lq, 8)
    out.sum().backward()
    for i in (0, 3, 4):
        assert inputs[i].grad.shape == inputs[i].shape and inputs[i].grad.abs().sum() == 0


@needs_gpu
@pytest.mark.cuda
def test_cuda_deterministic_mode_refuses_the_atomic_backward():
    inputs = make_inputs(1, [(3, 4)], 2, 4, 5, 2, device="cuda")
    out = triton_op(*inputs)
    previous = torch.are_deterministic_algorithms_enabled()
    try:
        torch.use_deterministic_algorithms(True)
        with pytest.raises(RuntimeError, match="not deterministic"):
            out.sum().backward()
    finally:
        torch.use_deterministic_algorithms(previous)


def test_deterministic_mode_allows_the_interpreter():
    """On the CPU (interpreter) the additions run in order: nothing to refuse."""
    inputs = make_inputs(1, [(3, 4)], 2, 4, 5, 2)
    previous = torch.are_deterministic_algorithms_enabled()
    try:
        torch.use_deterministic_algorithms(True)
        triton_op(*inputs).sum().backward()
    finally:
        torch.use_deterministic_algorithms(previous)
    assert inputs[0].grad.abs().sum() > 0


@needs_gpu
@pytest.mark.cuda
def test_cuda_torch_compile_inductor():
    inputs = make_inputs(2, [(12, 16), (6, 8)], 4, 16, 30, 4, device="cuda")
    compiled = torch.compile(triton_op, fullgraph=True)
    got = outputs_and_grads(compiled, inputs)
    want = outputs_and_grads(ms_deform_attn_reference, detached_copy(inputs))
    assert_all_close(got, want, **GPU_TOL[torch.float32])


@needs_gpu
@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_cuda_auto_takes_the_first_available_of_the_table(monkeypatch, dtype):
    """As the table says: the CUDA op where it is built, else Triton."""
    inputs = [t.detach() for t in make_inputs(1, [(3, 3)], 1, 2, 2, 1, dtype=dtype,
                                              device="cuda")]
    try:
        kernel.check_available(inputs[0])
        first = "kernel"
    except kernel.KernelUnavailableError:
        first = "triton"
    assert dispatch.choose_backend(inputs[0], inputs[1]) == first

    def no_nvcc(value, num_levels=None):
        raise kernel.KernelBuildError("no nvcc in this test")

    calls = []
    real = tri.ms_deform_attn_triton
    monkeypatch.setattr(tri, "ms_deform_attn_triton",
                        lambda *a: (calls.append("triton"), real(*a))[1])
    monkeypatch.setattr(kernel, "check_available", no_nvcc)
    with pytest.warns(RuntimeWarning, match="no nvcc in this test"):
        torch.testing.assert_close(ms_deform_attn(*inputs), ms_deform_attn_reference(*inputs))
    assert calls == ["triton"]
