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

The level tables (``spatial_shapes``, ``level_start_index``) must describe ``value``
exactly: a wrong table would make a kernel read and write outside ``value``. Checking
them means reading them on the host, which for tables on a GPU is a device-to-host
copy that waits for the GPU (a sync). So a check is done once per table and remembered:

* ``level_tables(shapes, device)`` builds the two tensors from Python ints (the model
  knows its feature-map sizes): they are valid by construction and known without
  reading them back, so no call ever syncs on them;
* ``checked_levels(spatial_shapes, level_start_index, S)`` validates tables of unknown
  origin the first time it sees them (one sync for tables on a GPU) and remembers the
  result for as long as the tensors live unmodified (an in-place change is noticed
  through the tensor's version counter and checks again).

The C++ entry points check the tables once more on the host before any kernel starts,
and the kernels skip a level that would fall outside ``value`` (ddetr/csrc/).
"""
import weakref

import torch
from torch.utils.weak import WeakIdKeyDictionary


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
    _check_dtypes(named)
    _check_shapes(named)
    devices = {name: t.device for name, t in named.items()
               if name not in ("spatial_shapes", "level_start_index")}
    if len(set(devices.values())) > 1:
        raise ValueError(f"value, sampling_locations and attention_weights must be on one "
                         f"device, got {devices}")
    if check_values:
        checked_levels(spatial_shapes, level_start_index, value.shape[1])


def _check_dtypes(named):
    """value floating; locations and weights in value's dtype (on a GPU, float32 beside a
    half value: sampling positions need float32's precision, autocast need not upcast
    value); the level tables int64."""
    value, locations = named["value"], named["sampling_locations"]
    if not value.is_floating_point():
        raise TypeError(f"value must be a floating-point tensor, got dtype {value.dtype}")
    half_on_gpu = value.device.type == "cuda" and value.dtype in (torch.float16, torch.bfloat16)
    if locations.dtype != value.dtype and not (half_on_gpu and locations.dtype == torch.float32):
        raise TypeError(f"sampling_locations must have the dtype of value ({value.dtype})"
                        + (" or float32" if half_on_gpu else "")
                        + f", got {locations.dtype}")
    if named["attention_weights"].dtype != locations.dtype:
        raise TypeError(f"attention_weights must have the dtype of sampling_locations "
                        f"({locations.dtype}), got {named['attention_weights'].dtype}")
    for name in ("spatial_shapes", "level_start_index"):
        if named[name].dtype != torch.int64:
            raise TypeError(f"{name} must be int64, got {named[name].dtype}")


LAYOUTS = dict(value="(N, S, M, D)", spatial_shapes="(L, 2)", level_start_index="(L,)",
               sampling_locations="(N, Lq, M, L, K, 2)", attention_weights="(N, Lq, M, L, K)")


def _check_shapes(named):
    """Each tensor of its layout (LAYOUTS), the sizes shared between them equal."""
    for name, layout in LAYOUTS.items():
        dims = layout.count(",") + 1 if layout != "(L,)" else 1
        if named[name].dim() != dims:
            raise ValueError(f"{name} must have {dims} dimensions {layout}, "
                             f"got shape {_shape(named[name])}")
    value, shapes, starts = named["value"], named["spatial_shapes"], named["level_start_index"]
    N, S, M, D = value.shape
    L = shapes.shape[0]
    if shapes.shape[1] != 2:
        raise ValueError(f"spatial_shapes must be (L, 2) as (H, W), got shape {_shape(shapes)}")
    if starts.shape[0] != L:
        raise ValueError(f"level_start_index must have L={L} entries (one per level of "
                         f"spatial_shapes), got shape {_shape(starts)}")
    locations, weights = named["sampling_locations"], named["attention_weights"]
    Lq, K = locations.shape[1], locations.shape[4]
    if _shape(locations) != (N, Lq, M, L, K, 2):
        raise ValueError(f"sampling_locations must be (N, Lq, M, L, K, 2) = "
                         f"{(N, Lq, M, L, K, 2)} given value {_shape(value)} and {L} levels, "
                         f"got {_shape(locations)}")
    if _shape(weights) != (N, Lq, M, L, K):
        raise ValueError(f"attention_weights must be (N, Lq, M, L, K) = {(N, Lq, M, L, K)}, "
                         f"got {_shape(weights)}")


class LevelTable:
    """The validated contents of a pair of level tables, as Python ints.

    shapes: list of L (H, W); starts: list of L start indices; S: their total size;
    host: the two tables as CPU tensors (the CUDA kernel reads its table from these
    and passes it to the GPU by value: no copy back from the device).
    """

    def __init__(self, shapes, starts):
        self.shapes = [(_size(h), _size(w)) for h, w in shapes]
        self.starts = [_size(s) for s in starts]
        self.S = sum(h * w for h, w in self.shapes)
        self.host = (_int64_tensor([v for hw in self.shapes for v in hw]).view(-1, 2),
                     _int64_tensor(self.starts))


def _size(v):
    """An int, or a symbolic size as it is (torch.export with dynamic image sizes)."""
    return v if isinstance(v, torch.SymInt) else int(v)


def _int64_tensor(values):
    """torch.tensor(values, dtype=int64); symbolic sizes go in as scalar tensors, which
    a graph traced with dynamic image sizes keeps symbolic (torch.tensor would fix them)."""
    if not any(isinstance(v, torch.SymInt) for v in values):
        return torch.tensor(values, dtype=torch.int64)
    return torch.stack([torch.scalar_tensor(v, dtype=torch.int64) for v in values])


# spatial_shapes tensor -> (its version, level_start_index, its version, LevelTable);
# weak keys by identity, so a table is forgotten when the model drops the tensor
_checked = WeakIdKeyDictionary()


def _remember(spatial_shapes, level_start_index, table):
    _checked[spatial_shapes] = (spatial_shapes._version, weakref.ref(level_start_index),
                                level_start_index._version, table)


def _known(spatial_shapes, level_start_index):
    entry = _checked.get(spatial_shapes)
    if entry is None:
        return None
    version, lsi_ref, lsi_version, table = entry
    if (version != spatial_shapes._version or lsi_ref() is not level_start_index
            or lsi_version != level_start_index._version):
        return None
    return table


def _validate(shapes, starts, S):
    """Raise ValueError unless the Python-int tables describe S keys exactly."""
    if any(len(hw) != 2 or hw[0] <= 0 or hw[1] <= 0 for hw in shapes):
        raise ValueError(f"spatial_shapes must hold positive (H, W), got {shapes}")
    sizes = [h * w for h, w in shapes]
    if S is not None and sum(sizes) != S:
        raise ValueError(f"value has S={S} keys but spatial_shapes {shapes} "
                         f"sum to {sum(sizes)}")
    expected = [sum(sizes[:i]) for i in range(len(shapes))]
    if starts is not None and list(starts) != expected:
        raise ValueError(f"level_start_index must be {expected} for spatial_shapes "
                         f"{shapes}, got {list(starts)}")
    return expected


def level_tables(shapes, device=None):
    """(spatial_shapes (L, 2) int64, level_start_index (L,) int64) built from Python ints.

    ``shapes`` is a list of L (H, W). The pair is valid by construction and remembered
    as checked, so the operators never read it back from the device.
    """
    shapes = [tuple(hw) for hw in shapes]
    if not all(isinstance(v, (int, torch.SymInt)) for hw in shapes for v in hw):
        raise TypeError(f"level_tables expects a list of (H, W) Python ints, got {shapes}")
    starts = _validate(shapes, None, None)
    table = LevelTable(shapes, starts)
    if device is None or torch.device(device).type == "cpu":
        spatial_shapes, level_start_index = (t.clone() for t in table.host)
    else:
        spatial_shapes = table.host[0].to(device, non_blocking=True)
        level_start_index = table.host[1].to(device, non_blocking=True)
    # a graph that dynamo traces keeps no Python state; torch.export's non-strict
    # tracing (the ONNX exporter's) runs this Python, so the memory holds for the trace
    if not torch.compiler.is_dynamo_compiling():
        _remember(spatial_shapes, level_start_index, table)
    return spatial_shapes, level_start_index


def checked_levels(spatial_shapes, level_start_index, S):
    """The LevelTable of these tables, validated against S keys; raises ValueError if
    they do not describe S keys. Reads the tensors only the first time (one sync for
    tables on a GPU), later calls with the same unmodified tensors are free."""
    compiling = torch.compiler.is_dynamo_compiling()
    table = None if compiling else _known(spatial_shapes, level_start_index)
    if table is None:
        shapes = [tuple(hw) for hw in spatial_shapes.tolist()]
        starts = level_start_index.tolist()
        _validate(shapes, starts, S)
        table = LevelTable(shapes, starts)
        if not compiling:
            _remember(spatial_shapes, level_start_index, table)
    elif table.S != S:
        raise ValueError(f"value has S={S} keys but spatial_shapes {table.shapes} "
                         f"sum to {table.S}")
    return table


def level_shapes(spatial_shapes):
    """The L (H, W) of spatial_shapes as Python ints (symbolic ones while torch.export
    traces with dynamic sizes): from the remembered table when the tensor came from
    level_tables (no device sync), else read from the tensor (one sync for a table on a
    GPU)."""
    entry = None if torch.compiler.is_dynamo_compiling() else _checked.get(spatial_shapes)
    if entry is not None and entry[0] == spatial_shapes._version:
        return list(entry[3].shapes)
    return [(int(h), int(w)) for h, w in spatial_shapes.tolist()]


def level_start_index_of(spatial_shapes):
    """(L, 2) int64 (H, W) -> (L,) int64 start of each level in the flattened S axis."""
    sizes = spatial_shapes.prod(1)
    return torch.cat((sizes.new_zeros(1), sizes.cumsum(0)[:-1]))
