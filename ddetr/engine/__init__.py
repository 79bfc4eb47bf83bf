"""Training engine: the loop, COCO evaluation, checkpoints, DDP and the CLI."""
from .checkpoint import (CheckpointError, CheckpointMismatchError, load_checkpoint,
                         save_checkpoint)
from .evaluate import METRICS, coco_eval, evaluate, format_table
from .predict import evaluate_checkpoint, load_trained, predict_image
from .run_folder import RunFolderError, read_log
from .train import (TrainingDiverged, TrainingInterrupted, build_loaders, build_optimizer,
                    param_groups, train, training_plan)

__all__ = ["train", "evaluate", "coco_eval", "format_table", "METRICS", "save_checkpoint",
           "load_checkpoint", "build_loaders", "build_optimizer", "param_groups",
           "read_log", "training_plan", "load_trained", "evaluate_checkpoint", "predict_image",
           "CheckpointError", "CheckpointMismatchError", "RunFolderError", "TrainingDiverged",
           "TrainingInterrupted"]
