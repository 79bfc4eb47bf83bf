"""Modules: dense and deformable attention."""
from .attention import MultiHeadAttention
from .deformable_attention import DeformableAttention
from .ms_deform_attn import MSDeformAttn

__all__ = ["DeformableAttention", "MSDeformAttn", "MultiHeadAttention"]
