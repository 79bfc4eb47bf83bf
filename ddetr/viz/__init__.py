"""Plots for the book: architecture diagrams with tensor shapes (the whole model, and
the deformable attention module of the paper's Fig. 2), attention maps,
reference and sampling points (weights as marker sizes), per-level panels, boxes, log-log cost curves and the convergence experiment's
figures; and what the early figures show: a toy scene and two hand-built heads.

Animations and slider views (``animation.animate``) play in the static book, offline;
``toy`` draws the toy trainings of chapters 3-4, ``decoder`` a trained model's decoder
(chapter 6), ``matching`` chapter 1-2's matching and pooling pictures. Import those
modules themselves (``from ddetr.viz.toy import ...``)."""
from .architecture import architecture_shapes, plot_architecture
from .attention import (plot_attention_maps, plot_level_sampling, plot_sampling_points,
                        sampling_points_on_axes)
from .boxes import draw_boxes
from .curves import plot_kernel_benchmark, plot_loglog
from .handmade_heads import handmade_heads
from .module_diagram import deformable_attention_trace, plot_deformable_attention
from .source import show_source
from .toy_scene import pixel_features, synthetic_scene

__all__ = [
    "architecture_shapes", "deformable_attention_trace", "draw_boxes", "handmade_heads", "pixel_features",
    "plot_architecture", "plot_attention_maps", "plot_deformable_attention", "plot_level_sampling",
    "plot_kernel_benchmark", "plot_loglog", "plot_sampling_points",
    "sampling_points_on_axes", "show_source", "synthetic_scene",
]
