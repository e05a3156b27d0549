import hashlib
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO

from pipeline.data.shapes import (
    MIN_VISIBLE_AREA,
    NOISE,
    make_shapes_dataset,
    polygon_area,
    render_image,
)

pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")
REPO = Path(__file__).resolve().parents[2]


def tree_digest(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def test_same_seed_same_bytes_other_seed_other_bytes_splits_differ(tmp_path):
    for name, seed in (("a", 7), ("b", 7), ("c", 8)):
        make_shapes_dataset(tmp_path / name, train=6, val=2, size=64, seed=seed)
    a, b, c = (tree_digest(tmp_path / n) for n in "abc")
    assert len(a) == 6 + 2 + 2
    assert a == b
    assert a.keys() == c.keys() and a != c
    # Train and val are independent draws, not the same images under two names.
    assert a["images/train/train_000000.jpg"] != a["images/val/val_000000.jpg"]


def test_default_dataset_is_128_px_with_disjoint_visible_masks_over_20_px(tmp_path):
    paths = make_shapes_dataset(tmp_path, train=40, val=10)
    for split, count in (("train", 40), ("val", 10)):
        coco = COCO(str(paths[split]))
        assert len(coco.imgs) == count
        assert sorted(c["name"] for c in coco.cats.values()) == ["circle", "square", "triangle"]
        for image_id, image in coco.imgs.items():
            assert (image["height"], image["width"]) == (128, 128)
            with Image.open(tmp_path / "images" / split / image["file_name"]) as decoded:
                assert decoded.size == (128, 128) and decoded.mode == "RGB"
            covered = np.zeros((128, 128), dtype=np.int32)
            annotations = coco.imgToAnns[image_id]
            assert len(annotations) <= 4
            for annotation in annotations:
                assert annotation["iscrowd"] == 0 and annotation["category_id"] in (1, 2, 3)
                assert annotation["area"] > MIN_VISIBLE_AREA
                mask = coco.annToMask(annotation)
                assert mask.sum() == annotation["area"]
                rle = mask_utils.encode(np.asfortranarray(mask))
                np.testing.assert_allclose(annotation["bbox"], mask_utils.toBbox(rle))
                # No visible part is wider than the largest shape (radius 28).
                assert max(annotation["bbox"][2:]) <= 2 * 28 + 1
                covered += mask
            assert covered.max() <= 1, f"{split} image {image_id}: visible masks overlap"


def test_images_hold_1_to_4_shapes_of_radius_10_to_28_that_occlude():
    counts, radii, categories = [], [], set()
    occluded = dropped = 0
    for index in range(300):
        pixels, shapes = render_image(np.random.default_rng([5, index]), 128)
        assert pixels.shape == (128, 128, 3) and pixels.dtype == np.uint8
        counts.append(len(shapes))
        covered = np.zeros((128, 128), dtype=np.int32)
        for shape in shapes:
            radii.append(shape.radius)
            categories.add(shape.category)
            covered += shape.visible
            visible = int(shape.visible.sum())
            occluded += visible < 0.8 * polygon_area(shape.outline)
            dropped += visible <= MIN_VISIBLE_AREA
            if visible:  # the mask is exactly where the image shows the shape's flat colour
                colours = pixels[shape.visible].astype(np.int16)
                assert np.abs(colours - np.median(colours, axis=0)).max() <= 2 * NOISE
        assert covered.max() <= 1
    assert set(counts) == {1, 2, 3, 4}
    assert 10 <= min(radii) < 11 and 27 < max(radii) <= 28
    assert categories == {1, 2, 3}
    assert occluded >= 30  # shapes overlap often, not by accident
    assert dropped >= 1  # and some end up (nearly) hidden and are not annotated


def test_smaller_sizes_scale_the_shapes():
    radii = [
        shape.radius
        for index in range(50)
        for shape in render_image(np.random.default_rng(index), 64)[1]
    ]
    assert min(radii) >= 5 and max(radii) <= 14


def test_cli_writes_the_dataset_and_rejects_a_bad_size_in_one_line(tmp_path):
    def run(*args):
        return subprocess.run(
            [sys.executable, "launch/make_shapes.py", "--out", str(tmp_path / "out"), *args],
            cwd=REPO, capture_output=True, text=True, env={"PYTHONPATH": str(REPO)}, timeout=60,
        )  # fmt: skip

    done = run("--train", "3", "--val", "2", "--seed", "4")
    assert done.returncode == 0, done.stderr
    assert len(list((tmp_path / "out" / "images" / "train").glob("*.jpg"))) == 3
    with Image.open(tmp_path / "out" / "images" / "val" / "val_000001.jpg") as image:
        assert image.size == (128, 128)
    bad = run("--size", "16")
    assert bad.returncode == 2
    assert bad.stderr.strip().splitlines() == ["error: image size 16 is too small (at least 32)"]
