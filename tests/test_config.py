"""mkopt.config: typed, nested configs; errors name the file or override, the key and the expected type."""

from dataclasses import dataclass, field
from typing import Any

import pytest

from mkopt.config import load_config
from mkopt.errors import ConfigError


@dataclass
class MK:
    e: int = 3
    probabilities: str = "dirichlet"


@dataclass
class Optim:
    lr: float = 0.1
    milestones: list[int] = field(default_factory=lambda: [30, 60])


@dataclass
class Recipe:
    method: str = "mk"
    mk: MK = field(default_factory=MK)
    optim: Optim = field(default_factory=Optim)
    tasks: list[str] = field(default_factory=list)
    root: str | None = None
    anything: Any = None

    def __post_init__(self) -> None:
        if self.method not in ("mk", "baseline"):
            raise ValueError(f"method={self.method!r}: use mk or baseline")


def write(tmp_path, text, name="run.yaml"):
    path = tmp_path / name
    path.write_text(text)
    return path


def test_nested_file_then_overrides(tmp_path):
    path = write(tmp_path, "mk:\n  e: 4\noptim:\n  lr: 1.0e-2\n")
    config = load_config(Recipe, path, ["optim.lr=1e-1", "optim.milestones=[5]", "tasks=rte", "root=null"])
    assert config.mk == MK(e=4) and config.optim == Optim(lr=0.1, milestones=[5])
    assert config.tasks == ["rte"] and config.root is None  # a single value for a list key: one-element list


@pytest.mark.parametrize("text, message", [
    ("mk:\n  e: three\n", r"run\.yaml: mk\.e expects int: Value 'three'"),
    ("optim: 3\n", r"run\.yaml: optim is a section \(Optim\), not a value"),
    ("mk:\n  ee: 3\n", r"run\.yaml: unknown key 'mk\.ee'; valid keys here: \['e', 'probabilities'\]"),
    ("optim:\n  milestones: [a]\n", r"run\.yaml: optim\.milestones\[0\] expects list\[int\]"),
    ("method: mkk\n", r"run\.yaml: method='mkk': use mk or baseline"),
    ("mk: [e: 3\n", r"run\.yaml is not valid YAML \(line 2, column 1\): expected .,. or .\]."),
    ("- 1\n- 2\n", r"run\.yaml must hold a mapping"),
])  # fmt: skip
def test_file_errors_name_the_file_the_key_and_the_type(tmp_path, text, message):
    with pytest.raises(ConfigError, match=message):
        load_config(Recipe, write(tmp_path, text))


@pytest.mark.parametrize("override, message", [
    ("mk.e=three", r"override 'mk\.e=three': mk\.e expects int"),
    ("optim.lr=fast", r"override 'optim\.lr=fast': optim\.lr expects float"),
    ("optim.learning_rate=1", r"override 'optim\.learning_rate=1': unknown key 'optim\.learning_rate'; valid keys here: \['lr', 'milestones'\]"),
    ("mk.e", r"override 'mk\.e' is not key=value"),
    ("mk.e=true", r"mk\.e expects int: Value 'True' of type 'bool'"),
])  # fmt: skip
def test_override_errors_name_the_override(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(Recipe, None, [override])


def test_missing_file_and_aliases(tmp_path):
    with pytest.raises(ConfigError, match=r"config file .*nope\.yaml not found"):
        load_config(Recipe, tmp_path / "nope.yaml")
    assert load_config(MK, None, ["copies=5"], aliases={"copies": "e"}).e == 5
    with pytest.raises(ConfigError, match="'copies' and 'e' are the same setting"):
        load_config(MK, None, ["copies=5", "e=4"], aliases={"copies": "e"})


def test_config_errors_are_value_errors_for_old_callers():
    assert issubclass(ConfigError, ValueError)


def test_the_finetune_recipe_config_is_typed(tmp_path):
    import importlib.util
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    spec = importlib.util.spec_from_file_location("finetune_recipe", root / "mkopt" / "recipes" / "finetune_rotten_tomatoes.py")
    recipe = importlib.util.module_from_spec(spec)
    sys.modules["finetune_recipe"] = recipe
    spec.loader.exec_module(recipe)
    yaml_path = root / "mkopt" / "recipes" / "configs" / "finetune_rotten_tomatoes.yaml"
    config = recipe.load_config(str(yaml_path), ["steps=40", "seeds=[0]"])
    assert config["steps"] == 40 and config["seeds"] == [0] and config["methods"] == ["baseline", "mk", "adv-mk"]
    with pytest.raises(ConfigError, match=r"override 'steps=many': steps expects int"):
        recipe.load_config(str(yaml_path), ["steps=many"])
    with pytest.raises(ConfigError, match=r"finetune_rotten_tomatoes\.yaml: methods: unknown \['sam'\]"):
        recipe.load_config(str(yaml_path), ["methods=[mk, sam]"])
