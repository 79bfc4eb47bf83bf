"""Mixed precision: which half type a device computes in, and the autocast context.

    with autocast(device, cfg.amp):
        outputs = model(images, masks)

On CUDA, bfloat16 where the GPU supports it, else float16 (which also needs a
GradScaler: ``needs_grad_scaler``). On a CPU, bfloat16 only where the processor has
native bfloat16 arithmetic (AVX512-BF16 or AMX): elsewhere oneDNN emulates it and it
would be slower than float32, so amp is then off. Losses are always computed in
float32 (the engine casts the outputs back), and deformable sampling runs in float32
(``ddetr.nn.MSDeformAttn`` samples in the wider of its input types).
"""
import torch


def cpu_has_native_bf16():
    """Whether this CPU computes bfloat16 natively (AVX512-BF16 or AMX tiles)."""
    checks = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return any(getattr(torch.cpu, name, lambda: False)() for name in checks)


def autocast_dtype(device):
    """The half type of mixed precision on device (a torch.device), or None if none pays."""
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if device.type == "cpu" and cpu_has_native_bf16():
        return torch.bfloat16
    return None


def autocast(device, enabled):
    """torch.autocast for device in its autocast_dtype, or a no-op context."""
    dtype = autocast_dtype(device) if enabled else None
    return torch.autocast(device.type, dtype=dtype, enabled=dtype is not None)


def needs_grad_scaler(device, enabled):
    """float16 gradients underflow without loss scaling; bfloat16 ones do not."""
    return bool(enabled) and autocast_dtype(device) == torch.float16
