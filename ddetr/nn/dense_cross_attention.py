"""DETR's dense attention behind MSDeformAttn's call signature (chapter 7's baseline).

``DenseCrossAttention`` is a ``MultiHeadAttention`` (same parameters, same names, so
official checkpoints and the recorded outputs still load) that is called as
``MSDeformAttn`` is, so an encoder or decoder layer runs either without asking which:
every query attends to all S tokens of all levels; the keys carry their position codes
(key = value + input_pos), the values do not. The reference points and the level
tables are accepted and not used.
"""
from .attention import MultiHeadAttention
from .checks import check_like


class DenseCrossAttention(MultiHeadAttention):
    """Args: d_model C, n_heads M, dropout (on the attention weights), as
    ``MultiHeadAttention``."""

    def forward(self, query, reference_points, input_flatten, input_spatial_shapes=None,
                input_level_start_index=None, input_padding_mask=None, input_pos=None):
        """query (N, Lq, C), input_flatten (N, S, C) the values, input_padding_mask
        (N, S) bool or None, input_pos (N, S, C) the values' position codes, added to
        make the keys -> (N, Lq, C). reference_points and the level tables: unused."""
        if input_pos is None:
            raise ValueError("dense attention needs input_pos (N, S, C), the position "
                             "codes of its keys (the memory's src_pos in the decoder), "
                             "got None")
        check_like("input_pos", input_pos, input_flatten, "input_flatten")
        key = input_flatten + input_pos
        return super().forward(query, key, input_flatten, input_padding_mask)[0]
