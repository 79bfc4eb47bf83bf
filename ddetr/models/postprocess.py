"""From the model's outputs to detections in the original image, as COCOeval takes them.

Each of the Lq queries has a sigmoid score for every class; the detections of an image
are the top k (query, class) pairs over all Lq x num_classes scores (so one query may
yield several classes), with the query's box converted to absolute (x0, y0, x1, y1)
pixels of the original image. For COCO results, convert to (x, y, w, h).
"""
import torch
from torch import nn
from torchvision.ops import box_convert


class PostProcess(nn.Module):
    """Args: num_select k, the detections kept per image (COCO evaluates 100)."""

    def __init__(self, num_select=100):
        super().__init__()
        self.num_select = num_select

    @torch.no_grad()
    def forward(self, outputs, target_sizes):
        """
        Args:
            outputs: "pred_logits" (N, Lq, num_classes), "pred_boxes" (N, Lq, 4) cxcywh
                in [0, 1] of the image.
            target_sizes: (N, 2) as (h, w) of the original images.

        Returns:
            N dicts {"scores" (k,), "labels" (k,) int64, "boxes" (k, 4) x0y0x1y1},
            best score first, k = min(num_select, Lq * num_classes).
        """
        logits = outputs["pred_logits"]
        target_sizes = torch.as_tensor(target_sizes, device=logits.device)
        if target_sizes.shape != (logits.shape[0], 2):
            raise ValueError(f"target_sizes must be (N, 2) = ({logits.shape[0]}, 2), got "
                             f"{tuple(target_sizes.shape)}")
        scores, labels, boxes = self.detections(logits, outputs["pred_boxes"], target_sizes)
        return [{"scores": s, "labels": l, "boxes": b}
                for s, l, b in zip(scores, labels, boxes)]

    def detections(self, logits, boxes, target_sizes):
        """The same as batched tensors (what an exported graph returns): logits
        (N, Lq, num_classes), boxes (N, Lq, 4), target_sizes (N, 2) -> scores (N, k),
        labels (N, k) int64, boxes (N, k, 4) x0y0x1y1 in pixels."""
        N, Lq, num_classes = logits.shape
        prob = logits.float().sigmoid().reshape(N, Lq * num_classes)
        k = min(self.num_select, Lq * num_classes)
        scores, index = prob.topk(k, dim=1)
        query = index // num_classes
        labels = index % num_classes
        xyxy = box_convert(boxes.float(), "cxcywh", "xyxy")
        xyxy = torch.gather(xyxy, 1, query[..., None].expand(-1, -1, 4))
        wh = target_sizes.float().flip(1)                    # (N, 2) as (w, h)
        return scores, labels, xyxy * torch.cat([wh, wh], 1)[:, None, :]
