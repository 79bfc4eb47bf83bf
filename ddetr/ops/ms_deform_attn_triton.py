"""Multi-scale deformable attention in Triton: the forward and backward for GPUs.

The same operator as ``ms_deform_attn_reference`` (and the fused C++/CUDA op), written
in Triton's Python dialect. ``ms_deform_attn(..., backend="triton")`` calls it.

How the work is cut. A row is one (n, q, m): batch, query, head; there are
R = N * Lq * M rows. One program owns BLOCK_R rows and the whole channel vector of each
(BLOCK_D lanes, D rounded up to a power of two, the extra lanes masked off). For each
level l and point k it reads the BLOCK_R locations and weights once and shares them
across the channel lanes; the bilinear set-up (floor, fractions, bounds, key index) is
done once per point, and only the four corner reads and the multiply-adds are per
channel. K is a compile-time constant (its loop is unrolled); the loop over the L
levels is not, which keeps the compiled code (and its compile time) small. Offsets are
32-bit when every tensor has fewer than 2**31 elements (fewer registers), else 64-bit.

Bilinear sampling, as everywhere in ddetr (see ``ms_deform_attn_naive``): the point
x in [0, 1] of a level of width W is at column u = x * W - 1/2 (pixel centres at
(i + 0.5) / W), its neighbours are the columns floor(u) and floor(u) + 1 with weights
1 - fu and fu, fu = u - floor(u); a neighbour outside the map reads zero.

Sums are in float32 (float64 for float64 inputs); ``value`` may be float16 or
bfloat16. The backward owns the same rows: the gradients of a row's locations and
weights are reductions over its channel vector, finished inside the program and
stored without atomics; the gradient of ``value`` is scattered to the four corners
with atomic adds (into a float32 buffer for half inputs). Its order of additions
is not fixed on a GPU, so there the backward is not bitwise deterministic: under
``torch.use_deterministic_algorithms(True)`` it raises (warns with ``warn_only``).

NaN and Inf, as in the reference (grid_sample): a NaN or infinite coordinate makes the
sample NaN (its corner weights are NaN, its corners read zero), so the row's output
is NaN; its value gradient gets nothing from that point, its weight gradient is NaN,
and of its location gradient the other coordinate's entry is NaN (it is multiplied by
the NaN fractions) while the own coordinate's entry is 0. A finite point far outside
reads zero and has zero gradients. NaN/Inf weights enter by plain multiplication.
All of this follows from doing the reference's arithmetic: every corner is always
multiplied in (a masked read gives 0), nothing is skipped by a branch.

The kernels are decorated with ``triton.jit`` at first use, not at import: Triton
decides when it decorates whether a kernel is compiled for the GPU or interpreted on
the CPU (``TRITON_INTERPRET=1``), so deciding per call lets one process run the
interpreter on CPU tensors and compiled kernels on CUDA tensors. For the same reason
the kernels call only Triton's builtins, not the helpers of its library that are jit
functions themselves (decorated when triton is imported, they would not run under an
interpreter switched on after that import): ``tl.full(shape, 0, dtype)`` for
``tl.zeros``, and ``tl.reduce(x, 1, tl.standard._sum_combine)`` for ``tl.sum`` (the
interpreter recognises that combiner and sums with numpy; the compiler emits what
``tl.sum`` emits).
"""
import os
import warnings

import torch
import triton
import triton.language as tl

from .checks import check_ms_deform_attn_inputs
from .kernel import KernelUnsupportedError
from .registration import register_pair

DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)


# ---- the kernels (plain functions, decorated by _kernels) ------------------------------

def _forward_kernel(value_ptr, shapes_ptr, starts_ptr, loc_ptr, weight_ptr, out_ptr,
                    R, S, Lq_M, M, D, L,
                    K: tl.constexpr, ACC: tl.constexpr, INDEX: tl.constexpr,
                    BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr):
    """out[r, d] = sum_{l,k} a[r, l, k] * bilinear(value_l[n(r), :, m(r), d], p[r, l, k])."""
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)  # r = (n * Lq + q) * M + m
    chans = tl.arange(0, BLOCK_D)
    row_ok = rows < R
    chan_ok = chans < D
    rows = rows.to(INDEX)  # 32-bit offsets where every tensor fits, else 64-bit
    # value[n, 0, m, 0] of each row; key s of that (n, m) is s * M * D further on
    row_base = ((rows // Lq_M) * S * M + rows % M) * D
    out = tl.full((BLOCK_R, BLOCK_D), 0, ACC)
    for l in range(L):
        H = tl.load(shapes_ptr + 2 * l).to(INDEX)
        W = tl.load(shapes_ptr + 2 * l + 1).to(INDEX)
        start = tl.load(starts_ptr + l).to(INDEX)
        for k in tl.static_range(K):
            p = (rows * L + l) * K + k  # the point (n, q, m, l, k)
            x = tl.load(loc_ptr + 2 * p, mask=row_ok, other=0).to(ACC)
            y = tl.load(loc_ptr + 2 * p + 1, mask=row_ok, other=0).to(ACC)
            a = tl.load(weight_ptr + p, mask=row_ok, other=0).to(ACC)
            u = x * W.to(ACC) - 0.5  # column, pixel centres at integers
            v = y * H.to(ACC) - 0.5  # row
            u0 = tl.floor(u)
            v0 = tl.floor(v)
            fu = u - u0
            fv = v - v0
            sample = tl.full((BLOCK_R, BLOCK_D), 0, ACC)
            for corner in tl.static_range(4):
                dy = corner // 2
                dx = corner % 2
                col = u0 + dx
                row = v0 + dy
                # float comparisons: False for NaN, and no int conversion of huge values
                inside = row_ok & (col >= 0) & (col < W) & (row >= 0) & (row < H)
                key = (start + tl.where(inside, row, 0).to(INDEX) * W
                       + tl.where(inside, col, 0).to(INDEX))
                inside = inside & (key >= 0) & (key < S)  # guard against a bad level table
                wx = fu if dx == 1 else 1 - fu
                wy = fv if dy == 1 else 1 - fv
                offsets = row_base[:, None] + key[:, None] * (M * D) + chans[None, :]
                corner_value = tl.load(value_ptr + offsets,
                                       mask=inside[:, None] & chan_ok[None, :], other=0)
                sample += (wx * wy)[:, None] * corner_value.to(ACC)
            out += a[:, None] * sample
    out_offsets = rows[:, None] * D + chans[None, :]
    tl.store(out_ptr + out_offsets, out.to(out_ptr.dtype.element_ty),
             mask=row_ok[:, None] & chan_ok[None, :])


def _backward_kernel(grad_out_ptr, value_ptr, shapes_ptr, starts_ptr, loc_ptr, weight_ptr,
                     grad_value_ptr, grad_loc_ptr, grad_weight_ptr,
                     R, S, Lq_M, M, D, L,
                     K: tl.constexpr, ACC: tl.constexpr, INDEX: tl.constexpr,
                     BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr):
    """The three gradients of the forward, given grad_out (R, D).

    With h_c = sum_d g[d] * value[corner c, d] and corner weights w_c = wx * wy:
        grad a   = sum_c w_c h_c
        grad x   = a * W * sum_c (dw_c/du) h_c     (u = x W - 1/2)
        grad y   = a * H * sum_c (dw_c/dv) h_c
        grad value[corner c, d] += w_c * a * g[d]
    """
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    chans = tl.arange(0, BLOCK_D)
    row_ok = rows < R
    chan_ok = chans < D
    rows = rows.to(INDEX)  # 32-bit offsets where every tensor fits, else 64-bit
    row_base = ((rows // Lq_M) * S * M + rows % M) * D
    grad_out = tl.load(grad_out_ptr + rows[:, None] * D + chans[None, :],
                       mask=row_ok[:, None] & chan_ok[None, :], other=0).to(ACC)
    for l in range(L):
        H = tl.load(shapes_ptr + 2 * l).to(INDEX)
        W = tl.load(shapes_ptr + 2 * l + 1).to(INDEX)
        start = tl.load(starts_ptr + l).to(INDEX)
        for k in tl.static_range(K):
            p = (rows * L + l) * K + k
            x = tl.load(loc_ptr + 2 * p, mask=row_ok, other=0).to(ACC)
            y = tl.load(loc_ptr + 2 * p + 1, mask=row_ok, other=0).to(ACC)
            a = tl.load(weight_ptr + p, mask=row_ok, other=0).to(ACC)
            u = x * W.to(ACC) - 0.5
            v = y * H.to(ACC) - 0.5
            u0 = tl.floor(u)
            v0 = tl.floor(v)
            fu = u - u0
            fv = v - v0
            weighted_grad = a[:, None] * grad_out  # what each corner's value receives, / w_c
            grad_a = tl.full((BLOCK_R,), 0, ACC)
            grad_u = tl.full((BLOCK_R,), 0, ACC)
            grad_v = tl.full((BLOCK_R,), 0, ACC)
            for corner in tl.static_range(4):
                dy = corner // 2
                dx = corner % 2
                col = u0 + dx
                row = v0 + dy
                inside = row_ok & (col >= 0) & (col < W) & (row >= 0) & (row < H)
                key = (start + tl.where(inside, row, 0).to(INDEX) * W
                       + tl.where(inside, col, 0).to(INDEX))
                inside = inside & (key >= 0) & (key < S)
                wx = fu if dx == 1 else 1 - fu
                wy = fv if dy == 1 else 1 - fv
                offsets = row_base[:, None] + key[:, None] * (M * D) + chans[None, :]
                mask = inside[:, None] & chan_ok[None, :]
                corner_value = tl.load(value_ptr + offsets, mask=mask, other=0).to(ACC)
                h = tl.reduce(grad_out * corner_value, 1, tl.standard._sum_combine)
                grad_a += wx * wy * h
                grad_u += (wy if dx == 1 else -wy) * h
                grad_v += (wx if dy == 1 else -wx) * h
                tl.atomic_add(grad_value_ptr + offsets, (wx * wy)[:, None] * weighted_grad,
                              mask=mask)
            tl.store(grad_weight_ptr + p, grad_a.to(grad_weight_ptr.dtype.element_ty),
                     mask=row_ok)
            tl.store(grad_loc_ptr + 2 * p,
                     (a * W.to(ACC) * grad_u).to(grad_loc_ptr.dtype.element_ty), mask=row_ok)
            tl.store(grad_loc_ptr + 2 * p + 1,
                     (a * H.to(ACC) * grad_v).to(grad_loc_ptr.dtype.element_ty), mask=row_ok)


_decorated = {}


def interpreting():
    """True if Triton runs kernels with its CPU interpreter (TRITON_INTERPRET=1).

    Read from the environment, as Triton does (``triton.knobs.runtime.interpret`` sets
    the variable too); a plain read that torch.compile can trace.
    """
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")


def _kernels():
    """(forward, backward) jitted for the current mode: compiled, or interpreted."""
    mode = interpreting()
    if mode not in _decorated:
        _decorated[mode] = (triton.jit(_forward_kernel), triton.jit(_backward_kernel))
    return _decorated[mode]


# ---- launching ----------------------------------------------------------------------------

def _blocks(D, elements=512):
    """(BLOCK_R, BLOCK_D): the whole channel vector, about ``elements`` a program.

    512 with the default 4 warps: at K = 4, D = 32, float32, ptxas (sm_90) gives the
    forward 72 registers and the backward 128, no spills; 1024 doubles the forward's.
    """
    block_d = triton.next_power_of_2(D)
    return max(1, min(64, elements // block_d)), block_d


def _index_dtype(value, sampling_locations):
    """int32 offsets when every tensor the kernels index has fewer than 2**31 elements."""
    N, _, M, D = value.shape
    largest = max(value.numel(), sampling_locations.numel(),
                  N * sampling_locations.shape[1] * M * D)
    return tl.int32 if largest < 2**31 else tl.int64


def _acc_dtype(value):
    return tl.float64 if value.dtype == torch.float64 else tl.float32


def _sizes(value, sampling_locations):
    N, S, M, D = value.shape
    _, Lq, _, L, K, _ = sampling_locations.shape
    return N, S, M, D, Lq, L, K


def _forward(value, spatial_shapes, level_start_index, sampling_locations,
             attention_weights):
    N, S, M, D, Lq, L, K = _sizes(value, sampling_locations)
    out = value.new_empty(N, Lq, M * D)
    R = N * Lq * M
    if R == 0 or D == 0:
        return out.zero_()
    block_r, block_d = _blocks(D)
    forward, _ = _kernels()
    forward[(triton.cdiv(R, block_r),)](
        value, spatial_shapes, level_start_index, sampling_locations, attention_weights,
        out, R, S, Lq * M, M, D, L, K=K, ACC=_acc_dtype(value),
        INDEX=_index_dtype(value, sampling_locations), BLOCK_R=block_r, BLOCK_D=block_d)
    return out


def _alert_not_deterministic(value):
    """What torch.use_deterministic_algorithms asks of an op with atomic adds on a GPU."""
    if value.device.type != "cuda" or not torch.are_deterministic_algorithms_enabled():
        return
    message = ("ms_deform_attn backend='triton': the backward adds into the gradient of "
               "value with atomics, so it is not deterministic on a GPU")
    if torch.is_deterministic_algorithms_warn_only_enabled():
        warnings.warn(message, UserWarning, stacklevel=2)
    else:
        raise RuntimeError(message)


def _backward(grad_output, value, spatial_shapes, level_start_index, sampling_locations,
              attention_weights):
    _alert_not_deterministic(value)
    N, S, M, D, Lq, L, K = _sizes(value, sampling_locations)
    acc_torch = torch.float64 if value.dtype == torch.float64 else torch.float32
    grad_value = torch.zeros(value.shape, dtype=acc_torch, device=value.device)
    grad_loc = torch.zeros_like(sampling_locations)
    grad_weight = torch.zeros_like(attention_weights)
    R = N * Lq * M
    if R > 0 and D > 0:
        block_r, block_d = _blocks(D)
        _, backward = _kernels()
        backward[(triton.cdiv(R, block_r),)](
            grad_output, value, spatial_shapes, level_start_index, sampling_locations,
            attention_weights, grad_value, grad_loc, grad_weight,
            R, S, Lq * M, M, D, L, K=K, ACC=_acc_dtype(value),
            INDEX=_index_dtype(value, sampling_locations), BLOCK_R=block_r, BLOCK_D=block_d)
    return grad_value.to(value.dtype), grad_loc, grad_weight


# ---- the operator: torch.library registration ------------------------------------------

class TritonUnavailableError(KernelUnsupportedError):
    """The Triton kernels cannot run the given tensors (device, dtype, no interpreter):
    for ``backend="auto"`` the same as the fused op's KernelUnsupportedError, a reason
    to try the next implementation."""


def check_available(value):
    """Raise TritonUnavailableError unless the Triton kernels can run on ``value``."""
    if value.dtype not in DTYPES:
        names = ", ".join(str(d).replace("torch.", "") for d in DTYPES)
        raise TritonUnavailableError(
            f"ms_deform_attn: the Triton kernels support {names}; got {value.dtype}")
    if value.device.type != "cuda" and not interpreting():
        raise TritonUnavailableError(
            f"ms_deform_attn: backend='triton' needs a CUDA tensor or TRITON_INTERPRET=1 "
            f"(Triton's CPU interpreter), got a tensor on {value.device}")


def _check(value, spatial_shapes, level_start_index, sampling_locations, attention_weights):
    """Shapes, dtypes and devices (no reads of the level tables: no device sync)."""
    check_ms_deform_attn_inputs(value, spatial_shapes, level_start_index,
                                sampling_locations, attention_weights, check_values=False)
    check_available(value)
    for name, t in (("spatial_shapes", spatial_shapes),
                    ("level_start_index", level_start_index)):
        if t.device != value.device:
            raise ValueError(f"{name} must be on the device of value ({value.device}), "
                             f"got {t.device}")


@torch.library.custom_op("ddetr::ms_deform_attn_triton", mutates_args=())
def ms_deform_attn_triton_op(value: torch.Tensor, spatial_shapes: torch.Tensor,
                             level_start_index: torch.Tensor,
                             sampling_locations: torch.Tensor,
                             attention_weights: torch.Tensor) -> torch.Tensor:
    """The registered forward: (N, S, M, D), ..., (N, Lq, M, L, K) -> (N, Lq, M * D)."""
    args = [t.contiguous() for t in (value, spatial_shapes, level_start_index,
                                     sampling_locations, attention_weights)]
    _check(*args)
    return _forward(*args)


@torch.library.custom_op("ddetr::ms_deform_attn_triton_backward", mutates_args=())
def ms_deform_attn_triton_backward_op(
        grad_output: torch.Tensor, value: torch.Tensor, spatial_shapes: torch.Tensor,
        level_start_index: torch.Tensor, sampling_locations: torch.Tensor,
        attention_weights: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The registered backward: grad_output (N, Lq, M * D) -> the gradients of value,
    sampling_locations and attention_weights, shaped like them."""
    args = [t.contiguous() for t in (value, spatial_shapes, level_start_index,
                                     sampling_locations, attention_weights)]
    _check(*args)
    N, _, M, D = value.shape
    Lq = sampling_locations.shape[1]
    if tuple(grad_output.shape) != (N, Lq, M * D):
        raise ValueError(f"grad_output must be (N, Lq, M * D) = {(N, Lq, M * D)}, "
                         f"got {tuple(grad_output.shape)}")
    return _backward(grad_output.contiguous(), *args)


register_pair("ddetr::ms_deform_attn_triton", "ddetr::ms_deform_attn_triton_backward")


def ms_deform_attn_triton(value, spatial_shapes, level_start_index, sampling_locations,
                          attention_weights):
    """The Triton operator: same arguments and result as ``ms_deform_attn_reference``.

    Checks the arguments (the level tables' contents too where that costs no device
    sync), moves ``spatial_shapes`` and ``level_start_index`` to the device of
    ``value`` and calls ``torch.ops.ddetr.ms_deform_attn_triton``. Raises
    TritonUnavailableError (a RuntimeError) on a CPU tensor unless Triton's interpreter
    is on (TRITON_INTERPRET=1), or for a dtype it does not support.

    Returns:
        (N, Lq, M * D)
    """
    check_values = spatial_shapes.device.type == "cpu" and not torch.compiler.is_compiling()
    check_ms_deform_attn_inputs(value, spatial_shapes, level_start_index,
                                sampling_locations, attention_weights,
                                check_values=check_values)
    check_available(value)
    device = value.device
    return torch.ops.ddetr.ms_deform_attn_triton(
        value, spatial_shapes.to(device), level_start_index.to(device), sampling_locations,
        attention_weights)
