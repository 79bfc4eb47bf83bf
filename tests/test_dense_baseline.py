"""The dense baseline of chapter 7 (attention="dense"): Deformable DETR with DETR's
attention in the encoder and in the decoder's cross-attention, and nothing else changed.

Its attention is checked against torch.nn.MultiheadAttention (an independent
implementation) given the same weights; that it differs from Deformable DETR in the
attention modules only is checked on the parameter names and shapes; that it predicts
boxes relative to reference points as Deformable DETR does, on the initial boxes."""
import pytest
import torch
from torch import nn

from ddetr.config import get_config
from ddetr.models import build_model
from ddetr.nn import MultiHeadAttention
from ddetr.nn.deformable_transformer import (DeformableTransformerDecoderLayer,
                                             DeformableTransformerEncoderLayer,
                                             make_attention)

PLAIN = {"with_box_refine": False, "two_stage": False, "num_feature_levels": 1,
         "dn_detr": False}


def torch_attention(ours):
    """A torch.nn.MultiheadAttention holding the weights of our MultiHeadAttention."""
    ref = nn.MultiheadAttention(ours.d_model, ours.n_heads, batch_first=True)
    ref.load_state_dict(ours.state_dict())
    return ref.eval()


def _inputs(N=2, S=12, C=32, seed=0):
    gen = torch.Generator().manual_seed(seed)
    src, pos = torch.randn(N, S, C, generator=gen), torch.randn(N, S, C, generator=gen)
    mask = torch.zeros(N, S, dtype=torch.bool)
    mask[1, 9:] = True                                   # the second image is padded
    return src, pos, mask


def test_dense_encoder_layer_is_detr_self_attention():
    torch.manual_seed(0)
    layer = DeformableTransformerEncoderLayer(32, 64, 0.0, 1, 4, 2, attention="dense").eval()
    src, pos, mask = _inputs()
    ref = torch_attention(layer.self_attn)
    with torch.no_grad():
        out = layer(src, pos, None, None, None, mask)
        attn = ref(src + pos, src + pos, src, key_padding_mask=mask)[0]   # k = q, v = src
        expected = layer.norm1(src + attn)
        expected = layer.norm2(expected + layer.linear2(torch.relu(layer.linear1(expected))))
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)


def test_dense_decoder_cross_attention_keys_carry_the_memory_positions():
    torch.manual_seed(0)
    layer = DeformableTransformerDecoderLayer(32, 64, 0.0, 1, 4, 2, attention="dense").eval()
    memory, memory_pos, mask = _inputs(S=12)
    tgt, query_pos, _ = _inputs(S=5, seed=1)
    cross, self_attn = torch_attention(layer.cross_attn), torch_attention(layer.self_attn)
    with torch.no_grad():
        out = layer(tgt, query_pos, None, memory, None, None, mask, src_pos=memory_pos)
        x = layer.norm2(tgt + self_attn(tgt + query_pos, tgt + query_pos, tgt)[0])
        x = layer.norm1(x + cross(x + query_pos, memory + memory_pos, memory,
                                  key_padding_mask=mask)[0])
        expected = layer.norm3(x + layer.linear2(torch.relu(layer.linear1(x))))
        # without the memory's positions the keys are different ones
        other = layer(tgt, query_pos, None, memory, None, None, mask, src_pos=0 * memory_pos)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
    assert (other - out).abs().max() > 1e-3


def test_dense_decoder_needs_the_memory_positions():
    cfg = get_config("cpu", {**PLAIN, "attention": "dense"})
    decoder = build_model(cfg)[0].transformer.decoder
    tgt, query_pos, _ = _inputs(S=5, C=cfg.d_model)
    memory, _, mask = _inputs(S=12, C=cfg.d_model)
    with pytest.raises(ValueError, match=r"dense attention needs input_pos \(N, S, C\).*src_pos"):
        decoder(tgt, torch.rand(2, 5, 2), memory, None, None, torch.ones(2, 1, 2),
                query_pos, mask)


@pytest.mark.parametrize("variant", [PLAIN, {"with_box_refine": True, "two_stage": True}])
def test_dense_baseline_differs_in_the_attention_modules_only(variant):
    dense = build_model(get_config("cpu", {**variant, "attention": "dense"}))[0]
    deformable = build_model(get_config("cpu", variant))[0]
    attention = (".self_attn.", ".cross_attn.")

    def outside(model):
        return {k: tuple(v.shape) for k, v in model.state_dict().items()
                if not any(a in k and ("encoder" in k or a == ".cross_attn.")
                           for a in attention)}
    assert outside(dense) == outside(deformable)
    # and the attention modules are what the names say
    enc = dense.transformer.encoder.layers[0].self_attn
    assert type(enc).__name__ == "DenseCrossAttention" and isinstance(enc, MultiHeadAttention)
    assert type(deformable.transformer.encoder.layers[0].self_attn).__name__ == "MSDeformAttn"


@pytest.mark.parametrize("attention", ["deformable", "dense"])
def test_initial_boxes_sit_at_the_reference_points(attention):
    """Both models predict boxes as offsets from reference points, zero at the start."""
    torch.manual_seed(0)
    model = build_model(get_config("cpu", {**PLAIN, "attention": attention}))[0].eval()
    images, masks = torch.randn(2, 3, 96, 128), torch.zeros(2, 96, 128, dtype=torch.bool)
    with torch.no_grad():
        boxes = model(images, masks)["pred_boxes"]
        query_pos = model.query_embed.weight[:, :model.transformer.d_model]
        reference = model.transformer.reference_points(query_pos).sigmoid()
    torch.testing.assert_close(boxes[..., :2], reference.expand(2, -1, -1))


def test_make_attention_rejects_unknown_kinds():
    with pytest.raises(ValueError, match=r"attention must be one of \['deformable', "
                                         r"'dense'\], got 'sparse'"):
        make_attention("sparse", 32, 1, 4, 2, 0.0)
