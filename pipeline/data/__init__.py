"""Data: the synthetic shapes dataset, COCO -> WebDataset shards, and the streaming loaders.

The train and eval stages use ``build_train_loader(cfg, rank, world_size)`` and
``build_val_loader(cfg, rank, world_size)``; both yield ``(images, targets)`` in
torchvision's convention, ``read_manifest(dir)`` gives the category table and
``coco_ground_truth(dir)`` the COCO ground truth the shards hold.

Names are imported lazily, so the shard-building CLI does not pay for importing torch.
"""

import importlib

_EXPORTS = {
    "CocoFormatError": "coco",
    "load_coco": "coco",
    "segmentation_to_rle": "coco",
    "CountingHandler": "loader",
    "SampleDecodeError": "loader",
    "ShardEvalLoader": "eval_loader",
    "ShardTrainLoader": "loader",
    "build_train_loader": "loader",
    "build_val_loader": "eval_loader",
    "coco_ground_truth": "ground_truth",
    "ManifestError": "manifest",
    "ShardInfo": "manifest",
    "ShardManifest": "manifest",
    "read_manifest": "manifest",
    "BuildSummary": "sharding",
    "IncompleteShards": "sharding",
    "build_shards": "sharding",
    "merge_only": "sharding",
    "make_shapes_dataset": "shapes",
    "make_example": "transforms",
    "resized_size": "transforms",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
