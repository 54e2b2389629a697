"""The Table-1 harness on generated data: methods, resumable sweep, report."""


import math
import pytest
import torch
import torch.nn.functional as F

from mkopt.experiments import methods
from mkopt.launch import InlineLauncher
from mkopt.experiments.report import table
from mkopt.experiments.runs import RunSpec
from mkopt.experiments.sweep import SweepConfig, load_dataset, run_sweep, select_lr

TINY = dict(dataset="synthetic", archs=("A1",), optimizers=("adam",), lrs={"adam": [1e-3, 1e-2]}, seeds=(0, 1), base_epochs=1, long_epochs=1)


class CountingLauncher(InlineLauncher):
    def __init__(self):
        self.ran = []

    def run(self, fn, items):
        for item, result in super().run(fn, items):
            self.ran.append(item[0].run_id)
            yield item, result


def test_tiny_sweep_produces_a_table_and_resumes_without_recomputing(tmp_path):
    config = SweepConfig(**TINY)
    first = CountingLauncher()
    store = run_sweep(config, tmp_path, first, progress=False)
    methods_count = len(config.methods)
    # lr grid at seed 0 (2 lrs), then seed 1 at the chosen lr; plus the ensemble members that are not
    # baseline-long runs of the grid anyway: seeds 1, 2 at both lrs (seed-0 ensembles), 3..5 at one (seed 1)
    assert len(first.ran) == methods_count * 2 + (methods_count - 1) + 2 * 2 + 3
    members = [r for r in first.ran if "/baseline-long/" in r]
    assert len(members) == len(set(members))  # no run trained twice: the seed-0 ensemble reused baseline-long seed 0
    assert all(r["provenance"]["commit"] for _, r in store.all())
    text = table(store, config, "pytest")
    assert "| MK (e=3) | A1 |" in text and "(n=2, lr" in text
    # the runs' own commits, counted: every grid run at seed 0 and every seed at the selected lr
    read = methods_count * 2 + methods_count  # 2 lrs at seed 0, then seed 1 at the selected lr
    commits = {r["provenance"]["commit"][:7] for _, r in store.all()}
    assert f"runs from commits {commits.pop()} ({read} runs)" in text and not commits
    # a killed sweep: two finished runs lost (as if in flight), plus a stray temp file of a dead writer
    lost = [s for s, _ in store.all()][:2]
    for spec in lost:
        store.path(spec).unlink()
    (store.root / "synthetic" / ".tmp-dead.json").write_text("{half")
    again = CountingLauncher()
    run_sweep(config, tmp_path, again, progress=False)
    assert sorted(again.ran) == sorted(s.run_id for s in lost)


def test_a_finished_store_without_member_weights_rebuilds_without_training(tmp_path):
    """Member weights are not committed: a finished sweep's table is rebuilt from the run files alone."""
    import shutil

    config = SweepConfig(**TINY)
    run_sweep(config, tmp_path, CountingLauncher(), progress=False)
    shutil.rmtree(tmp_path / "models")
    again = CountingLauncher()
    run_sweep(config, tmp_path, again, progress=False)
    assert again.ran == []


def test_run_ids_name_the_protocol_and_the_ascent_step():
    """Results of the older protocol (short-budget ensembles, fan-in-e*m subset, eps=100 Adv-MK) never match."""
    from mkopt.adversarial import DEFAULT_ADVERSARIAL_EPS
    from mkopt.experiments.sweep import PROTOCOL

    config = SweepConfig(**TINY)
    assert config.spec("adv-mk", "A1", "adam", 1e-3, 0).option("eps") == DEFAULT_ADVERSARIAL_EPS
    for method in ("subset", "ensemble", "distilled"):
        assert config.spec(method, "A1", "adam", 1e-3, 0).option("protocol") == PROTOCOL
    assert config.spec("ensemble", "A1", "adam", 1e-3, 0).option("members") == "baseline-long"
    assert SweepConfig(**TINY, budget="short").spec("ensemble", "A1", "adam", 1e-3, 0).option("members") == "baseline"
    assert config.spec("baseline", "A1", "adam", 1e-3, 0).options == ()  # unchanged ids where nothing changed


def test_a_diverged_mk_run_is_kept_not_raised():
    from mkopt.experiments import methods
    from mkopt.experiments.runs import RunSpec
    from mkopt.experiments.sweep import load_dataset

    fit, val, test, inputs, classes = load_dataset("synthetic")
    spec = RunSpec("mk", "A1", "sgd", 1e8, 0, 2, "synthetic")
    result = methods.train(methods.build(spec, inputs, classes, None), spec, fit, val, test)
    assert result["deployed_parameters"] > 0 and not math.isfinite(result["curves"]["train_loss"][-1])  # kept, diverged


def test_ensemble_is_its_baseline_long_members_and_predicts_their_mean(tmp_path):
    """Section 5.2: ENSEMBLE = three BASELINE-LONG runs with their own seeds (init and batch order); the
    seed-0 ensemble is made of the baseline-long runs of seeds 0..2, loaded from their saved weights."""
    from mkopt.experiments.sweep import execute, trained_ensemble

    config = SweepConfig(**TINY)
    ensemble_spec = config.spec("ensemble", "A1", "adam", 1e-2, 0)
    members = config.members(ensemble_spec)
    assert [(m.method, m.seed, m.epochs) for m in members] == [("baseline-long", k, config.long_epochs) for k in range(3)]
    assert members[0] == config.spec("baseline-long", "A1", "adam", 1e-2, 0)  # the grid's own run
    assert config.epochs("ensemble") == config.epochs("distilled") == config.epochs("subset") == config.long_epochs
    assert config.epochs("baseline") == config.base_epochs
    short = SweepConfig(**TINY, budget="short")
    assert short.epochs("ensemble") == short.epochs("subset") == short.base_epochs and short.member_method == "baseline"

    fit, val, test, inputs, classes = load_dataset("synthetic")
    trained = []
    for spec in members:
        execute((spec, str(tmp_path), None))  # trains and keeps the weights
        torch.manual_seed(spec.seed)  # independently: the same spec trained by hand gives the same weights
        plain = methods.Plain(spec, inputs, classes)
        methods.train(plain, spec, fit, val, test)
        trained.append(plain)
    ensemble = trained_ensemble(members, tmp_path)
    first_layer = [t.model[1].weight for t in trained]
    assert not torch.equal(first_layer[0], first_layer[1])  # different seeds: different members
    for k, t in enumerate(trained):
        torch.testing.assert_close(ensemble.params["1.weight"][k], t.model[1].weight)
    mean_probs = torch.stack([t.probabilities(test.x) for t in trained]).mean(0)
    torch.testing.assert_close(ensemble.probabilities(test.x), mean_probs, rtol=1e-5, atol=1e-6)
    with pytest.raises(FileNotFoundError, match="weights of ensemble member"):
        trained_ensemble(config.members(config.spec("ensemble", "A1", "adam", 1e-3, 0)), tmp_path)


def test_distillation_loss_equals_hand_computation():
    student = torch.tensor([[1.0, -0.5, 0.2], [0.3, 0.3, 2.0]])
    teacher = torch.tensor([[0.7, 0.2, 0.1], [0.1, 0.1, 0.8]])
    y = torch.tensor([0, 2])
    t, a = 3.0, 0.8
    p_s = (student / t).softmax(-1)
    kl = (teacher * (teacher.log() - p_s.log())).sum(-1).mean()
    ce = -(student.log_softmax(-1)[torch.arange(2), y]).mean()
    expected = a * t * t * kl + (1 - a) * ce
    torch.testing.assert_close(methods.distillation_loss(student, teacher, y, temperature=t, alpha=a), expected)


def test_subset_trains_and_its_final_model_is_the_plain_architecture():
    fit, val, test, inputs, classes = load_dataset("synthetic")
    spec = RunSpec("subset", "A2", "adam", 1e-2, 0, 1, "synthetic", batch=100)
    subset = methods.Subset(spec, inputs, classes)
    assert subset.hidden[0].out_features == 3 * 200 and subset.hidden[1].in_features == 200
    before = F.cross_entropy(subset.forward(fit.x, subset.select()), fit.y).item()
    for i in range(5):
        subset.step(fit.x[i * 100 : (i + 1) * 100], fit.y[i * 100 : (i + 1) * 100])
    after = F.cross_entropy(subset.forward(fit.x, subset.select()), fit.y).item()
    assert after < before
    final = subset.final_model()
    assert [m.out_features for m in final if isinstance(m, torch.nn.Linear)] == [200, 100, classes]
    with torch.no_grad():
        torch.testing.assert_close(final(test.x).softmax(-1), subset.probabilities(test.x))


def test_mk_methods_report_the_deployed_size_sharpness_and_the_ascent():
    fit, val, test, inputs, classes = load_dataset("synthetic")
    plain = methods.build(RunSpec("baseline", "A1", "sgd", 0.1, 0, 1, "synthetic"), inputs, classes)
    for method in ("mk", "adv-mk"):
        spec = RunSpec(method, "A1", "sgd", 0.1, 0, 1, "synthetic", batch=100, options=(("eps", 1e4),))
        trainee = methods.build(spec, inputs, classes)
        result = methods.train(trainee, spec, fit, val, test)
        assert result["deployed_parameters"] == plain.parameters_deployed()
        assert 0 <= result["test_accuracy"] <= 1 and len(result["curves"]["test_loss"]) == 1
        trace = result["sharpness"]["trace"]
        assert [t["step"] for t in trace] == [0.0, 9.0]  # step 0 and the end (10 steps < SHARPNESS_EVERY)
        assert trace[0]["sharpness"] == pytest.approx(0.0, abs=1e-6)  # replicated copies: theta_p = mean
        assert trace[-1]["sharpness"] != 0.0
        if method == "adv-mk":
            assert trainee.opt.adversarial_eps == 1e4
            ascent = result["adversarial"]["trace"]
            assert [t["step"] for t in ascent] == [0.0]
            assert all(0 <= t["u_mean"] <= 1 and 0 <= t["p_entropy"] <= 1 for t in ascent)
        else:
            assert "adversarial" not in result


def test_table1_ablation_flags_extend_the_paper_grid_and_reuse_its_runs():
    import argparse

    from mkopt.experiments import table1
    from mkopt.experiments.methods import LR_GRID

    parser = argparse.ArgumentParser()
    table1.add_arguments(parser)
    config = table1.config_for(parser.parse_args("--full --methods mk --optimizers sgd --archs A3 --lr-steps -4 8".split()))
    assert config.archs == ("A3",) and config.optimizers == ("sgd",) and config.methods == ("mk",)
    assert config.lrs["sgd"][:10] == LR_GRID["sgd"]  # bit-equal floats: same run ids, finished runs are skipped
    assert config.lrs["sgd"][10:] == [0.025 * 1.5**i for i in (6, 7, 8)]
    quick = table1.config_for(parser.parse_args("--lr-steps -1 1".split()))  # allowed without --full
    assert quick.lrs["adam"] == [0.001 * 1.5**i for i in (-1, 0, 1)] and quick.seeds == (0, 1)
    default = table1.config_for(parser.parse_args([]))
    assert default.lrs["sgd"] == [LR_GRID["sgd"][i] for i in (4, 6, 8)]  # three points of the paper grid (i = 0, 2, 4), bit-equal
    with pytest.raises(SystemExit, match="LO must be"):
        table1.config_for(parser.parse_args("--full --lr-steps 3 1".split()))


def test_quick_job_trains_small_data_for_enough_steps_and_warns_at_grid_edges_and_near_chance(tmp_path):
    from mkopt.experiments import table1
    from mkopt.experiments.report import protocol_warnings

    config = table1.with_min_steps(SweepConfig(**{**TINY, "base_epochs": 2, "long_epochs": 4}), train_size=1000, min_steps=table1.QUICK_MIN_STEPS)
    steps_per_epoch = 1000 // config.batch
    assert config.base_epochs * steps_per_epoch >= table1.QUICK_MIN_STEPS > (config.base_epochs - 1) * steps_per_epoch
    assert config.long_epochs == 2 * config.base_epochs  # MK's longer budget kept
    big = table1.with_min_steps(SweepConfig(**TINY), train_size=10**6, min_steps=table1.QUICK_MIN_STEPS)
    assert (big.base_epochs, big.long_epochs) == (1, 1)  # enough steps already: unchanged

    from mkopt.experiments.runs import ResultStore

    config = SweepConfig(**{**TINY, "methods": ("baseline",), "seeds": (0,), "lrs": {"adam": [1e-3, 2e-3, 4e-3]}})
    store = ResultStore(tmp_path)

    def results(val_by_lr, test_accuracy):
        for lr, val in zip(config.lrs["adam"], val_by_lr):
            store.write(config.spec("baseline", "A1", "adam", lr, 0), {"val_accuracy": val, "test_accuracy": test_accuracy})
        return protocol_warnings(store, config, classes=4)  # chance 25%, "near" below 32.5%

    assert results([0.5, 0.7, 0.6], 0.7) == []  # inside the grid, well above chance
    (edge,) = results([0.5, 0.6, 0.7], 0.7)
    assert "baseline A1 adam: the selected lr 0.004 is the top of its grid [0.001, 0.004]" in edge
    (low,) = results([0.7, 0.6, 0.5], 0.7)
    assert "is the bottom of its grid" in low
    (chance,) = results([0.3, 0.31, 0.3], 0.3)
    assert "test accuracy 30.0% is near chance (25.0%)" in chance
