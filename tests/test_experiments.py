"""The Table-1 harness on generated data: methods, resumable sweep, report."""


import pytest
import torch
import torch.nn.functional as F

from mkopt.experiments import methods
from mkopt.launch import InlineLauncher
from mkopt.experiments.report import table
from mkopt.experiments.runs import RunSpec
from mkopt.experiments.sweep import SweepConfig, load_dataset, run_sweep

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
    assert len(first.ran) == methods_count * 2 + methods_count  # lr grid at seed 0, then seed 1 at the chosen lr
    assert all(r["provenance"]["commit"] for _, r in store.all())
    text = table(store, config, "pytest")
    assert "| MK (e=3) | A1 |" in text and "(n=2, lr" in text
    # a killed sweep: two finished runs lost (as if in flight), plus a stray temp file of a dead writer
    lost = [s for s, _ in store.all()][:2]
    for spec in lost:
        store.path(spec).unlink()
    (store.root / "synthetic" / ".tmp-dead.json").write_text("{half")
    again = CountingLauncher()
    run_sweep(config, tmp_path, again, progress=False)
    assert sorted(again.ran) == sorted(s.run_id for s in lost)


def test_ensemble_via_vmap_equals_training_the_members_one_by_one():
    fit, val, test, inputs, classes = load_dataset("synthetic")
    spec = RunSpec("ensemble", "A1", "adam", 1e-2, 3, 1, "synthetic", batch=64)
    ensemble = methods.Ensemble(spec, inputs, classes)
    members = []
    for k in range(3):
        member = methods.Plain(RunSpec("baseline", "A1", "adam", 1e-2, methods.member_seed(3, k), 1, "synthetic", batch=64), inputs, classes)
        members.append(member)
    for step in range(5):
        x, y = fit.x[step * 64 : (step + 1) * 64], fit.y[step * 64 : (step + 1) * 64]
        ensemble.step(x, y)
        for member in members:
            member.step(x, y)
    for k, member in enumerate(members):
        for name, value in member.model.named_parameters():
            torch.testing.assert_close(ensemble.params[name][k], value, rtol=1e-5, atol=1e-6)
    mean_probs = torch.stack([m.probabilities(test.x) for m in members]).mean(0)
    torch.testing.assert_close(ensemble.probabilities(test.x), mean_probs, rtol=1e-5, atol=1e-6)


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
    assert subset.linears[0].out_features == 3 * 200
    before = F.cross_entropy(subset.forward(fit.x, subset.select()), fit.y).item()
    for i in range(5):
        subset.step(fit.x[i * 100 : (i + 1) * 100], fit.y[i * 100 : (i + 1) * 100])
    after = F.cross_entropy(subset.forward(fit.x, subset.select()), fit.y).item()
    assert after < before
    final = subset.final_model()
    assert [m.out_features for m in final if isinstance(m, torch.nn.Linear)] == [200, 100, classes]
    with torch.no_grad():
        torch.testing.assert_close(final(test.x).softmax(-1), subset.probabilities(test.x))


def test_mk_methods_report_the_deployed_size():
    fit, val, test, inputs, classes = load_dataset("synthetic")
    plain = methods.build(RunSpec("baseline", "A1", "sgd", 0.1, 0, 1, "synthetic"), inputs, classes)
    for method in ("mk", "adv-mk"):
        trainee = methods.build(RunSpec(method, "A1", "sgd", 0.1, 0, 1, "synthetic"), inputs, classes)
        result = methods.train(trainee, RunSpec(method, "A1", "sgd", 0.1, 0, 1, "synthetic", batch=100), fit, val, test)
        assert result["deployed_parameters"] == plain.parameters_deployed()
        assert 0 <= result["test_accuracy"] <= 1 and len(result["curves"]["test_loss"]) == 1


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
    with pytest.raises(SystemExit, match="--full"):
        table1.config_for(parser.parse_args("--lr-steps -4 8".split()))
    with pytest.raises(SystemExit, match="LO must be"):
        table1.config_for(parser.parse_args("--full --lr-steps 3 1".split()))
