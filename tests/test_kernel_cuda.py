"""The CUDA kernel: it compiles (here, without a GPU), and on a GPU its instantiations
(the SHAPES below) agree with the reference and with the CPU kernel, and it runs clean
under compute-sanitizer. The cases every implementation shares (gradcheck, the edges of
the sampling convention, empty inputs, NaN and Inf, opcheck, the benchmark shapes) are
in test_ms_deform_attn_backends.py, run there as ``kernel-cuda``.

* test_cuda_extension_compiles runs wherever nvcc is found: it builds the CUDA part
  with nvcc (cached like every JIT build) in a fresh process and loads it, which works
  without a GPU since the torch wheel carries the CUDA runtime libraries.
* The other tests need a GPU and are skipped without one.
"""
import functools
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from ddetr.ops import kernel, ms_deform_attn, ms_deform_attn_reference
from op_inputs import make_inputs as make_inputs_on, outputs_and_grads

make_inputs = functools.partial(make_inputs_on, device="cuda")    # the inputs, on the GPU

ROOT = Path(__file__).resolve().parents[1]


def nvcc_path():
    from torch.utils.cpp_extension import CUDA_HOME

    found = shutil.which("nvcc")
    if found:
        return found
    if CUDA_HOME and (Path(CUDA_HOME) / "bin" / "nvcc").exists():
        return str(Path(CUDA_HOME) / "bin" / "nvcc")
    return None


# ---- compile (no GPU needed) ------------------------------------------------------------

BUILD_SCRIPT = """
import json, time, torch
from ddetr.ops import kernel
start = time.perf_counter()
status = kernel.load_kernel(with_cuda=True)
status["wall"] = time.perf_counter() - start
status["cuda_kernel_registered"] = torch._C._dispatch_has_kernel_for_dispatch_key(
    "ddetr::ms_deform_attn", "CUDA")
print("STATUS", json.dumps(status, default=str))
"""


@pytest.mark.slow
@pytest.mark.skipif(nvcc_path() is None, reason="nvcc not found: cannot compile the CUDA kernel")
def test_cuda_extension_compiles():
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    env.setdefault("TORCH_CUDA_ARCH_LIST", kernel.DEFAULT_CUDA_ARCH_LIST)
    run = subprocess.run([sys.executable, "-c", BUILD_SCRIPT], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=1800)
    lines = [line for line in run.stdout.splitlines() if line.startswith("STATUS ")]
    assert run.returncode == 0 and lines, f"build process failed:\n{run.stdout}\n{run.stderr}"
    status = json.loads(lines[-1][len("STATUS "):])
    assert status["cpu"] is True, status
    assert status["cuda"] is True, f"the CUDA kernel did not build: {status['cuda']}"
    assert status["cuda_kernel_registered"], status
    print(f"CUDA part built/loaded in {status['wall']:.1f} s")


# ---- runtime (needs a GPU) ----------------------------------------------------------------

needs_gpu = pytest.mark.skipif(not torch.cuda.is_available(),
                               reason="no CUDA device: the CUDA kernel cannot run here")


@pytest.fixture(scope="module")
def cuda_kernel():
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    status = kernel.load_kernel(with_cuda=True)
    if status["cuda"] is not True:
        pytest.fail(f"the CUDA kernel did not build: {status['cuda']}")


def fused(*args):
    return ms_deform_attn(*args, backend="kernel")


NAMES = ("output", "grad value", "grad sampling_locations", "grad attention_weights")

# (N, levels, M, D, Lq, K). The kernel's instantiations: D % 8 == 0 takes the vectorised
# path (8 channels a thread; L=4,K=4 and L=1,K=4 compile-time, others at run time), other
# D the generic one (a channel a thread); D/8 (or D) above 32 makes a thread take several
# rounds of channels; odd layouts: 1xW, Hx1, 1x1 levels.
SHAPES = [
    (2, [(5, 7), (3, 4), (1, 6), (2, 2)], 3, 8, 11, 4),          # L=4,K=4, 1 lane a triple
    (1, [(24, 32), (12, 16), (6, 8), (3, 4)], 8, 32, 100, 4),   # the paper's heads, 4 lanes
    (2, [(9, 9)], 2, 16, 13, 4),                                # L=1,K=4
    (2, [(4, 5), (2, 2)], 2, 5, 9, 3),                          # generic D, run-time L, K
    (2, [(9, 9), (1, 1)], 4, 48, 13, 2),                        # 6 vectors on 4 lanes
    (1, [(6, 6), (1, 3)], 1, 512, 5, 3),                        # 64 vectors: 2 rounds
    (3, [(1, 9), (7, 1)], 1, 1, 5, 1),                          # D = 1
    (1, [(1, 1), (4, 1), (1, 4)], 2, 40, 7, 4),                 # generic D > 32: rounds
]


@needs_gpu
@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("case", SHAPES)
def test_cuda_matches_reference(cuda_kernel, dtype, case):
    inputs = make_inputs(*case, dtype=dtype)
    got = outputs_and_grads(fused, inputs)
    want = outputs_and_grads(ms_deform_attn_reference, inputs)
    tol = dict(rtol=1e-4, atol=2e-4) if dtype == torch.float32 else dict(rtol=1e-9, atol=1e-9)
    for name, g, w in zip(NAMES, got, want):
        torch.testing.assert_close(g, w, **tol, msg=lambda m: f"{name}: {m}")


@needs_gpu
@pytest.mark.cuda
@pytest.mark.parametrize("case", SHAPES[:5])
def test_cuda_matches_cpu_kernel(cuda_kernel, case):
    """Same formula on both devices (ddetr/csrc/ms_deform_attn.h): float64 agrees closely,
    location gradients at pixel-centre kinks included."""
    inputs = make_inputs(*case, dtype=torch.float64)
    inputs[3] = (inputs[3].detach() * 8).round() / 8  # many points on kinks and borders
    inputs[3].requires_grad_()
    cpu_inputs = [t.detach().cpu().requires_grad_(t.requires_grad) for t in inputs]
    got = outputs_and_grads(fused, inputs)
    want = outputs_and_grads(fused, cpu_inputs)
    for name, g, w in zip(NAMES, got, want):
        torch.testing.assert_close(g.cpu(), w, rtol=1e-10, atol=1e-10,
                                   msg=lambda m: f"{name}: {m}")


@needs_gpu
@pytest.mark.cuda
@pytest.mark.parametrize("loc_dtype", [None, torch.float32])
@pytest.mark.parametrize("dtype, tol", [(torch.float16, 1e-2), (torch.bfloat16, 6e-2)])
@pytest.mark.parametrize("case", SHAPES[:4])
def test_cuda_half_precision(cuda_kernel, dtype, tol, loc_dtype, case):
    """float16/bfloat16 value, with locations and weights in the same dtype (converted to
    float32 inside) or in float32 (what autocast gives); float32 sums. Compared with the
    float32 reference of the same (rounded) inputs; every result comes back in the dtype
    of its input."""
    inputs = make_inputs(*case, dtype=dtype, loc_dtype=loc_dtype)
    ref_inputs = [t.detach().float().requires_grad_() if t.is_floating_point() else t
                  for t in inputs]
    got = outputs_and_grads(fused, inputs)
    want = outputs_and_grads(ms_deform_attn_reference, ref_inputs)
    for name, g, w, i in zip(NAMES, got, want, (0, 0, 3, 4)):
        assert g.dtype == inputs[i].dtype, name
        # relative to the tensor's scale: location gradients carry a factor W
        scale = w.abs().max().clamp_min(1)
        torch.testing.assert_close(g.float() / scale, w / scale, rtol=tol, atol=tol,
                                   msg=lambda m: f"{name}: {m}")


@needs_gpu
@pytest.mark.cuda
def test_cuda_unaligned_and_many_levels(cuda_kernel):
    """Tensors that do not start on a 16-byte boundary take the generic path; more than
    the 16 levels of the by-value table is a clear error."""
    value, ss, lsi, loc, w = [t.detach() for t in make_inputs(2, [(6, 7), (3, 4)], 2, 16, 9, 4)]
    shifted = torch.empty(value.numel() + 1, device="cuda")[1:].view_as(value).copy_(value)
    assert shifted.data_ptr() % 16 != 0
    torch.testing.assert_close(fused(shifted, ss, lsi, loc, w),
                               ms_deform_attn_reference(value, ss, lsi, loc, w),
                               rtol=1e-4, atol=1e-4)
    shapes = [(1, 1)] * 17
    value, ss, lsi, loc, w = [t.detach() for t in make_inputs(1, shapes, 1, 8, 3, 1)]
    # refused in Python before any call into C++; "auto" takes another implementation
    with pytest.raises(kernel.KernelUnsupportedError, match="at most 16 levels"):
        fused(value, ss, lsi, loc, w)
    torch.testing.assert_close(ms_deform_attn(value, ss, lsi, loc, w),
                               ms_deform_attn_reference(value, ss, lsi, loc, w),
                               rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="at most 16 levels"):  # the C++ entry point
        torch.ops.ddetr.ms_deform_attn(value, ss, lsi, loc, w)


@needs_gpu
@pytest.mark.cuda
def test_cuda_backward_alerts_under_deterministic_algorithms(cuda_kernel):
    """grad_value is summed with atomics: use_deterministic_algorithms(True) must raise,
    warn_only=True must warn; the forward is deterministic and stays allowed."""
    inputs = make_inputs(1, [(6, 7), (3, 4)], 2, 8, 9, 4)
    before = torch.are_deterministic_algorithms_enabled()
    try:
        torch.use_deterministic_algorithms(True)
        out = fused(*inputs)
        with pytest.raises(RuntimeError, match="ms_deform_attn_backward_cuda"):
            out.sum().backward()
        torch.use_deterministic_algorithms(True, warn_only=True)
        with pytest.warns(UserWarning, match="ms_deform_attn_backward_cuda"):
            fused(*inputs).sum().backward()
    finally:
        torch.use_deterministic_algorithms(before)


def inconsistent_tables():
    """Inputs for levels (4, 5), (2, 3) and four wrong level tables for them, each with
    the words of its error: [(value, loc, w), [(spatial_shapes, level_start_index,
    message)]] (host tables)."""
    value, ss, lsi, loc, w = [t.detach() for t in make_inputs(1, [(4, 5), (2, 3)], 2, 8, 6, 2)]
    bad = [(torch.tensor([[4, 5], [2, 4]]), lsi.cpu(), "sum to"),
           (torch.tensor([[4, 5], [1, 3]]), lsi.cpu(), "sum to"),
           (ss.cpu(), torch.tensor([0, 21]), "level_start_index"),
           (torch.tensor([[-4, -5], [2, 3]]), lsi.cpu(), "positive")]
    return (value, loc, w), bad


@needs_gpu
@pytest.mark.cuda
def test_cuda_inconsistent_level_tables_never_reach_the_kernel(cuda_kernel):
    """Wrong tables on the GPU or on the host: ValueError before any kernel starts, from
    the wrapper and from the C++ entry points (memcheck runs the same cases)."""
    (value, loc, w), bad = inconsistent_tables()
    grad = torch.zeros(1, 6, 16, device="cuda")
    for bad_ss, bad_lsi, message in bad:
        for device in ("cpu", "cuda"):
            args = (value, bad_ss.to(device), bad_lsi.to(device), loc, w)
            with pytest.raises(ValueError, match=message):
                fused(*args)
            with pytest.raises(ValueError, match=message):
                torch.ops.ddetr.ms_deform_attn(*args)
            with pytest.raises(ValueError, match=message):
                torch.ops.ddetr.ms_deform_attn_backward(grad, *args)
    torch.cuda.synchronize()  # nothing was launched that could fail later


@needs_gpu
@pytest.mark.cuda
def test_cuda_no_device_sync_with_level_tables(cuda_kernel):
    """Tables made by level_tables(): forward and backward run without a single
    device-to-host synchronisation (torch's sync debug mode raises on one)."""
    from ddetr.ops.checks import level_tables

    value, _, _, loc, w = make_inputs(1, [(6, 7), (3, 4)], 2, 8, 9, 4)
    ss, lsi = level_tables([(6, 7), (3, 4)], device="cuda")
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        out = fused(value, ss, lsi, loc, w)
        out.backward(torch.ones_like(out))
    finally:
        torch.cuda.set_sync_debug_mode("default")


@needs_gpu
@pytest.mark.cuda
def test_cuda_torch_compile(cuda_kernel):
    inputs = make_inputs(2, [(12, 16), (6, 8)], 4, 16, 30, 4)
    compiled = torch.compile(fused, fullgraph=True)  # inductor
    got = outputs_and_grads(compiled, inputs)
    want = outputs_and_grads(ms_deform_attn_reference, inputs)
    for name, g, w in zip(NAMES, got, want):
        torch.testing.assert_close(g, w, rtol=1e-4, atol=2e-4, msg=lambda m: f"{name}: {m}")


@needs_gpu
@pytest.mark.cuda
def test_cuda_runs_on_the_current_stream(cuda_kernel):
    inputs = [t.detach() for t in make_inputs(2, [(12, 16), (6, 8)], 4, 16, 30, 4)]
    want = fused(*inputs)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        got = fused(*inputs)
    torch.cuda.current_stream().wait_stream(stream)
    torch.testing.assert_close(got, want)


@needs_gpu
@pytest.mark.cuda
def test_auto_uses_the_kernel_on_cuda(cuda_kernel, monkeypatch):
    calls = []
    real = kernel.ms_deform_attn_kernel
    monkeypatch.setattr(kernel, "ms_deform_attn_kernel",
                        lambda *a: (calls.append(1), real(*a))[1])
    inputs = [t.detach() for t in make_inputs(1, [(3, 3)], 1, 2, 2, 1, dtype=torch.float16)]
    ms_deform_attn(*inputs)
    assert calls


@needs_gpu
@pytest.mark.cuda
def test_cuda_errors_are_clear(cuda_kernel):
    value, ss, lsi, loc, w = [t.detach() for t in make_inputs(2, [(4, 5)], 3, 4, 6, 2)]
    op = torch.ops.ddetr.ms_deform_attn
    with pytest.raises(ValueError, match="one device"):
        op(value, ss, lsi, loc.cpu(), w)
    with pytest.raises(ValueError, match="one device"):
        op(value, ss.cpu(), lsi, loc, w)  # the two tables on different devices
    with pytest.raises(ValueError, match="contiguous"):
        op(value.transpose(0, 1).contiguous().transpose(0, 1), ss, lsi, loc, w)
    with pytest.raises(TypeError, match="float32"):
        op(value.half(), ss, lsi, loc.double(), w.double())
    with pytest.raises(ValueError, match="one device"):
        fused(value, ss, lsi, loc.cpu(), w)
    # the tables may live on the host (the wrapper passes host copies itself)
    torch.testing.assert_close(op(value, ss.cpu(), lsi.cpu(), loc, w),
                               fused(value, ss, lsi, loc, w))


# ---- compute-sanitizer (needs a GPU) -----------------------------------------------------

MEMCHECK_SCRIPT = """
import torch
from ddetr.ops import kernel, ms_deform_attn
from test_kernel_cuda import SHAPES, inconsistent_tables, make_inputs
assert kernel.load_kernel(with_cuda=True)["cuda"] is True
(value, loc, w), bad = inconsistent_tables()       # refused before any kernel starts
for bad_ss, bad_lsi, message in bad:
    for device in ("cpu", "cuda"):
        args = (value, bad_ss.to(device), bad_lsi.to(device), loc, w)
        for op in (lambda *a: ms_deform_attn(*a, backend="kernel"),
                   torch.ops.ddetr.ms_deform_attn):
            try:
                op(*args)
            except ValueError as e:
                assert message in str(e), e
            else:
                raise SystemExit(f"level table {bad_ss.tolist()} was not refused")
for case in SHAPES:
    for dtype, loc_dtype in ((torch.float32, None), (torch.float64, None),
                             (torch.float16, torch.float32), (torch.bfloat16, torch.float32)):
        inputs = make_inputs(*case, dtype=dtype, loc_dtype=loc_dtype, spread=1.0)
        out = ms_deform_attn(*inputs, backend="kernel")
        out.backward(torch.ones_like(out))
torch.cuda.synchronize()
# hand the caching allocator's blocks back: memory still held at exit counts as leaked
del value, loc, w, args, inputs, out
torch.cuda.empty_cache()
print("MEMCHECK RUN DONE")
"""


def sanitizer_path():
    from torch.utils.cpp_extension import CUDA_HOME

    found = shutil.which("compute-sanitizer")
    if found:
        return found
    for root in filter(None, (CUDA_HOME, os.environ.get("CUDA_HOME"), "/usr/local/cuda")):
        for sub in ("bin", "compute-sanitizer"):
            if (Path(root) / sub / "compute-sanitizer").exists():
                return str(Path(root) / sub / "compute-sanitizer")
    return None


@needs_gpu
@pytest.mark.cuda
@pytest.mark.slow
@pytest.mark.skipif(sanitizer_path() is None, reason="compute-sanitizer not found")
def test_memcheck(cuda_kernel):
    """Every instantiation (the SHAPES above, four dtypes, points well outside the maps)
    forward and backward under compute-sanitizer's memcheck, after the inconsistent
    level tables (refused before any kernel): no out-of-bounds or misaligned access, no
    leak. `make memcheck` runs this test."""
    path = os.pathsep.join([str(ROOT), str(ROOT / "tests"), os.environ.get("PYTHONPATH", "")])
    env = dict(os.environ, PYTHONPATH=path)
    run = subprocess.run([sanitizer_path(), "--tool", "memcheck", "--error-exitcode", "3",
                          "--leak-check", "full", sys.executable, "-c", MEMCHECK_SCRIPT],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=1800)
    log = run.stdout + run.stderr
    assert "MEMCHECK RUN DONE" in run.stdout, log[-6000:]
    assert run.returncode == 0 and "ERROR SUMMARY: 0 errors" in log, log[-6000:]
