"""Train Mask R-CNN: ``torchrun [torchrun options] launch/train.py --config FILE [key=value ...]``.

One process (``python launch/train.py ...``), DDP or DeepSpeed (``distributed.strategy``) on
one or many nodes. Exit codes: 0 done, 75 preempted with a checkpoint written (requeue me),
2 bad config, 1 any other error (one line on stderr).
"""

import logging
import sys

from pipeline.config import ConfigError, parse_config_args
from pipeline.data import ManifestError
from pipeline.data.loader import SampleDecodeError
from pipeline.distributed import LaunchError
from pipeline.engine import CheckpointError, NonFiniteLossError, train


def main(argv=None) -> int:
    cfg, _ = parse_config_args(argv, description=__doc__)
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s: %(message)s"
    )
    try:
        return train(cfg)
    except (LaunchError, ManifestError) as error:  # ManifestError: no shards where the config says
        print(f"train: error: {error}", file=sys.stderr)
        return 2
    except ConfigError as error:  # found at run time (train.amp=fp16 without CUDA): still 2
        print(f"train: error: {type(error).__name__}: {error}", file=sys.stderr)
        return 2
    except (CheckpointError, NonFiniteLossError, SampleDecodeError) as error:
        print(f"train: error: {type(error).__name__}: {error}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
