"""Run a checkpoint on your own images:
``python launch/predict.py --checkpoint PATH --images IMAGE|FOLDER|GLOB... --out DIR``.

PATH is a checkpoint file (ours, or converted from torchvision), a DeepSpeed checkpoint
directory, or a training output_dir (its latest checkpoint). A FOLDER gives its image files
(sorted, not recursive); a quoted GLOB is expanded here. DIR receives predictions.json (the
detections scoring at least --score-threshold, in each image's own pixels: COCO boxes
[x, y, w, h], RLE masks, the checkpoint's category ids and names; unreadable images under
"failed") and pictures/<stem>.jpg. An image that cannot be read is one warning; the others go
on. Exit codes: 0 at least one image done, 2 bad checkpoint or option, or no image readable
(one line on stderr).
"""

import argparse
import logging
import sys

from pipeline.evaluation.checkpoints import CheckpointError
from pipeline.evaluation.predict import PredictError, predict_images


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--checkpoint", required=True, metavar="PATH", help="checkpoint")
    parser.add_argument(
        "--images", required=True, nargs="+", metavar="PATH", help="files, folders or globs"
    )
    parser.add_argument("--out", required=True, metavar="DIR", help="output directory")
    parser.add_argument("--score-threshold", type=float, default=0.5, help="(default 0.5)")
    parser.add_argument(
        "--device", default=None, help="cpu, cuda or cuda:N (default cuda when available)"
    )
    parser.add_argument("--batch-size", type=int, default=4, help="images per forward (4)")
    parser.add_argument("--min-size", type=int, help="test resize (default the checkpoint's)")
    parser.add_argument("--max-size", type=int, help="test resize (default the checkpoint's)")
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s: %(message)s"
    )
    try:
        summary = predict_images(
            checkpoint=args.checkpoint,
            inputs=args.images,
            out_dir=args.out,
            score_threshold=args.score_threshold,
            device=args.device,
            batch_size=args.batch_size,
            min_size=args.min_size,
            max_size=args.max_size,
        )
    except (CheckpointError, PredictError) as error:
        print(f"predict: error: {error}", file=sys.stderr)
        return 2
    print(summary.line())
    if summary.images == 0:
        print(
            f"predict: error: none of the images could be read (see {summary.json_path})",
            file=sys.stderr,
        )
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
