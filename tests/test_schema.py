"""Strict configs (`mllm.schema`): errors name the key and what is allowed, YAML round-trips,
overrides apply with precedence defaults < YAML < overrides, and nothing mutates its input.

Checked on small dataclasses written here and on the real demo recipe (`configs/recipes/demo.yaml`).
"""

from __future__ import annotations

import copy
import dataclasses
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import pytest
import yaml

from mllm.schema import ConfigError, apply_overrides, dump_yaml, from_dict, load_yaml, to_dict
from mllm.train.config import RunConfig, StageSpec, load_run_config

DEMO = Path(__file__).resolve().parents[1] / "configs" / "recipes" / "demo.yaml"


@dataclass
class Inner:
    width: int = 8
    act: Literal["gelu", "relu"] = "gelu"
    scale: float | None = None


@dataclass
class Outer:
    name: str = "x"
    inner: Inner = field(default_factory=Inner)
    items: list[Inner] = field(default_factory=list)
    tags: list[str] = field(default_factory=list)


@pytest.fixture
def demo() -> dict:
    return load_yaml(DEMO)


# ---------------------------------------------------------------------------------------- errors


def test_unknown_key_names_the_dotted_key_and_the_valid_siblings(demo):
    data = copy.deepcopy(demo)
    data["model"]["vision"]["nmae"] = "typo"
    with pytest.raises(ConfigError) as e:
        from_dict(RunConfig, data)
    message = str(e.value)
    assert "'model.vision.nmae'" in message
    siblings = [f.name for f in dataclasses.fields(type(from_dict(RunConfig, demo).model.vision))]
    assert all(name in message for name in siblings)
    # Unknown keys inside list items name the item.
    with pytest.raises(ConfigError, match=r"'stages\[1\]\.learning_rate'.*\blr\b"):
        from_dict(RunConfig, apply_overrides(demo, ["stages.1.learning_rate=1"]))
    with pytest.raises(ConfigError, match=r"unknown config key 'colour'; valid keys: inner, items, name, tags"):
        from_dict(Outer, {"colour": "red"})


@pytest.mark.parametrize(
    ("data", "pattern"),
    [
        ({"inner": {"width": "8"}}, r"^inner\.width: expected an integer, got str '8'$"),
        ({"inner": {"width": True}}, r"^inner\.width: expected an integer, got bool True$"),
        ({"inner": {"width": 1.5}}, r"^inner\.width: expected an integer, got float 1\.5$"),
        ({"inner": {"scale": "big"}}, r"^inner\.scale: expected a number, got str 'big'$"),
        ({"inner": {"act": "silu"}}, r"^inner\.act: 'silu' is not allowed; choose one of 'gelu', 'relu'$"),
        ({"items": [{}, {"act": "tanh"}]}, r"^items\[1\]\.act: 'tanh' is not allowed; choose one of 'gelu', 'relu'$"),
        ({"inner": 3}, r"^inner: expected a mapping for Inner, got int$"),
        ({"tags": "a"}, r"^tags: expected a list, got str 'a'$"),
    ],
)
def test_wrong_type_and_bad_literal_name_the_key_and_the_allowed_values(data, pattern):
    with pytest.raises(ConfigError, match=pattern):
        from_dict(Outer, data)


def test_bad_literal_in_the_demo_recipe(demo):
    with pytest.raises(ConfigError, match=r"run\.dtype: 'fp16' is not allowed; choose one of 'fp32', 'bf16'"):
        load_run_config(DEMO, ["run.dtype=fp16"])
    with pytest.raises(ConfigError, match=r"stages\[2\]\.objective: 'dpo' .* 'lm', 'contrastive'"):
        load_run_config(DEMO, ["stages.2.objective=dpo"])
    with pytest.raises(ConfigError, match=r"stages\[0\]\.steps: expected an integer, got str 'ten'"):
        load_run_config(DEMO, ["stages.0.steps=ten"])


def test_validation_errors_say_where(demo):
    with pytest.raises(ConfigError, match=r"^.*demo\.yaml: stages\[1\]: stage 'align' has no data sources$"):
        load_run_config(DEMO, ["stages.1.data=[]"])
    with pytest.raises(ConfigError, match="stage names must be unique"):
        load_run_config(DEMO, ["stages.1.name=clip"])


# ---------------------------------------------------------------------------------------- round trip


def test_demo_recipe_loads_with_its_values(demo):
    cfg = load_run_config(DEMO)
    assert isinstance(cfg, RunConfig) and all(isinstance(s, StageSpec) for s in cfg.stages)
    assert [s.name for s in cfg.stages] == [s["name"] for s in demo["stages"]] == ["clip", "align", "instruct"]
    assert cfg.stages[0].objective == "contrastive" and cfg.stages[2].objective == "lm"
    assert cfg.stages[1].trainable[0].params == ["model.multi_modal_projector.*"]
    assert cfg.model.vision.model_cfg == demo["model"]["vision"]["model_cfg"]
    assert cfg.model.text.config["hidden_size"] == 256


def test_yaml_round_trip(demo, tmp_path):
    cfg = load_run_config(DEMO)
    text = yaml.safe_dump(to_dict(cfg), sort_keys=False)
    again = from_dict(RunConfig, yaml.safe_load(text))
    assert again == cfg
    assert to_dict(again) == to_dict(cfg)
    # dump_yaml writes the same resolved config, and load_run_config reads it back equal.
    dump_yaml(cfg, tmp_path / "resolved.yaml")
    assert (tmp_path / "resolved.yaml").read_text() == text
    assert load_run_config(tmp_path / "resolved.yaml") == cfg
    # Non-default values survive too (the round trip is not just defaults in, defaults out).
    changed = load_run_config(DEMO, ["stages.1.lr=2e-5", "run.dtype=bf16", "eval.source=null"])
    assert from_dict(RunConfig, yaml.safe_load(dump_yaml(changed))) == changed != cfg


# ---------------------------------------------------------------------------------------- overrides


def test_overrides_index_lists_and_parse_values(demo):
    cfg = load_run_config(DEMO, [
        "stages.1.lr=2e-5",  # YAML 1.1 would read "2e-5" as a string
        "stages.-1.steps=7",
        "stages.1.trainable.0.lr=3.0e-4",
        "stages.2.betas=[0.9, 0.95]",
        "model.vision.select_strategy=full",
        "run.output_dir=runs/x",
    ])
    assert cfg.stages[1].lr == 2e-5 and isinstance(cfg.stages[1].lr, float)
    assert cfg.stages[2].steps == 7
    assert cfg.stages[1].trainable[0].lr == 3e-4
    assert cfg.stages[2].betas == [0.9, 0.95]
    assert cfg.model.vision.select_strategy == "full"
    assert cfg.run.output_dir == "runs/x"
    # Everything not overridden keeps its YAML value.
    base = load_run_config(DEMO)
    assert cfg.stages[0] == base.stages[0] and cfg.data == base.data
    assert cfg.stages[1].lr != base.stages[1].lr


def test_precedence_defaults_then_yaml_then_overrides(demo):
    assert "max_bad_fraction" not in demo["data"] and demo["data"]["max_length"] == 128
    defaults = RunConfig().data
    cfg = load_run_config(DEMO)
    assert cfg.data.max_bad_fraction == defaults.max_bad_fraction == 0.05  # default (not in the YAML)
    assert cfg.data.max_length == 128 != defaults.max_length  # YAML beats default
    assert cfg.run.dtype == "fp32"
    cfg = load_run_config(DEMO, ["data.max_length=64", "data.max_bad_fraction=0.5", "data.max_length=96"])
    assert cfg.data.max_length == 96  # override beats YAML; later overrides beat earlier ones
    assert cfg.data.max_bad_fraction == 0.5  # override beats default


def test_bad_overrides_are_rejected(demo):
    with pytest.raises(ConfigError, match=r"'stages\.5'.*'5' is not an index of a list of 3"):
        apply_overrides(demo, ["stages.5.lr=1"])
    with pytest.raises(ConfigError, match="must look like key.subkey=value"):
        apply_overrides(demo, ["stages.1.lr"])
    with pytest.raises(ConfigError, match=r"'run\.seed' is a value, not a section"):
        apply_overrides(demo, ["run.seed.x=1"])
    with pytest.raises(ConfigError, match=r"unknown config key 'run\.sed'"):
        load_run_config(DEMO, ["run.sed=1"])


def test_loading_never_mutates_its_input(demo):
    before = copy.deepcopy(demo)
    out = apply_overrides(demo, ["stages.1.lr=2e-5", "data.max_length=64", "model.vision.new_section.x=1"])
    assert demo == before
    assert out["stages"][1]["lr"] == 2e-5 and out["model"]["vision"]["new_section"] == {"x": 1}
    cfg = from_dict(RunConfig, demo)
    assert demo == before
    # The config does not share mutable state with the input either.
    cfg.model.vision.model_cfg["embed_dim"] = -1
    cfg.stages[1].trainable[0].params.append("extra.*")
    assert demo == before

    nested = {"inner": {"width": 3}, "items": [{"width": 1}], "tags": ["a"]}
    snapshot = copy.deepcopy(nested)
    obj = from_dict(Outer, nested)
    obj.tags.append("b")
    obj.items[0].width = 99
    assert nested == snapshot


def test_error_messages_from_files_name_the_file(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("run:\n  dtyp: fp32\nstages: []\n")
    with pytest.raises(ConfigError, match=re.escape(f"{path}: unknown config key 'run.dtyp'")):
        load_run_config(path)
    with pytest.raises(ConfigError, match="config file not found"):
        load_run_config(tmp_path / "missing.yaml")
