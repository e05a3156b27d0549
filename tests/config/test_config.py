import dataclasses
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from pipeline.config import (
    Config,
    ConfigError,
    all_keys,
    field_docs,
    load_config,
    save_config,
)

REPO = Path(__file__).resolve().parents[2]


def write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def test_defaults_are_a_complete_config():
    cfg = load_config()
    assert cfg == Config()
    assert cfg.model.backbone.depth == 50


def test_inheritance_merges_nested_sections_and_replaces_lists(tmp_path):
    write(
        tmp_path / "a.yaml", "train:\n  lr: 0.1\n  lr_steps: [1, 2, 3]\nmodel:\n  num_classes: 9\n"
    )
    write(tmp_path / "b.yaml", "_base_: a.yaml\ntrain:\n  lr_steps: [5]\n")
    child = write(tmp_path / "c.yaml", "_base_: b.yaml\nmodel:\n  backbone:\n    depth: 18\n")
    cfg = load_config(child)
    assert cfg.train.lr == 0.1  # from the grandparent
    assert cfg.train.lr_steps == [5]  # the child's list replaces, not appends
    assert cfg.model.num_classes == 9
    assert cfg.model.backbone.depth == 18
    assert cfg.model.backbone.fpn_channels == 256  # untouched default


def test_several_bases_apply_in_order(tmp_path):
    write(tmp_path / "one.yaml", "train:\n  lr: 0.1\n  momentum: 0.5\n")
    write(tmp_path / "two.yaml", "train:\n  lr: 0.2\n")
    child = write(tmp_path / "child.yaml", "_base_: [one.yaml, two.yaml]\n")
    cfg = load_config(child)
    assert (cfg.train.lr, cfg.train.momentum) == (0.2, 0.5)


def test_overrides_are_parsed_by_field_type(tmp_path):
    child = write(tmp_path / "c.yaml", "train:\n  lr: 0.1\n")
    cfg = load_config(
        child,
        [
            "train.lr=0.02",
            "model.backbone.depth=18",
            "train.lr_steps=[10,20]",
            "train.amp=bf16",
            "tracking.enabled=false",
            "model.rpn.objectness_loss=focal",
            "tracking.run_name=123",
            "train.momentum=1",
        ],
    )
    assert cfg.train.lr == 0.02
    assert cfg.model.backbone.depth == 18
    assert cfg.train.lr_steps == [10, 20]
    assert cfg.train.amp == "bf16"
    assert cfg.tracking.enabled is False
    assert cfg.model.rpn.objectness_loss == "focal"
    assert cfg.tracking.run_name == "123"  # a string field keeps digits as text
    assert cfg.train.momentum == 1.0 and isinstance(cfg.train.momentum, float)


def test_unknown_key_in_file_names_file_and_closest_key(tmp_path):
    bad = write(tmp_path / "bad.yaml", "train:\n  lrr: 0.1\n")
    with pytest.raises(ConfigError) as err:
        load_config(bad)
    message = str(err.value)
    assert "\n" not in message
    assert str(bad) in message
    assert "'train.lrr'" in message
    assert "did you mean 'train.lr'" in message


def test_unknown_key_in_a_base_names_the_base(tmp_path):
    base = write(tmp_path / "base.yaml", "modle:\n  num_classes: 3\n")
    child = write(tmp_path / "child.yaml", "_base_: base.yaml\n")
    with pytest.raises(
        ConfigError, match=r"base\.yaml: unknown key 'modle' \(did you mean 'model'\?\)"
    ):
        load_config(child)
    assert base.exists()


def test_unknown_override_names_the_command_line():
    with pytest.raises(
        ConfigError,
        match=r"command line: unknown key 'model.backbone.dept'.*'model.backbone.depth'",
    ):
        load_config(None, ["model.backbone.dept=18"])


def test_unknown_leaf_under_known_section_suggests_a_sibling():
    with pytest.raises(ConfigError, match=r"did you mean 'train.warmup_iters'"):
        load_config(None, ["train.warmup=5"])


def test_bad_type_names_key_file_and_expected_type(tmp_path):
    bad = write(tmp_path / "bad.yaml", "train:\n  max_steps: lots\n")
    with pytest.raises(ConfigError) as err:
        load_config(bad)
    message = str(err.value)
    assert message.startswith(str(bad))
    assert "train.max_steps expects an integer, got 'lots'" in message


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        ("train.lr=abc", "train.lr expects a number"),
        ("tracking.enabled=3", "tracking.enabled expects true or false"),
        ("train.amp=on", "train.amp expects one of 'off', 'bf16', 'fp16'"),
        ("train.max_steps=1.5", "train.max_steps expects an integer"),
        ("model.backbone.depth=42", "model.backbone.depth expects one of 18, 34, 50, 101"),
        ("train.lr_steps=5", "train.lr_steps expects a list"),
        ("train=3", "train expects a mapping"),
        ("model.rpn.box_loss=l2", "model.rpn.box_loss expects one of 'smooth_l1', 'l1'"),
    ],
)
def test_bad_override_types(override, expected):
    with pytest.raises(ConfigError, match="command line: " + expected.replace(".", r"\.")):
        load_config(None, [override])


def test_malformed_override_and_yaml(tmp_path):
    with pytest.raises(ConfigError, match="not of the form key=value"):
        load_config(None, ["train.lr"])
    broken = write(tmp_path / "broken.yaml", "train: [unclosed\n")
    with pytest.raises(ConfigError, match=r"broken\.yaml: not valid YAML \(line"):
        load_config(broken)
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "missing.yaml")


def test_cyclic_base_is_an_error(tmp_path):
    write(tmp_path / "a.yaml", "_base_: b.yaml\n")
    write(tmp_path / "b.yaml", "_base_: a.yaml\n")
    with pytest.raises(ConfigError, match="inherits from itself"):
        load_config(tmp_path / "a.yaml")


def test_write_and_reload_round_trip(tmp_path):
    cfg = load_config(
        REPO / "configs" / "shapes_r18_cpu.yaml",
        ["train.lr=0.005", "model.roi_heads.classifier_loss=focal", "tracking.uri=http://x"],
    )
    path = save_config(cfg, tmp_path / "out" / "config.yaml")
    again = load_config(path)
    assert again == cfg
    assert yaml.safe_load(path.read_text())["train"]["lr"] == 0.005


@pytest.mark.parametrize("path", sorted((REPO / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_configs_load(path):
    assert isinstance(load_config(path), Config)


def test_every_field_has_a_docstring():
    def walk(cls):
        docs = field_docs(cls)
        for f in dataclasses.fields(cls):
            assert docs.get(f.name), f"{cls.__name__}.{f.name} has no docstring"
            if dataclasses.is_dataclass(f.type) or isinstance(f.default_factory, type):
                sub = f.default_factory() if f.default_factory is not dataclasses.MISSING else None
                if dataclasses.is_dataclass(sub):
                    walk(type(sub))

    walk(Config)
    assert "model.rpn.objectness_loss" in all_keys()


def run_cli(*args):
    return subprocess.run(
        [sys.executable, "-m", "pipeline.config", *args],
        capture_output=True,
        text=True,
        cwd=REPO,
    )


def test_cli_prints_resolved_config():
    result = run_cli("configs/shapes_r18_cpu.yaml", "train.lr=0.01")
    assert result.returncode == 0, result.stderr
    printed = yaml.safe_load(result.stdout)
    assert printed["train"]["lr"] == 0.01
    assert printed["model"]["backbone"]["depth"] == 18


def test_cli_error_is_one_line():
    result = run_cli("configs/shapes_r18_cpu.yaml", "train.lrr=0.01")
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert lines == [
        "config error: command line: unknown key 'train.lrr' (did you mean 'train.lr'?)"
    ]
    assert result.stdout == ""


def test_entry_point_parsing_accepts_positional_or_flag():
    from pipeline.config import parse_config_args

    path = str(REPO / "configs" / "shapes_r18_cpu.yaml")
    by_position, _ = parse_config_args([path, "train.lr=0.5"])
    by_flag, _ = parse_config_args(["--config", path, "train.lr=0.5"])
    only_overrides, _ = parse_config_args(["train.lr=0.5"])
    assert by_position == by_flag
    assert by_flag.train.lr == 0.5 and by_flag.model.backbone.depth == 18
    assert only_overrides.model.backbone.depth == 50
    with pytest.raises(SystemExit) as exit_info:
        parse_config_args(["--config", path, "train.nope=1"])
    assert exit_info.value.code == 2


def test_a_choice_that_yaml_reads_as_a_boolean_is_taken_as_written(tmp_path):
    # YAML 1.1 reads `off` as False; train.amp's choice is the word "off".
    assert load_config(None, ["train.amp=off"]).train.amp == "off"
    path = tmp_path / "amp.yaml"
    path.write_text("train:\n  amp: off\n")
    assert load_config(path).train.amp == "off"
    with pytest.raises(ConfigError, match=r"train\.amp expects one of"):
        load_config(None, ["train.amp=on"])  # no choice is such a word: still refused


@pytest.mark.parametrize("text", ["1e-3", "1E-3", "1.0e12", "+2e-4", "-1e-3", ".5e-2", "5.e-1"])
def test_a_number_in_e_notation_is_a_float(tmp_path, text):
    # YAML 1.1 (PyYAML) reads `1e-3` and `1.0e12` as strings; people write learning rates so.
    assert load_config(None, [f"train.lr={text}"]).train.lr == float(text)
    path = write(tmp_path / "lr.yaml", f"train:\n  lr: {text}\n")
    assert load_config(path).train.lr == float(text)
    listed = write(tmp_path / "list.yaml", f"model:\n  anchors:\n    aspect_ratios: [{text}, 1]\n")
    assert load_config(listed).model.anchors.aspect_ratios == [float(text), 1.0]


def test_e_notation_stays_text_where_a_string_is_expected():
    # Only float fields read it as a number: a run name "1e3" is kept as written.
    assert load_config(None, ["tracking.run_name=1e3"]).tracking.run_name == "1e3"
    with pytest.raises(ConfigError, match=r"train\.max_steps expects an integer, got '1e3'"):
        load_config(None, ["train.max_steps=1e3"])


@pytest.mark.parametrize("text", ["1e", "e-3", "1e-3x", "inf", "nan", "1_0e2", "1e-3e2"])
def test_text_that_only_looks_numeric_is_still_refused(text):
    with pytest.raises(ConfigError, match=r"train\.lr expects a number"):
        load_config(None, [f"train.lr={text}"])


@pytest.mark.parametrize("value", ["0", "-5"])
def test_max_steps_below_one_is_refused_at_load_time(tmp_path, value):
    # 0 used to pass and the run died later in a FileNotFoundError for checkpoints/FINISHED.
    expected = rf"^command line: train\.max_steps must be >= 1, got {value}$"
    with pytest.raises(ConfigError, match=expected):
        load_config(None, [f"train.max_steps={value}"])
    path = write(tmp_path / "steps.yaml", f"train:\n  max_steps: {value}\n")
    with pytest.raises(ConfigError, match=rf"^{path}: train\.max_steps must be >= 1"):
        load_config(path)


@pytest.mark.parametrize(
    "key",
    ["train.batch_size", "train.grad_accum_steps", "train.reference_batch_size", "eval.batch_size"],
)
def test_a_batch_size_below_one_is_refused_at_load_time(key):
    with pytest.raises(ConfigError, match=rf"^command line: {key} must be >= 1, got 0$"):
        load_config(None, [f"{key}=0"])


def test_cli_keys_and_markdown_follow_a_file_and_are_in_the_help():
    # `FILE --keys` used to fail with "unrecognized arguments", and --help named neither flag.
    result = run_cli("configs/shapes_r18_cpu.yaml", "--keys", "train.lr=1e-3")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert any(line.startswith("model.backbone.depth = 18  # ResNet depth.") for line in lines)
    assert any(line.startswith("train.lr = 0.001  # ") for line in lines)
    defaults = run_cli("--keys")
    assert defaults.returncode == 0, defaults.stderr
    assert "model.backbone.depth = 50  # ResNet depth." in defaults.stdout.splitlines()
    helped = run_cli("--help")
    assert helped.returncode == 0
    assert "--keys" in helped.stdout and "--markdown" in helped.stdout
    assert helped.stdout.startswith("usage: python -m pipeline.config")
    assert run_cli("--markdown").stdout.startswith("# Configuration reference")
    mixed = run_cli("configs/shapes_r18_cpu.yaml", "--markdown")
    assert mixed.returncode == 2
    assert (
        mixed.stderr.strip()
        .splitlines()[-1]
        .endswith("--markdown documents the schema's defaults: give it no config file or overrides")
    )


def test_overrides_may_follow_an_entry_points_own_options():
    # `evaluate.py FILE --out DIR train.lr=0.5` left the override "unrecognized".
    from pipeline.config.cli import build_parser, parse_config_args

    parser = build_parser("")
    parser.add_argument("--out")
    path = str(REPO / "configs" / "shapes_r18_cpu.yaml")
    cfg, args = parse_config_args([path, "--out", "d", "train.lr=0.5"], parser=parser)
    assert (cfg.train.lr, cfg.model.backbone.depth, args.out) == (0.5, 18, "d")
