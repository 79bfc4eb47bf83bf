"""Functional operators: dense attention and (multi-scale) deformable attention."""
from .checks import check_ms_deform_attn_inputs, level_start_index_of
from .deform_attn import bilinear_sample, deform_attn
from .deform_conv import deform_conv_as_attention
from .dense_attention import multi_head_attention, scaled_dot_product_attention
from .kernel import load_kernel, ms_deform_attn_kernel
from .ms_deform_attn import ms_deform_attn
from .ms_deform_attn_naive import ms_deform_attn_naive
from .ms_deform_attn_reference import ms_deform_attn_reference

__all__ = [
    "bilinear_sample", "check_ms_deform_attn_inputs", "deform_attn", "deform_conv_as_attention",
    "level_start_index_of",
    "load_kernel", "ms_deform_attn", "ms_deform_attn_kernel", "ms_deform_attn_naive",
    "ms_deform_attn_reference",
    "multi_head_attention", "scaled_dot_product_attention",
]
