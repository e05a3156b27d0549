"""The evaluation stage: COCO bbox and segm metrics of a checkpoint on the validation shards.

``torchrun launch/evaluate.py --config FILE --checkpoint PATH --out DIR`` evaluates one
checkpoint (:func:`evaluate_checkpoint`); ``--watch TRAIN_DIR`` evaluates every checkpoint a
training run writes (:func:`watch_training`). Results are in the coordinates of the annotation
file; DIR receives metrics.json, bbox.json, segm.json (RLE) and pictures/. Uses modeling, data
and tracking; never the training engine.
"""

from .checkpoints import CheckpointError, LoadedCheckpoint, load_checkpoint, resolve_checkpoint
from .coco_eval import CocoScores, coco_evaluate
from .inference import ModelPredictor, detect, run_inference, to_original
from .report import EvalReport, EvalSettings
from .runner import build_eval_settings, config_for, evaluate_checkpoint, watch_training

__all__ = [
    "CheckpointError",
    "CocoScores",
    "EvalReport",
    "EvalSettings",
    "LoadedCheckpoint",
    "ModelPredictor",
    "build_eval_settings",
    "coco_evaluate",
    "config_for",
    "detect",
    "evaluate_checkpoint",
    "load_checkpoint",
    "resolve_checkpoint",
    "run_inference",
    "to_original",
    "watch_training",
]
