"""The CUDA kernel's experimental variants (issue 31, B.3-5), bare ops, side by side
with the official op, at the three benchmark shapes; errors against float64.

Ran once on an H200 against this commit's ddetr/csrc/ms_deform_attn_cuda.cu, whose
DDETR_MSDA_VARIANT switches (split, order, interleave, native) select the variant:

    python3 benchmarks/kernel_variants/variants.py OUT_JSON float32 OFFICIAL_CHECKOUT
    python3 benchmarks/kernel_variants/variants.py OUT_JSON bfloat16

(the official op built by ddetr/experiments/official_op.py). The next commit kept the
winners and removed the switches; kernel_variants.md says what was measured.
"""
import json
import os
import sys
import time

import torch

from ddetr.experiments.kernel_inputs import make_inputs, sizes_of, forward_bytes, gather_bytes
from ddetr.ops import kernel, ms_deform_attn_reference

out_path = sys.argv[1]
DTYPES = sys.argv[2].split(",")
official = sys.argv[3] if len(sys.argv) > 3 else None
assert kernel.load_kernel(with_cuda=True)["cuda"] is True
fwd_op, bwd_op = torch.ops.ddetr.ms_deform_attn, torch.ops.ddetr.ms_deform_attn_backward
mod = None
if official:
    from ddetr.experiments.official_op import load_official_op
    mod = load_official_op(official)

VARIANTS = {
    "float32": ["", "interleave", "order", "order,interleave", "split", "split,interleave",
                "split,order", "split,order,interleave"],
    "bfloat16": ["", "interleave", "order", "split", "split,interleave", "native",
                 "native,order", "native,split", "native,split,order", "split,order,interleave"],
}


def timed(fn, runs=30, warm=3):
    for _ in range(warm):
        fn()
    torch.cuda.synchronize()
    s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    t0 = time.perf_counter()
    s.record()
    for _ in range(runs):
        fn()
    e.record()
    cpu = (time.perf_counter() - t0) / runs
    torch.cuda.synchronize()
    return s.elapsed_time(e) / 1e3 / runs, cpu


def rel(a, b):
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


rows = []
for name in ("book", "decoder", "encoder"):
    for dtype in DTYPES:
        vd = getattr(torch, dtype)
        inputs = make_inputs(name, "cuda", vd, loc_dtype=torch.float32)
        value, ss, lsi, loc, w = [t.detach() for t in inputs]
        ssh, lsih = ss.cpu(), lsi.cpu()
        gen = torch.Generator(device="cuda").manual_seed(1)
        N, Lq, M, D = value.shape[0], loc.shape[1], value.shape[2], value.shape[3]
        go = torch.randn(N, Lq, M * D, device="cuda", generator=gen).to(vd)
        # float64 reference of the same (rounded) inputs
        ex = [value.double().requires_grad_(), ss, lsi, loc.double().requires_grad_(),
              w.double().requires_grad_()]
        ref_out = ms_deform_attn_reference(*ex)
        ref_grads = torch.autograd.grad(ref_out, (ex[0], ex[3], ex[4]), go.double())
        del ex
        for v in VARIANTS[dtype]:
            os.environ["DDETR_MSDA_VARIANT"] = v
            out = fwd_op(value, ssh, lsih, loc, w)
            grads = bwd_op(go, value, ssh, lsih, loc, w)
            errs = [rel(out, ref_out)] + [rel(g, r) for g, r in zip(grads, ref_grads)]
            tf, cf = timed(lambda: fwd_op(value, ssh, lsih, loc, w))
            tb, cb = timed(lambda: bwd_op(go, value, ssh, lsih, loc, w))
            row = dict(shape=name, dtype=dtype, impl="ddetr", variant=v or "base",
                       fwd_us=tf * 1e6, bwd_us=tb * 1e6, fwd_cpu_us=cf * 1e6, bwd_cpu_us=cb * 1e6,
                       rel_err=errs)
            rows.append(row)
            print(f"{name:8} {dtype:8} {v or 'base':24} fwd {tf*1e6:8.1f} us  bwd {tb*1e6:8.1f} us"
                  f"  (cpu {cf*1e6:5.1f}/{cb*1e6:5.1f})  err " + " ".join(f"{e:.1e}" for e in errs),
                  flush=True)
        os.environ["DDETR_MSDA_VARIANT"] = ""
        if mod is not None and dtype == "float32":
            out = mod.ms_deform_attn_forward(value, ss, lsi, loc, w, 64)
            grads = mod.ms_deform_attn_backward(value, ss, lsi, loc, w, go, 64)
            errs = [rel(out, ref_out)] + [rel(g, r) for g, r in zip(grads, ref_grads)]
            tf, cf = timed(lambda: mod.ms_deform_attn_forward(value, ss, lsi, loc, w, 64))
            tb, cb = timed(lambda: mod.ms_deform_attn_backward(value, ss, lsi, loc, w, go, 64))
            rows.append(dict(shape=name, dtype=dtype, impl="official", variant="-",
                             fwd_us=tf * 1e6, bwd_us=tb * 1e6, fwd_cpu_us=cf * 1e6,
                             bwd_cpu_us=cb * 1e6, rel_err=errs))
            print(f"{name:8} {dtype:8} {'OFFICIAL':24} fwd {tf*1e6:8.1f} us  bwd {tb*1e6:8.1f} us"
                  f"  (cpu {cf*1e6:5.1f}/{cb*1e6:5.1f})  err " + " ".join(f"{e:.1e}" for e in errs),
                  flush=True)
        del ref_out, ref_grads
        torch.cuda.empty_cache()

# bandwidths: DRAM (large copy) and L2 (a copy that fits in L2, repeated)
def copy_bw(nbytes, runs=50):
    x = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
    y = torch.empty_like(x)
    t, _ = timed(lambda: y.copy_(x), runs=runs)
    return 2 * nbytes / t

bw = dict(dram=copy_bw(1 << 30, 10), l2_8MiB=copy_bw(8 << 20, 200), l2_16MiB=copy_bw(16 << 20, 200))
print({k: f"{v/1e9:.0f} GB/s" for k, v in bw.items()})
floors = {}
for name in ("book", "decoder", "encoder"):
    for dtype, size in (("float32", 4), ("bfloat16", 2)):
        floors[f"{name}/{dtype}"] = dict(
            dram_us=forward_bytes(name, size, 4) / bw["dram"] * 1e6,
            l2_gather_us=gather_bytes(name, size, 4) / max(bw["l2_8MiB"], bw["l2_16MiB"]) * 1e6)
print(json.dumps(floors, indent=0))
json.dump(dict(device=torch.cuda.get_device_name(0), torch=torch.__version__, rows=rows,
               bandwidth=bw, floors=floors), open(out_path, "w"), indent=1)
