"""Modules: dense and deformable attention, position encoding, the transformers."""
from .attention import MultiHeadAttention
from .deformable_attention import DeformableAttention
from .deformable_transformer import DeformableTransformer
from .dense_cross_attention import DenseCrossAttention
from .geometry import inverse_sigmoid
from .ms_deform_attn import MSDeformAttn, set_attention_backend
from .position_encoding import PositionEmbeddingSine
from .transformer import Transformer

__all__ = ["DeformableAttention", "DeformableTransformer", "DenseCrossAttention",
           "MSDeformAttn", "MultiHeadAttention", "PositionEmbeddingSine", "Transformer",
           "inverse_sigmoid", "set_attention_backend"]
