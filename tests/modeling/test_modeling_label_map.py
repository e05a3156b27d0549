"""Label maps: torchvision's COCO outputs, matching a model's categories to a dataset's, and
``train.init_from`` keeping the predictor rows of the categories a dataset shares with the
weights it starts from."""

import pytest
import torch
import torchvision

from pipeline.modeling import MaskRCNN, load_init_weights
from pipeline.modeling.label_map import LabelMap, LabelMapError, match_categories

torch.set_num_threads(1)

PREDICTORS = {
    "roi_heads.box_predictor.cls_score": "roi_heads.box_predictor.cls_score",
    "roi_heads.box_predictor.bbox_pred": "roi_heads.box_predictor.bbox_pred",
    "roi_heads.mask_head.logits": "roi_heads.mask_predictor.mask_fcn_logits",
}


def test_torchvision_coco_outputs_are_coco_ids():
    coco = LabelMap.torchvision_coco()
    assert coco.num_classes == 91 and len(coco.categories) == 80
    ids = coco.ids_by_index()
    assert all(index == cid for index, cid in ids.items())
    names = coco.names_by_index()
    assert (names[1], names[18], names[90]) == ("person", "dog", "toothbrush")
    assert 12 not in ids and 83 not in ids  # ids COCO skipped: outputs that mean nothing


def test_matching_by_id_then_by_name_and_refusing_another_name_under_the_same_id():
    coco = LabelMap.torchvision_coco()
    dataset = [
        {"id": 1, "name": "person"},  # same id, same name
        {"id": 2, "name": "Dog"},  # COCO's dog is 18: by name, case aside
        {"id": 42, "name": "hexagon"},  # 42 is COCO's surfboard: another category
        {"id": 200, "name": "traffic_light"},  # by name, underscores aside
    ]
    match = match_categories(coco, dataset)
    assert match.index_to_id == {1: 1, 18: 2, 10: 200}
    assert [c["id"] for c in match.missing] == [42]
    assert "'hexagon' (id 42, the model's 'surfboard')" in match.summary()


def test_one_output_serves_one_category():
    model = LabelMap.from_categories(
        [{"id": 5, "name": "cat", "index": 1}, {"id": 6, "name": "dog", "index": 2}]
    )
    # "cat" under id 6 takes output 1 by name; "dog" under id 5 takes output 2 by name.
    match = match_categories(model, [{"id": 6, "name": "cat"}, {"id": 5, "name": "dog"}])
    assert match.index_to_id == {1: 6, 2: 5} and not match.missing
    twice = match_categories(model, [{"id": 5, "name": "cat"}, {"id": 9, "name": "cat"}])
    assert twice.index_to_id == {1: 5} and [c["id"] for c in twice.missing] == [9]


def test_malformed_label_maps_are_refused_in_one_line():
    with pytest.raises(LabelMapError, match=r"^ckpt: malformed label_map"):
        LabelMap.from_json([{"index": 1, "name": "x"}], 3, "ckpt")
    with pytest.raises(LabelMapError, match=r"not distinct values in 1\.\.2"):
        LabelMap.from_json([{"index": 3, "id": 1, "name": "x"}], 3, "ckpt")


def rows(key: str, index: int) -> slice:
    return slice(4 * index, 4 * index + 4) if "bbox_pred" in key else slice(index, index + 1)


@pytest.mark.parametrize("classifier_loss", ["ce", "focal"])
def test_init_from_coco_keeps_the_rows_of_shared_categories(tmp_path, classifier_loss):
    torch.manual_seed(0)
    coco_model = torchvision.models.detection.maskrcnn_resnet50_fpn(
        weights=None, weights_backbone=None, num_classes=91
    )
    theirs = coco_model.state_dict()
    torch.save(theirs, tmp_path / "coco.pth")
    # The dataset: car (COCO id 3), dog under its own id 7 (COCO's 18), hexagon (not COCO).
    categories = [
        {"id": 3, "name": "car", "index": 1},
        {"id": 7, "name": "dog", "index": 2},
        {"id": 42, "name": "hexagon", "index": 3},
    ]
    model = MaskRCNN(num_classes=4, classifier_loss=classifier_loss)
    fresh = {k: v.clone() for k, v in model.state_dict().items()}
    report = load_init_weights(
        model, tmp_path / "coco.pth", label_map=LabelMap.from_categories(categories)
    )
    ours = model.state_dict()
    focal = classifier_loss == "focal"
    for our_prefix, tv_prefix in PREDICTORS.items():
        for name in ("weight", "bias"):
            key, tv_key = f"{our_prefix}.{name}", f"{tv_prefix}.{name}"
            shift = 1 if focal and "cls_score" in key else 0  # focal: no background row
            for index, coco_id in ((1, 3), (2, 18)) + (() if shift else ((0, 0),)):
                got, want = ours[key][rows(key, index - shift)], theirs[tv_key][rows(key, coco_id)]
                assert torch.equal(got, want), (key, index)
            hexagon = rows(key, 3 - shift)
            assert torch.equal(ours[key][hexagon], fresh[key][hexagon]), key
            assert key in report.loaded
    assert "kept 2 of 3 categories" in report.categories
    assert "dog (id 7 -> model id 18)" in report.categories
    assert "'hexagon' (id 42, the model's 'surfboard')" in report.categories
    assert any(line.startswith("predictor rows: kept 2 of 3") for line in report.summary_lines())
    # Everything else of the detector came from the file too.
    assert torch.equal(ours["rpn.head.conv.weight"], theirs["rpn.head.conv.0.0.weight"])


def test_init_from_our_checkpoint_matches_rows_by_category_not_position(tmp_path):
    torch.manual_seed(0)
    source = MaskRCNN(num_classes=3, depth=18, fpn_channels=32)
    source_map = LabelMap.from_categories(
        [{"id": 1, "name": "circle", "index": 1}, {"id": 2, "name": "square", "index": 2}]
    )
    source.save_checkpoint(tmp_path / "ours.pt", label_map=source_map.to_json())
    # Same class count, categories in the other order (and other ids): rows must swap.
    target = MaskRCNN(num_classes=3, depth=18, fpn_channels=32)
    target_map = LabelMap.from_categories(
        [{"id": 10, "name": "square", "index": 1}, {"id": 20, "name": "circle", "index": 2}]
    )
    load_init_weights(target, tmp_path / "ours.pt", label_map=target_map)
    key = "roi_heads.box_predictor.cls_score.weight"
    mine, theirs = target.state_dict()[key], source.state_dict()[key]
    assert torch.equal(mine[1], theirs[2]) and torch.equal(mine[2], theirs[1])
    assert torch.equal(mine[0], theirs[0])
    # Without the model's categories, a same-shaped predictor loads by position, as before.
    plain = MaskRCNN(num_classes=3, depth=18, fpn_channels=32)
    report = load_init_weights(plain, tmp_path / "ours.pt")
    assert torch.equal(plain.state_dict()[key], theirs) and report.categories is None
