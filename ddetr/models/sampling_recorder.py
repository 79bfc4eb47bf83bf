"""Recording where the deformable attention samples (points and weights, not maps), for the
book's figures.

    with record_sampling(model) as records:
        model(images, masks)
    rec = records["transformer.decoder.layers.5.cross_attn"]
    rec["sampling_locations"]  # (N, Lq, M, L, K, 2) (x, y) in [0, 1] of each padded map
    rec["attention_weights"]   # (N, Lq, M, L, K), summing to 1 over L*K per head
    rec["reference_points"]    # (N, Lq, L, 2|4), as the layer received them
    rec["spatial_shapes"]      # (L, 2) (H, W)

A forward hook on every MSDeformAttn recomputes its ``sampling(...)`` from the inputs
the module received; the model itself is not changed, and nothing is recorded once the
``with`` block ends. Encoder layers are recorded too (``transformer.encoder.layers.{i}.
self_attn``, one query per token). Reference points are in the padded map's frame (the
valid-image point times the valid ratio); for an unpadded image the two are the same.
"""
from contextlib import contextmanager

import torch

from ..nn.ms_deform_attn import MSDeformAttn


@contextmanager
def record_sampling(model, names=None):
    """Record the sampling of the MSDeformAttn modules of model (all, or those whose
    name is in names) during the forward passes inside the block. Yields a dict
    name -> record (the last forward pass wins); tensors are detached."""
    records, handles = {}, []

    def hook_for(name):
        def hook(module, args, kwargs, output):
            inputs = list(args) + [kwargs.get(k) for k in (
                "query", "reference_points", "input_flatten", "input_spatial_shapes")
                if k in kwargs]
            query, reference_points, _, spatial_shapes = inputs[:4]
            with torch.no_grad():
                locations, weights = module.sampling(query, reference_points, spatial_shapes)
            records[name] = {"sampling_locations": locations.detach(),
                             "attention_weights": weights.detach(),
                             "reference_points": reference_points.detach(),
                             "spatial_shapes": spatial_shapes.detach()}
        return hook

    for name, module in model.named_modules():
        if isinstance(module, MSDeformAttn) and (names is None or name in names):
            handles.append(module.register_forward_hook(hook_for(name), with_kwargs=True))
    try:
        yield records
    finally:
        for handle in handles:
            handle.remove()
