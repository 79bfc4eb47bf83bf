"""Modules: dense and deformable attention, position encoding, the transformers."""
from .attention import MultiHeadAttention
from .deformable_attention import DeformableAttention
from .deformable_transformer import DeformableTransformer
from .geometry import inverse_sigmoid
from .ms_deform_attn import MSDeformAttn
from .position_encoding import PositionEmbeddingSine
from .transformer import Transformer

__all__ = ["DeformableAttention", "DeformableTransformer", "MSDeformAttn",
           "MultiHeadAttention", "PositionEmbeddingSine", "Transformer", "inverse_sigmoid"]
