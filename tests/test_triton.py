"""The Triton kernels (backend="triton"): what only they have.

Without a GPU the kernels run under Triton's interpreter on CPU tensors: the autouse
fixture ``interpreter`` sets TRITON_INTERPRET=1 for every test not marked ``cuda``.
Triton reads that variable when it decorates a kernel, and
``ddetr.ops.ms_deform_attn_triton`` decorates its kernels per call for the mode then in
force, so these tests share one process with any other (compiled GPU kernels
included) in any order. The shapes are small: the interpreter runs each program in
Python with numpy.

torch.compile of the registered op, its checks and the level-table guard; the
dispatcher; the kernels compiled for sm_90 without a GPU; on a GPU the agreement with
the CUDA kernel, determinism and inductor. The cases every implementation shares (the
reference, the naive loop, half precision, gradcheck, the edges of the sampling
convention, empty inputs, NaN and Inf, opcheck, the benchmark shapes) are in
test_ms_deform_attn_backends.py, run there as ``triton-cpu`` (the interpreter) and
``triton-cuda``.

The tests marked ``cuda`` run the compiled kernels on a GPU, unchanged, where one is.
"""
import importlib
import inspect

import pytest
import torch

triton = pytest.importorskip("triton")

from ddetr.ops import kernel, ms_deform_attn, ms_deform_attn_reference  # noqa: E402
from ddetr.ops import ms_deform_attn_triton as tri  # noqa: E402
from op_inputs import (assert_location_grads_close, make_inputs,  # noqa: E402
                       outputs_and_grads)
from test_ms_deform_attn_backends import CASES  # noqa: E402

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


# ---- the registered operator ---------------------------------------------------------------

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


def test_auto_on_cpu_never_takes_triton():
    """Under the interpreter Triton can run CPU tensors, yet "auto" never picks it there:
    the CPU kernel where it runs (float32), else the reference (float16, which the CPU
    kernel refuses and Triton would take)."""
    inputs = [t.detach() for t in make_inputs(1, [(3, 3)], 1, 2, 2, 1)]
    half = [t.half() if t.is_floating_point() else t for t in inputs]
    tri.check_available(half[0])  # Triton could run it: raises if not
    with pytest.raises(kernel.KernelUnsupportedError, match="float16"):
        kernel.check_available(half[0])
    assert dispatch.choose_backend(half[0], half[1]) == "reference"
    assert dispatch.choose_backend(inputs[0], inputs[1]) == "kernel"
    torch.testing.assert_close(ms_deform_attn(*half), ms_deform_attn_reference(*half))
    assert dispatch.choose_backend(half[0], half[1], "triton") == "triton"  # asked for


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
GPU_TOL = {torch.float32: dict(rtol=1e-4, atol=2e-4), torch.float64: dict(rtol=1e-9, atol=1e-9)}


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
