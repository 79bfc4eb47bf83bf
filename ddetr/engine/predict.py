"""Using a trained checkpoint: load it, evaluate it, run it on one image."""
import torch
from PIL import Image
from torch.utils.data import DataLoader
from torchvision import tv_tensors

from ..data import build_dataset, collate, make_transforms
from ..data.transforms import check_resizable
from ..files import existing_file
from .checkpoint import load_model, require_data
from .evaluate import evaluate
from .huggingface import is_huggingface_folder, load_huggingface
from .train import resolve_device


def load_trained(checkpoint, device="cpu", overrides=None, config=None):
    """(model in eval mode on device, postprocessor, cfg, categories {id: name}) from a
    checkpoint: ddetr's own, compact weights, an official release, or a Hugging Face
    DeformableDetrForObjectDetection folder (config.json + model.safetensors).

    overrides: dict or "key=value" list applied on top of the checkpoint's config
        (e.g. a different data_path); the model's keys cannot change.
    config: a preset name or YAML path for a checkpoint that carries no config (the
        official releases: ``load_trained("r50_deformable_detr-checkpoint.pth",
        config="paper")``, whose boxes get COCO's category names).
    """
    if is_huggingface_folder(checkpoint):
        model, postprocessor, cfg, categories = load_huggingface(checkpoint, overrides, config)
    else:
        model, postprocessor, cfg, categories = load_model(checkpoint, config, overrides)
    model.to(resolve_device(device))
    return model, postprocessor, cfg, categories


def evaluate_checkpoint(checkpoint, device="cpu", overrides=None, split="val",
                        progress=True, config=None):
    """COCO metrics of a checkpoint on a split of its config's data (a checkpoint's
    data_path that does not exist here is refused unless overrides name one), in the
    precision it trained and was evaluated in (cfg.amp), so that the numbers are those of
    its log."""
    model, postprocessor, cfg, _ = load_trained(checkpoint, device, overrides, config)
    require_data(cfg, checkpoint, overrides)
    dataset = build_dataset(split, cfg, generate=False)     # a saved config: no new data
    loader = DataLoader(dataset, batch_size=cfg.batch_size, collate_fn=collate,
                        num_workers=cfg.num_workers)
    return evaluate(model, postprocessor, loader, dataset.coco, next(model.parameters()).device,
                    progress, cfg.amp)


def read_image(path):
    """The RGB PIL image of the file at path; one line naming the file when it is
    missing, a folder or unreadable."""
    path = existing_file(path, "image", "an image file (e.g. a .jpg or .png)")
    try:
        with Image.open(path) as img:
            return img.convert("RGB")
    except OSError as e:
        raise OSError(f"cannot read image {path}: {e}") from e


@torch.no_grad()
def predict_image(model, postprocessor, cfg, image, threshold=0.5):
    """Detections on one image (a path or a PIL image), in its own pixel coordinates.

    Returns dict "boxes" (T, 4) absolute x0y0x1y1, "scores" (T,), "labels" (T,),
    only those scoring at least threshold, and "image", the PIL image."""
    name = "the image"
    if not isinstance(image, Image.Image):
        name, image = f"image {image}", read_image(image)
    check_resizable(image.width, image.height, cfg.val_scale, cfg.max_size, name)
    transform = make_transforms(False, cfg.train_scales, cfg.max_size, cfg.val_scale)
    empty = tv_tensors.BoundingBoxes(torch.zeros(0, 4), format="XYXY",
                                     canvas_size=(image.height, image.width))
    tensor, _ = transform(image, {"boxes": empty, "labels": torch.zeros(0, dtype=torch.int64)})
    device = next(model.parameters()).device
    images, masks, _ = collate([(tensor, None)])
    outputs = model(images.to(device), masks.to(device))
    size = torch.tensor([[image.height, image.width]], device=device)
    det = postprocessor(outputs, size)[0]
    keep = det["scores"] >= threshold
    return {"boxes": det["boxes"][keep].cpu(), "scores": det["scores"][keep].cpu(),
            "labels": det["labels"][keep].cpu(), "image": image}
