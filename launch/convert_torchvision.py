"""Convert a torchvision ``maskrcnn_resnet50_fpn`` (v1) checkpoint into the pipeline's format.

    python launch/convert_torchvision.py IN.pth OUT.pt

IN.pth is a torchvision state dict (or a dict holding one under "model" / "state_dict").
OUT.pt is ``{"model": state_dict, "model_args": kwargs, "source": "torchvision", "label_map"}``
(the label map for torchvision's 91-output COCO models: output index = COCO category id), which
``MaskRCNN.from_checkpoint`` rebuilds exactly (aligned=False pooling, torchvision's box
coders and input sizes) and which ``train.init_from`` (``pipeline.modeling.load_init_weights``)
loads into a configured model of any class count, keeping the predictor rows of the
categories the dataset shares with COCO (by id and name) and re-initialising the others.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline.modeling import MaskRCNN
from pipeline.modeling.label_map import LabelMap


def convert(in_path: str | Path, out_path: str | Path) -> dict:
    state = torch.load(in_path, map_location="cpu", weights_only=True)
    for key in ("model", "state_dict"):
        if isinstance(state, dict) and key in state and isinstance(state[key], dict):
            state = state[key]
    model = MaskRCNN.from_torchvision(state)
    coco = LabelMap.torchvision_coco()
    # Another class count is a fine-tuned model whose categories the file does not say.
    label_map = coco.to_json() if model.model_args["num_classes"] == coco.num_classes else None
    checkpoint = model.checkpoint(source="torchvision", label_map=label_map)
    Path(out_path).parent.mkdir(parents=True, exist_ok=True)
    torch.save(checkpoint, out_path)
    return checkpoint


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("input", help="torchvision maskrcnn_resnet50_fpn state dict (.pth)")
    parser.add_argument("output", help="pipeline checkpoint to write (.pt)")
    args = parser.parse_args(argv)
    checkpoint = convert(args.input, args.output)
    print(
        f"wrote {args.output}: {len(checkpoint['model'])} tensors, "
        f"{checkpoint['model_args']['num_classes']} classes"
        + ("" if "label_map" in checkpoint else " (no label map: not COCO's 91 outputs)")
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
