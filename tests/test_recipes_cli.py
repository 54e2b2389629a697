"""mkopt ls / cp / run: the recipes ship in the package and run from it, with mkopt's one config system."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from mkopt.cli import main

ROOT = Path(__file__).resolve().parents[1]
TINY_T5 = ["model=tiny-random", "data=generated", "tasks=[rte]", "max_steps=2", "eval_every=2", "generated_examples=8",
           "batch_size=4", "sampler_compile=false", "progress=false"]  # fmt: skip


def test_ls_lists_every_recipe_with_its_configs(capsys):
    assert main(["ls"]) == 0
    out = capsys.readouterr().out
    for name, config in [("t5_glue", "t5_glue/mk"), ("resnet50_imagenet", "resnet50_imagenet/adv_mk"),
                         ("finetune_rotten_tomatoes", "finetune_rotten_tomatoes")]:  # fmt: skip
        assert name in out and config in out


def test_cp_copies_a_recipe_or_a_config_and_never_overwrites(tmp_path, capsys):
    assert main(["cp", "t5_glue", str(tmp_path / "mine")]) == 0
    shipped = ROOT / "mkopt" / "recipes"
    assert (tmp_path / "mine" / "t5_glue.py").read_text() == (shipped / "t5_glue.py").read_text()
    assert (tmp_path / "mine" / "configs" / "t5_glue" / "mk.yaml").is_file()
    assert main(["cp", "t5_glue/mk", str(tmp_path / "one")]) == 0 and (tmp_path / "one" / "mk.yaml").is_file()
    capsys.readouterr()
    assert main(["cp", "t5_glue", str(tmp_path / "mine")]) == 1
    assert "not overwriting" in capsys.readouterr().err
    assert main(["cp", "t5_glue/nope", str(tmp_path / "x")]) == 1
    assert "neither a recipe nor a shipped config" in capsys.readouterr().err


def test_run_a_shipped_config_by_name_with_overrides(tmp_path):
    assert main(["run", "t5_glue", "--config", "t5_glue/mk", *TINY_T5, f"out_dir={tmp_path}"]) == 0
    result = json.loads((tmp_path / "mk_e3" / "seed0" / "rte" / "result.json").read_text())
    assert result["config"]["max_steps"] == 2 and result["config"]["model"] == "tiny-random"


def test_run_errors_are_one_line(capsys):
    assert main(["run", "t5_glue", "--config", "t5_glue/mk", "max_steps=many"]) == 1
    err = capsys.readouterr().err.strip()
    assert err.splitlines() == [err] and "max_steps expects int" in err
    assert main(["run", "t5_glue", "--config", "t5_glue/nope"]) == 1
    assert "shipped: " in capsys.readouterr().err


def test_a_copied_recipe_runs_as_a_script(tmp_path):
    assert main(["cp", "t5_glue", str(tmp_path / "mine")]) == 0
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run([sys.executable, str(tmp_path / "mine" / "t5_glue.py"), "--config",
                           str(tmp_path / "mine" / "configs" / "t5_glue" / "baseline.yaml"), *TINY_T5,
                           f"out_dir={tmp_path / 'out'}"], capture_output=True, text=True, env=env)  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    assert (tmp_path / "out" / "baseline" / "seed0" / "rte" / "result.json").is_file()


@pytest.mark.parametrize("config", ["t5_glue/mk", "t5_glue/baseline"])
def test_shipped_t5_configs_load_through_the_config_system(config):
    from mkopt.config import load_config
    from mkopt.experiments.glue_finetune import GlueRunConfig
    from mkopt.recipes import config_path

    assert load_config(GlueRunConfig, config_path(config)).max_steps > 0
