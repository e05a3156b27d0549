"""Mask R-CNN pipeline: config, data, modeling, engine (train), evaluation, tracking."""
