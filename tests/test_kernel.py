"""The fused CPU kernel: what only it has.

Forward and the three gradients against the grid_sample reference over randomized
shapes (hypothesis); torch.compile and torch.export of the registered op; the
dispatcher's choices and errors; the C++ checks of the level tables; its deterministic
backward; and the build key. The cases every implementation shares (the reference, the
naive loop, gradcheck, the edges of the sampling convention, empty inputs, NaN and Inf,
opcheck) are in test_ms_deform_attn_backends.py, run here as ``kernel-cpu``.
"""
import warnings

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ddetr.ops import kernel, ms_deform_attn, ms_deform_attn_reference
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


# ---- the registered operator: compile, export ----------------------------------------

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
