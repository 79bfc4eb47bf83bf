"""Input checks of the attention modules and the transformers.

The same style as ``ddetr.ops.checks``: a TypeError (not a tensor, wrong dtype, not an
int) or a ValueError (shape, range, device) whose one line says what was expected and
what was given. The modules call these at the top of ``forward`` and ``__init__``, so a
mistake is named where it is made instead of deep inside a matmul or the operator.
"""
import operator

import torch


def shape(t):
    """The shape of a tensor as a tuple; the type's name for anything else (for messages)."""
    return tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__


def check_like(name, t, like, like_name):
    """None, or a tensor of the shape of ``like`` (position codes next to their inputs)."""
    if t is not None and (not isinstance(t, torch.Tensor) or t.shape != like.shape):
        raise ValueError(f"{name} must be None or a tensor of the shape of {like_name} "
                         f"{shape(like)}, got {shape(t)}")


def check_positive_ints(**values):
    """Each value an int >= 1 (constructor arguments: widths, heads, levels, points)."""
    for name, value in values.items():
        try:
            if isinstance(value, bool):
                raise TypeError
            value = operator.index(value)  # an int, or an integer 0-d tensor
        except TypeError:
            raise TypeError(f"{name} must be an int, got {type(value).__name__} "
                            f"{value!r}") from None
        if value < 1:
            raise ValueError(f"{name} must be >= 1, got {value}")


def check_heads(d_model, n_heads, **counts):
    """d_model, n_heads and the counts positive ints, and d_model divisible by n_heads."""
    check_positive_ints(d_model=d_model, n_heads=n_heads, **counts)
    if d_model % n_heads:
        raise ValueError(f"d_model={d_model} must be divisible by n_heads={n_heads}")


def check_dropout(dropout):
    """A dropout probability in [0, 1) (1 would drop everything)."""
    if not 0 <= dropout < 1:
        raise ValueError(f"dropout must be in [0, 1), got {dropout}")


def check_tensor(name, t, layout, floating=True):
    """t a tensor with as many dimensions as layout names (e.g. "(N, Lq, C)"), and of a
    floating-point dtype unless floating=False."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor {layout}, got {type(t).__name__}")
    dims = layout.count(",") + 1 if layout.strip("()") else 0
    if t.dim() != dims:
        raise ValueError(f"{name} must have {dims} dimensions {layout}, got shape {shape(t)}")
    if floating and not t.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got dtype {t.dtype}")


def check_width(name, t, d_model):
    """The last dimension of t is the model width."""
    if t.shape[-1] != d_model:
        raise ValueError(f"{name} must have d_model={d_model} channels in its last "
                         f"dimension, got shape {shape(t)}")


def check_same(what, **tensors):
    """Every tensor agrees on ``what``: "batch size" (dimension 0) or "device"."""
    got = {name: (t.shape[0] if what == "batch size" else t.device)
           for name, t in tensors.items()}
    values = list(got.values())
    if any(v != values[0] for v in values[1:]):      # no set(): sizes may be symbolic
        raise ValueError(f"{', '.join(got)} must have one {what}, got "
                         + ", ".join(f"{name} {value}" for name, value in got.items()))


def check_padding_mask(name, mask, N, S):
    """None, or a bool (N, S) tensor (True = padding)."""
    if mask is None:
        return
    check_tensor(name, mask, "(N, S)", floating=False)
    if mask.dtype != torch.bool:
        raise TypeError(f"{name} must be a bool tensor (True = padding), got dtype "
                        f"{mask.dtype}")
    if shape(mask) != (N, S):
        raise ValueError(f"{name} must be (N, S) = {(N, S)}, got shape {shape(mask)}")


def check_attn_mask(mask, Lq, S):
    """None, or a bool (Lq, S) tensor (True = the query may not see the key)."""
    if mask is None:
        return
    check_tensor("attn_mask", mask, "(Lq, S)", floating=False)
    if mask.dtype != torch.bool or shape(mask) != (Lq, S):
        raise ValueError(f"attn_mask must be a bool (Lq, S) = {(Lq, S)} tensor, got "
                         f"{mask.dtype} {shape(mask)}")


def check_spatial_shapes(name, spatial_shapes, n_levels, S=None):
    """An (L, 2) int64 tensor of (H, W) with L = n_levels; with S, the levels hold S
    positions in all (read only where free: a CPU tensor, outside torch.compile)."""
    check_tensor(name, spatial_shapes, "(L, 2)", floating=False)
    if spatial_shapes.dtype != torch.int64:
        raise TypeError(f"{name} must be int64, got dtype {spatial_shapes.dtype}")
    if shape(spatial_shapes) != (n_levels, 2):
        raise ValueError(f"{name} must be (L, 2) = ({n_levels}, 2) for n_levels={n_levels}, "
                         f"got shape {shape(spatial_shapes)}")
    if S is not None and spatial_shapes.device.type == "cpu" \
            and not torch.compiler.is_compiling():
        sizes = spatial_shapes.prod(1).tolist()
        if sum(sizes) != S:
            raise ValueError(f"{name} {spatial_shapes.tolist()} hold {sum(sizes)} positions, "
                             f"the flattened input has S={S}")
