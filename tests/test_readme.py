"""The README's commands work as written: what they evaluate is what they make."""

import re
import shlex
from pathlib import Path

from pipeline.config import load_config

REPO = Path(__file__).resolve().parents[1]


def readme_commands() -> list[list[str]]:
    """Every command of the README's bash blocks, continuation lines joined, as words."""
    blocks = re.findall(r"```bash\n(.*?)```", (REPO / "README.md").read_text(), re.S)
    text = "\n".join(blocks).replace("\\\n", " ")
    lines = (line.split("#", 1)[0].strip() for line in text.splitlines())
    return [shlex.split(line) for line in lines if line]


def option(words: list[str], name: str) -> str | None:
    return words[words.index(name) + 1] if name in words else None


def test_every_evaluated_checkpoint_is_a_training_run_of_the_readme_with_its_class_count():
    # The README evaluated pretrained/converted.pt, which nothing made, with configs/base.yaml:
    # converted torchvision COCO weights have 91 classes, the shapes 4, and it would exit 2.
    runs = {}  # output_dir -> num_classes, of every training command
    converted = set()
    for words in readme_commands():
        script = next((w for w in words if w.startswith("launch/")), None)
        if script == "launch/train.py":
            overrides = [w for w in words if "=" in w and not w.startswith("-")]
            cfg = load_config(REPO / option(words, "--config"), overrides)
            runs[cfg.train.output_dir] = cfg.model.num_classes
        elif script == "launch/convert_torchvision.py":
            converted.add(words[-1])
    evaluated = 0
    for words in readme_commands():
        if "launch/evaluate.py" not in words:
            continue
        target = option(words, "--checkpoint") or option(words, "--watch")
        assert target not in converted, f"{target}: torchvision's COCO classes fit no shards"
        assert target in runs, f"README evaluates {target}, which no README command makes"
        if option(words, "--config"):
            cfg = load_config(REPO / option(words, "--config"))
            assert cfg.model.num_classes == runs[target], f"{target}: class counts differ"
        evaluated += 1
    assert evaluated >= 2
