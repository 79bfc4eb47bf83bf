"""Multi-scale deformable attention (MSDeformAttn), the attention of Deformable DETR.

The single-scale module, extended over L feature maps: each head samples K points on
every level, L*K points in all, and one softmax runs over all of them, so a query
mixes fine and coarse evidence in one step. Reference points are given per level in
normalised coordinates, so one point means the same place of the image on every level.
Submodule names follow the official implementation so its checkpoints load.
"""
import torch
from torch import nn

from ..ops.ms_deform_attn import BACKENDS, ms_deform_attn
from .checks import (check_heads, check_padding_mask, check_same, check_spatial_shapes,
                     check_tensor, check_width, shape)
from .deformable_attention import init_deformable_attention


def check_backend_name(backend):
    """One of ``ddetr.ops.ms_deform_attn.BACKENDS``."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {list(BACKENDS)}, got {backend!r}")


def set_attention_backend(model, backend):
    """Run every MSDeformAttn of ``model`` on ``backend`` (one of
    ``ddetr.ops.ms_deform_attn.BACKENDS``) from now on; returns model."""
    check_backend_name(backend)
    for module in model.modules():
        if isinstance(module, MSDeformAttn):
            module._backend = backend
    return model


class MSDeformAttn(nn.Module):
    """Args: d_model C, n_levels L, n_heads M (D = C / M), n_points K per head and level.

    ``backend`` is passed to ``ddetr.ops.ms_deform_attn``: one of its BACKENDS ("auto",
    "reference", "kernel", "triton"); it can be changed later, on one module
    (``attn.backend = ...``) or on every module of a model (``set_attention_backend``).

    The sampling runs in the wider of the value's and the locations' dtypes (float32
    reference points under autocast; float64 reference points with a float32 query);
    the output has the dtype of the value projection (the query's, or autocast's).
    """

    def __init__(self, d_model=256, n_levels=4, n_heads=8, n_points=4, backend="auto"):
        super().__init__()
        check_heads(d_model, n_heads, n_levels=n_levels, n_points=n_points)
        self.d_model, self.n_levels = d_model, n_levels
        self.n_heads, self.n_points = n_heads, n_points
        self.backend = backend
        self.sampling_offsets = nn.Linear(d_model, n_heads * n_levels * n_points * 2)
        self.attention_weights = nn.Linear(d_model, n_heads * n_levels * n_points)
        self.value_proj = nn.Linear(d_model, d_model)
        self.output_proj = nn.Linear(d_model, d_model)
        self.reset_parameters()

    @property
    def backend(self):
        """The ``ddetr.ops.ms_deform_attn`` backend this module runs on."""
        return self._backend

    @backend.setter
    def backend(self, backend):
        check_backend_name(backend)
        self._backend = backend

    def reset_parameters(self):
        init_deformable_attention(self, self.n_heads, self.n_levels, self.n_points)

    def sampling(self, query, reference_points, spatial_shapes):
        """Where each head looks on each level, and how much.

        Args:
            query: (N, Lq, C).
            reference_points: (N, Lq, L, 2) points (x, y) in [0, 1], or (N, Lq, L, 4)
                boxes (cx, cy, w, h); with boxes the offsets are fractions of the box
                (offset / K * half the box size), as in iterative refinement.
            spatial_shapes: (L, 2) int64 (H, W).

        Returns:
            sampling_locations (N, Lq, M, L, K, 2) and attention_weights
            (N, Lq, M, L, K), the softmax taken jointly over the L*K samples of a head.
        """
        self.check_sampling_inputs(query, reference_points, spatial_shapes)
        return self._sampling(query, reference_points, spatial_shapes)

    def _sampling(self, query, reference_points, spatial_shapes):
        """``sampling`` on checked inputs."""
        N, Lq, _ = query.shape
        M, L, K = self.n_heads, self.n_levels, self.n_points
        offsets = self.sampling_offsets(query).view(N, Lq, M, L, K, 2)
        weights = self.attention_weights(query).view(N, Lq, M, L * K).softmax(-1)
        weights = weights.view(N, Lq, M, L, K)
        if reference_points.shape[-1] == 2:
            # offsets are in pixels of each level: divide by (W_l, H_l)
            normaliser = spatial_shapes.flip(-1).to(query.dtype)  # (L, 2) as (W, H)
            locations = (reference_points[:, :, None, :, None, :]
                         + offsets / normaliser[None, None, None, :, None, :])
        else:
            locations = (reference_points[:, :, None, :, None, :2]
                         + offsets / K * reference_points[:, :, None, :, None, 2:] * 0.5)
        return locations, weights

    def check_sampling_inputs(self, query, reference_points, spatial_shapes):
        """Raise TypeError/ValueError unless query (N, Lq, C), reference_points
        (N, Lq, L, 2|4) floating point and spatial_shapes (L, 2) int64 fit the module.
        (That the levels hold the S positions of the input is the operator's check.)"""
        check_tensor("query", query, "(N, Lq, C)")
        check_width("query", query, self.d_model)
        check_tensor("reference_points", reference_points, "(N, Lq, L, 2|4)")
        N, Lq, _ = query.shape
        L = self.n_levels
        if reference_points.shape[:3] != (N, Lq, L) or reference_points.shape[-1] not in (2, 4):
            raise ValueError(f"reference_points must be (N, Lq, L, 2 or 4) = "
                             f"({N}, {Lq}, {L}, 2|4), got {shape(reference_points)}")
        check_spatial_shapes("spatial_shapes", spatial_shapes, L)

    def check_inputs(self, query, reference_points, input_flatten, input_spatial_shapes,
                     input_padding_mask):
        """``forward``'s checks, once per call; the operator checks the level tables
        against the input (and nothing here is checked again there)."""
        check_tensor("input_flatten", input_flatten, "(N, S, C)")
        check_width("input_flatten", input_flatten, self.d_model)
        self.check_sampling_inputs(query, reference_points, input_spatial_shapes)
        check_same("batch size", query=query, reference_points=reference_points,
                   input_flatten=input_flatten)
        check_same("device", query=query, reference_points=reference_points,
                   input_flatten=input_flatten)
        check_padding_mask("input_padding_mask", input_padding_mask, *input_flatten.shape[:2])

    def forward(self, query, reference_points, input_flatten, input_spatial_shapes,
                input_level_start_index, input_padding_mask=None, input_pos=None):
        """query (N, Lq, C), reference_points (N, Lq, L, 2|4), input_flatten (N, S, C),
        input_spatial_shapes (L, 2), input_level_start_index (L,),
        input_padding_mask (N, S) bool (True = padding) or None -> (N, Lq, C).

        input_pos, the input's position codes, is not used (deformable attention's
        samples carry no position code); it is accepted so that ``DenseCrossAttention``,
        whose keys need it, is called the same way."""
        self.check_inputs(query, reference_points, input_flatten, input_spatial_shapes,
                          input_padding_mask)
        N, S, C = input_flatten.shape
        value = self.value_proj(input_flatten)
        if input_padding_mask is not None:
            value = value.masked_fill(input_padding_mask[..., None], 0.0)
        value = value.view(N, S, self.n_heads, C // self.n_heads)
        out_dtype = value.dtype
        locations, weights = self._sampling(query, reference_points, input_spatial_shapes)
        # Under autocast the projections give half precision while the reference points
        # stay float32. Locations and weights are always sampled in float32 or wider;
        # value keeps its half type on a GPU, whose kernels read half value with float32
        # locations and weights and sum in float32 (no float32 copy of value per call).
        # The CPU kernel is float32/float64 only: there everything takes the wider type.
        if value.device.type == "cuda" and value.dtype in (torch.float16, torch.bfloat16):
            locations, weights = locations.float(), weights.float()
        else:
            dtype = torch.promote_types(value.dtype, locations.dtype)
            value, locations, weights = value.to(dtype), locations.to(dtype), weights.to(dtype)
        out = ms_deform_attn(value, input_spatial_shapes, input_level_start_index,
                             locations, weights, backend=self.backend)
        return self.output_proj(out.to(out_dtype))
