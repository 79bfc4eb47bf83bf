"""Complexity analysis: analytic FLOP formulas, measured FLOPs, peak memory, time
against resolution, log-log slopes and the entropy of attention weights.

Chapter 2 of the book is built from these functions.
"""
from .benchmarks import load_kernel_benchmarks, machine_name
from .complexity import (attention_sweep, deformable_encoder_attention,
                         dense_encoder_attention, pixel_reference_points)
from .entropy import attention_entropy, uniform_entropy
from .flops import (deformable_attention_flops, deformable_sampling_flops,
                    dense_attention_flops, ffn_flops, level_sizes, measure_flops,
                    model_flops, ms_deformable_attention_flops)
from .measure import fit_loglog_slope, peak_memory, time_fn
from .trace import trace_shapes

__all__ = [
    "attention_entropy", "attention_sweep", "deformable_attention_flops",
    "deformable_encoder_attention", "deformable_sampling_flops", "dense_attention_flops",
    "dense_encoder_attention", "ffn_flops", "fit_loglog_slope", "level_sizes", "measure_flops",
    "load_kernel_benchmarks", "machine_name", "model_flops", "ms_deformable_attention_flops", "peak_memory", "pixel_reference_points",
    "time_fn", "trace_shapes", "uniform_entropy",
]
