"""The command line's text: help without reStructuredText markup; no stray notices from mkopt's own code."""

import logging
import warnings

import pytest
import torch

from mkopt.cli import main


@pytest.mark.parametrize("command", ["table1", "demo"])
def test_help_text_has_no_raw_double_backticks(command, capsys):
    with pytest.raises(SystemExit) as exit_:
        main([command, "--help"])
    assert exit_.value.code == 0
    text = capsys.readouterr().out
    assert "``" not in text and f"usage: mkopt {command}" in text


def test_table1_help_states_the_observed_runtime(capsys):
    with pytest.raises(SystemExit):
        main(["table1", "--help"])
    assert "144 runs, 7.5 min wall with --workers 2" in " ".join(capsys.readouterr().out.split())


def test_torchs_cuda_home_notice_is_dropped_and_nothing_else(caplog):
    import mkopt.compiled  # noqa: F401  (installs the filter)

    logger = logging.getLogger("torch.utils.cpp_extension")
    with caplog.at_level(logging.WARNING, logger="torch.utils.cpp_extension"):
        logger.warning("No CUDA runtime is found, using CUDA_HOME='/usr/local'")
        logger.warning("another notice")
    assert [r.getMessage() for r in caplog.records] == ["another notice"]


def test_training_steps_of_the_table1_methods_warn_nothing():
    from mkopt.experiments import methods
    from mkopt.experiments.runs import RunSpec

    x, y = torch.randn(16, 6), torch.randint(0, 3, (16,))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # torch's "Converting a tensor with requires_grad=True to a scalar" included
        for method in ("baseline", "mk", "subset"):  # an ensemble is evaluated from trained members, never stepped
            spec = RunSpec(method, "A1", "adam", 1e-3, 0, 1, "synthetic", batch=16)
            trainee = methods.build(spec, 6, 3, None)
            assert isinstance(trainee.step(x, y), float)


def test_table1_settings_go_through_the_config_system(tmp_path, capsys):
    import json

    args = ["table1", "--dataset", "synthetic", "--methods", "baseline", "--archs", "A1", "--optimizers", "adam",
            "--workers", "1", "--runs", str(tmp_path), "--set", "seeds=[0]", "base_epochs=1", "lrs.adam=[1e-3]"]  # fmt: skip
    assert main(args) == 0
    [result] = list(tmp_path.rglob("baseline/*.json"))
    assert json.loads(result.read_text())["spec"]["epochs"] == 1 and (tmp_path / "table1.md").is_file()
    capsys.readouterr()
    assert main([*args[:-3], "base_epoch=1"]) == 1
    assert "unknown key 'base_epoch'" in capsys.readouterr().err
