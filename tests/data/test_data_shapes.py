import hashlib
from pathlib import Path

import numpy as np
import pytest
from pycocotools.coco import COCO

from pipeline.data.shapes import make_shapes_dataset, polygon_area, subtract_convex

pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")


def tree_digest(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def test_same_seed_same_bytes_other_seed_other_bytes(tmp_path):
    for name, seed in (("a", 7), ("b", 7), ("c", 8)):
        make_shapes_dataset(tmp_path / name, train=6, val=2, size=64, seed=seed)
    a, b, c = (tree_digest(tmp_path / n) for n in "abc")
    assert len(a) == 6 + 2 + 2
    assert a == b
    assert a.keys() == c.keys() and a != c


def test_visible_parts_do_not_overlap_and_some_images_are_empty(tmp_path):
    paths = make_shapes_dataset(tmp_path, train=60, val=0, size=96, seed=1)
    coco = COCO(str(paths["train"]))
    empty = 0
    multi_polygon = 0
    for image_id, image in coco.imgs.items():
        annotations = coco.imgToAnns[image_id]
        empty += not annotations
        covered = np.zeros((image["height"], image["width"]), dtype=np.int32)
        for annotation in annotations:
            assert annotation["iscrowd"] == 0 and annotation["area"] > 0
            assert annotation["category_id"] in (1, 2, 3)
            multi_polygon += len(annotation["segmentation"]) > 1
            mask = coco.annToMask(annotation)
            assert mask.sum() == annotation["area"]
            covered += mask
        # Visible parts are disjoint; only rasterisation of shared edges may double up.
        assert (covered > 1).sum() <= 0.02 * covered.size
    assert empty >= 1
    assert multi_polygon >= 1  # occlusion split some shapes into several pieces


def test_subtracting_a_covering_shape_leaves_nothing_and_a_hole_leaves_a_ring():
    square = np.array([[0.0, 0.0], [10.0, 0.0], [10.0, 10.0], [0.0, 10.0]])
    big = square * 3 - 5
    assert subtract_convex(square, big) == []
    inner = square * 0.2 + 4  # a 2x2 square in the middle
    ring = subtract_convex(square, inner)
    area = sum(abs(polygon_area(piece)) for piece in ring)
    assert abs(area - (100 - 4)) < 1e-6
