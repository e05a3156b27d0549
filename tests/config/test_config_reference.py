"""docs/config.md, the Markdown reference generated from the schema's docstrings, is current
and complete, and the generator renders what a field says."""

from __future__ import annotations

import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from pipeline.config import Config, all_keys
from pipeline.config.cli import REFERENCE_PATH, REGENERATE_COMMAND, markdown_reference

REPO = Path(__file__).resolve().parents[2]


@dataclass
class _Inner:
    mode: Literal["fast", "exact"] = "exact"
    """How to do it | with a pipe."""


@dataclass
class _Outer:
    steps: list[int] = field(default_factory=lambda: [3, 5])
    """When to
    do it."""
    name: str = ""
    """What it is called."""
    inner: _Inner = field(default_factory=_Inner)
    """The inner part."""


def test_docs_config_md_is_current():
    committed = REPO / REFERENCE_PATH
    assert committed.exists(), f"{REFERENCE_PATH} is missing: run `{REGENERATE_COMMAND}`"
    assert committed.read_text() == markdown_reference(), (
        f"{REFERENCE_PATH} does not match pipeline/config/schema.py: run `{REGENERATE_COMMAND}`"
    )


def test_every_leaf_key_has_one_row():
    text = markdown_reference()
    sections = {key.rsplit(".", 1)[0] for key in all_keys() if "." in key}
    leaves = [key for key in all_keys() if key not in sections and "." in key]
    assert len(leaves) > 50
    for key in leaves:
        assert text.count(f"| `{key}` |") == 1, key
    for name in Config.__dataclass_fields__:
        assert f"## `{name}`" in text, name


def test_rows_carry_type_default_and_docstring():
    text = markdown_reference()
    assert (
        "| `model.backbone.depth` | one of `18`, `34`, `50`, `101` | `50` | ResNet depth. |"
    ) in text
    assert '| `tracking.uri` | str | `""` |' in text
    assert "| `model.channels_last` | bool | `true` |" in text


def test_generator_renders_a_small_schema():
    lines = markdown_reference(_Outer).splitlines()
    assert "| `steps` | list[int] | `[3, 5]` | When to do it. |" in lines
    assert '| `name` | str | `""` | What it is called. |' in lines
    at = lines.index("## `inner`")
    assert lines[at + 2] == "The inner part."
    # A pipe in a docstring is escaped so that it does not split the table row.
    row = "| `inner.mode` | one of `fast`, `exact` | `exact` | How to do it \\| with a pipe. |"
    assert row in lines


def test_cli_prints_the_reference():
    result = subprocess.run(
        [sys.executable, "-m", "pipeline.config", "--markdown"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout == markdown_reference()
