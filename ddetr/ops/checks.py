"""Argument checks shared by every implementation of multi-scale deformable attention.

All implementations (the naive loop, the grid_sample reference and the fused kernel)
take the same five tensors. Checking them in one place means every backend rejects bad
input with the same message, naming what was expected and what was given.

Shapes (one-letter names as everywhere in ddetr):
    value               (N, S, M, D)        S = sum_l H_l * W_l
    spatial_shapes      (L, 2) int64        (H_l, W_l) of each level
    level_start_index   (L,)   int64        offset of level l in the S axis
    sampling_locations  (N, Lq, M, L, K, 2) (x, y) in [0, 1] of each level
    attention_weights   (N, Lq, M, L, K)
"""
import torch


def _shape(t):
    return tuple(t.shape)


def check_ms_deform_attn_inputs(value, spatial_shapes, level_start_index,
                                sampling_locations, attention_weights, check_values=True):
    """Raise TypeError/ValueError if the arguments do not fit together.

    With ``check_values=True`` the contents of ``spatial_shapes`` and
    ``level_start_index`` are read as well (sum of H*W equals S, start indices are the
    exclusive cumulative sum). That reads two tiny tensors; leave it off where a tensor's
    values may not be read (a fake tensor under torch.compile).
    """
    named = dict(value=value, spatial_shapes=spatial_shapes,
                 level_start_index=level_start_index,
                 sampling_locations=sampling_locations, attention_weights=attention_weights)
    for name, t in named.items():
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")

    if not value.is_floating_point():
        raise TypeError(f"value must be a floating-point tensor, got dtype {value.dtype}")
    for name in ("sampling_locations", "attention_weights"):
        if named[name].dtype != value.dtype:
            raise TypeError(f"{name} must have the dtype of value ({value.dtype}), "
                            f"got {named[name].dtype}")
    for name in ("spatial_shapes", "level_start_index"):
        if named[name].dtype != torch.int64:
            raise TypeError(f"{name} must be int64, got {named[name].dtype}")

    expected_dims = dict(value=4, spatial_shapes=2, level_start_index=1,
                         sampling_locations=6, attention_weights=5)
    layouts = dict(value="(N, S, M, D)", spatial_shapes="(L, 2)", level_start_index="(L,)",
                   sampling_locations="(N, Lq, M, L, K, 2)",
                   attention_weights="(N, Lq, M, L, K)")
    for name, dims in expected_dims.items():
        if named[name].dim() != dims:
            raise ValueError(f"{name} must have {dims} dimensions {layouts[name]}, "
                             f"got shape {_shape(named[name])}")

    N, S, M, D = value.shape
    L = spatial_shapes.shape[0]
    if spatial_shapes.shape[1] != 2:
        raise ValueError(f"spatial_shapes must be (L, 2) as (H, W), got shape "
                         f"{_shape(spatial_shapes)}")
    if level_start_index.shape[0] != L:
        raise ValueError(f"level_start_index must have L={L} entries (one per level of "
                         f"spatial_shapes), got shape {_shape(level_start_index)}")
    Lq = sampling_locations.shape[1]
    K = sampling_locations.shape[4]
    expected_loc = (N, Lq, M, L, K, 2)
    if _shape(sampling_locations) != expected_loc:
        raise ValueError(f"sampling_locations must be (N, Lq, M, L, K, 2) = {expected_loc} "
                         f"given value {_shape(value)} and {L} levels, "
                         f"got {_shape(sampling_locations)}")
    expected_w = (N, Lq, M, L, K)
    if _shape(attention_weights) != expected_w:
        raise ValueError(f"attention_weights must be (N, Lq, M, L, K) = {expected_w}, "
                         f"got {_shape(attention_weights)}")

    devices = {name: t.device for name, t in named.items()
               if name not in ("spatial_shapes", "level_start_index")}
    if len(set(devices.values())) > 1:
        raise ValueError(f"value, sampling_locations and attention_weights must be on one "
                         f"device, got {devices}")

    if check_values:
        shapes = spatial_shapes.tolist()
        if any(h <= 0 or w <= 0 for h, w in shapes):
            raise ValueError(f"spatial_shapes must hold positive (H, W), got {shapes}")
        sizes = [h * w for h, w in shapes]
        if sum(sizes) != S:
            raise ValueError(f"value has S={S} keys but spatial_shapes {shapes} "
                             f"sum to {sum(sizes)}")
        starts = [sum(sizes[:i]) for i in range(L)]
        given = level_start_index.tolist()
        if given != starts:
            raise ValueError(f"level_start_index must be {starts} for spatial_shapes "
                             f"{shapes}, got {given}")


def level_start_index_of(spatial_shapes):
    """(L, 2) int64 (H, W) -> (L,) int64 start of each level in the flattened S axis."""
    sizes = spatial_shapes.prod(1)
    return torch.cat((sizes.new_zeros(1), sizes.cumsum(0)[:-1]))
