"""What a trained model learned: where its decoder queries sample, and how far from
their reference points, against the size of the objects they found (chapter 7); and
how its queries' boxes move through the decoder, from the two-stage proposals to the
detections (``decoder_trace``, chapter 6)."""
import numpy as np
import torch
from torchvision import tv_tensors
from torchvision.ops import box_convert, box_iou

from ..models import record_sampling


@torch.no_grad()
def decoder_sampling(model, image, layer=-1):
    """Run model on one image (3, H, W) and record the cross-attention sampling of one
    decoder layer. Returns (outputs of the model for the image, the record of
    ``ddetr.models.record_sampling`` with its batch dimension removed)."""
    name = f"transformer.decoder.layers.{layer % len(model.transformer.decoder.layers)}" \
           ".cross_attn"
    H, W = image.shape[-2:]
    model.eval()
    with record_sampling(model, [name]) as records:
        outputs = model(image[None], torch.zeros(1, H, W, dtype=torch.bool))
    return outputs, {k: (v[0] if k != "spatial_shapes" else v)
                     for k, v in records[name].items()}


def query_spread(record, image_size):
    """How far each query samples from its reference point, in pixels of the image.

    Args:
        record: one image's record from ``decoder_sampling`` (sampling_locations
            (Lq, M, L, K, 2), attention_weights (Lq, M, L, K), reference_points
            (Lq, L, 2|4)).
        image_size: (H, W) of the image the model saw (no padding).
    Returns:
        spread (Lq,): the attention-weighted mean distance over each head's L*K points,
        averaged over the M heads; level_spread (Lq, L): the same within each level
        (weights renormalised per level).
    """
    H, W = image_size
    loc, w = record["sampling_locations"], record["attention_weights"]
    ref = record["reference_points"][:, None, :, None, :2]          # (Lq, 1, L, 1, 2)
    scale = torch.tensor([W, H], dtype=loc.dtype)
    dist = ((loc - ref) * scale).norm(dim=-1)                         # (Lq, M, L, K)
    spread = (w * dist).sum((2, 3)).mean(1)
    level = (w * dist).sum(3) / w.sum(3).clamp(min=1e-12)             # (Lq, M, L)
    return spread, level.mean(1)


def sampling_spread(model, dataset, num_images=40, iou_threshold=0.5, layer=-1):
    """How far the queries that found an object sample, against the object's size.

    For each ground-truth box of the first num_images images of dataset, the query
    whose predicted box overlaps it most (if IoU >= iou_threshold) is kept.

    Returns a dict of numpy arrays over the P kept objects: "box_size" (P,)
    sqrt(w h) of the ground-truth box in pixels, "spread" (P,) and "level_spread"
    (P, L) from ``query_spread`` in pixels, "iou" (P,), "score" (P,) the query's
    class probability, "image" (P,) the image index.
    """
    keys = ("box_size", "spread", "level_spread", "iou", "score", "image")
    found = {k: [] for k in keys}
    for i in range(min(num_images, len(dataset))):
        image, target = dataset[i]
        H, W = image.shape[-2:]
        outputs, record = decoder_sampling(model, image, layer)
        pred = box_convert(outputs["pred_boxes"][0], "cxcywh", "xyxy")
        gt = box_convert(target["boxes"], "cxcywh", "xyxy")
        if len(gt) == 0:
            continue
        iou, query = box_iou(gt, pred).max(1)                       # per object
        keep = iou >= iou_threshold
        spread, level = query_spread(record, (H, W))
        prob = outputs["pred_logits"][0].sigmoid().max(-1).values
        gt_wh = target["boxes"][keep, 2:] * torch.tensor([W, H])
        found["box_size"].append(gt_wh.prod(-1).sqrt())
        found["spread"].append(spread[query[keep]])
        found["level_spread"].append(level[query[keep]])
        found["iou"].append(iou[keep])
        found["score"].append(prob[query[keep]])
        found["image"].append(torch.full((int(keep.sum()),), i))
    return {k: torch.cat(v).numpy() if v else np.zeros(0) for k, v in found.items()}


def model_input(cfg, image):
    """A PIL image as the model of cfg sees it at evaluation: (3, H, W), resized to
    cfg's evaluation scale and normalised (the transform of ``ddetr.data``)."""
    from ..data.transforms import make_transforms     # (the data package is heavier)

    transform = make_transforms(False, cfg.train_scales, cfg.max_size, cfg.val_scale)
    empty = {"boxes": tv_tensors.BoundingBoxes(torch.zeros(0, 4), format="XYXY",
                                               canvas_size=(image.height, image.width)),
             "labels": torch.zeros(0, dtype=torch.int64)}
    return transform(image, empty)[0]


@torch.no_grad()
def decoder_trace(model, image):
    """Follow the queries of a trained model through its decoder, on one image.

    Args:
        model: a DeformableDETR; image: (3, H, W) normalised, unpadded.

    Returns a dict, Lq queries and D decoder layers:
        "references" (D, Lq, 2|4): the reference point or box each layer sampled
            around (with refinement, the box of the layer before; layer 0's are the
            initial references: in the two-stage model the encoder's top-k proposals),
            in [0, 1] of the image, (cx, cy[, w, h]);
        "boxes" (D, Lq, 4): the box each layer predicts, (cx, cy, w, h) in [0, 1];
        "scores" (D, Lq) and "labels" (D, Lq): each layer's best class probability and
            its class index;
        "proposal_scores" (Lq,): two-stage only, the foreground probability that chose
            each proposal (None otherwise);
        "sampling": {layer index: record of ``record_sampling`` for that layer's
            cross-attention, batch removed}, and "encoder": the last encoder layer's;
        "outputs": the model's outputs.
    """
    D = len(model.transformer.decoder.layers)
    names = {f"transformer.decoder.layers.{d}.cross_attn": d for d in range(D)}
    encoder = f"transformer.encoder.layers.{len(model.transformer.encoder.layers) - 1}.self_attn"
    H, W = image.shape[-2:]
    model.eval()
    with record_sampling(model, [*names, encoder]) as records:
        outputs = model(image[None], torch.zeros(1, H, W, dtype=torch.bool))
    sampling = {d: {k: (v[0] if k != "spatial_shapes" else v) for k, v in records[n].items()}
                for n, d in names.items()}
    per_layer = [*outputs.get("aux_outputs", []), outputs][-D:]
    probs = torch.stack([o["pred_logits"][0].sigmoid() for o in per_layer])  # (D, Lq, cls)
    proposal_scores = None
    if "enc_outputs" in outputs:
        Lq = probs.shape[1]
        proposal_scores = outputs["enc_outputs"]["pred_logits"][0, :, 0].sigmoid().topk(Lq)[0]
    return {"references": torch.stack([sampling[d]["reference_points"][:, 0] for d in range(D)]),
            "boxes": torch.stack([o["pred_boxes"][0] for o in per_layer]),
            "scores": probs.max(-1).values, "labels": probs.argmax(-1),
            "proposal_scores": proposal_scores, "sampling": sampling,
            "encoder": {k: (v[0] if k != "spatial_shapes" else v)
                        for k, v in records[encoder].items()},
            "outputs": outputs}
