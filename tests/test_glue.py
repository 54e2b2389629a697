"""GLUE in T5's format: formats, metrics against hand computations, data sources, the t5_glue recipe."""

import json
import math
import runpy
from pathlib import Path

import pytest

from mkopt.experiments import glue
from mkopt.experiments.glue import get_task, glue_average, load_split, parse_prediction, task_metrics, to_text
from mkopt.config import load_config
from mkopt.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = sorted((ROOT / "mkopt" / "recipes" / "configs" / "t5_glue").glob("*.yaml"))


# -- formats -----------------------------------------------------------------------------------

EXPECTED_TEXT = {
    "cola": ({"sentence": "He left.", "label": 1}, "cola sentence: He left.", "acceptable"),
    "sst2": ({"sentence": "dull.", "label": 0}, "sst2 sentence: dull.", "negative"),
    "mrpc": ({"sentence1": "A.", "sentence2": "B.", "label": 1}, "mrpc sentence1: A. sentence2: B.", "equivalent"),
    "stsb": ({"sentence1": "A.", "sentence2": "B.", "label": 2.33}, "stsb sentence1: A. sentence2: B.", "2.4"),
    "qqp": ({"question1": "Why?", "question2": "How?", "label": 0}, "qqp question1: Why? question2: How?", "not_duplicate"),
    "mnli": ({"premise": "P.", "hypothesis": "H.", "label": 2}, "mnli hypothesis: H. premise: P.", "contradiction"),
    "qnli": ({"question": "Q?", "sentence": "S.", "label": 1}, "qnli question: Q? sentence: S.", "not_entailment"),
    "rte": ({"sentence1": "A.", "sentence2": "B.", "label": 0}, "rte sentence1: A. sentence2: B.", "entailment"),
}


@pytest.mark.parametrize("name", sorted(EXPECTED_TEXT))
def test_t5_text_to_text_format(name):
    example, text, target = EXPECTED_TEXT[name]
    assert to_text(get_task(name), example) == (text, target)
    assert parse_prediction(get_task(name), target) == (2.4 if name == "stsb" else example["label"])


def test_every_table4_task_is_defined():
    assert sorted(glue.TASKS) == ["cola", "mnli", "mrpc", "qnli", "qqp", "rte", "sst2", "stsb"]
    assert {entry for entry, _, _ in glue.TABLE4_COLUMNS} == {"cola", "sst2", "mrpc", "stsb", "qqp", "mnli_m", "mnli_mm", "qnli", "rte"}


def test_stsb_targets_round_to_0_2():
    # x.5 ties (1.3 * 5 = 6.5, 4.9 * 5 = 24.5) round half to even, as T5's tf.round
    assert [glue.stsb_target(s) for s in (0.0, 0.09, 0.11, 1.3, 3.19, 4.9, 4.95, 5.0)] == ["0.0", "0.0", "0.2", "1.2", "3.2", "4.8", "5.0", "5.0"]


def test_bad_examples_and_unknown_tasks_fail_clearly():
    with pytest.raises(ValueError, match="unknown GLUE task 'wnli'"):
        get_task("wnli")
    with pytest.raises(ValueError, match="MNLI is one task"):
        get_task("mnli_m")
    with pytest.raises(KeyError, match="lacks field"):
        to_text(get_task("rte"), {"sentence1": "a", "label": 0})
    with pytest.raises(ValueError, match="not a class index"):
        to_text(get_task("sst2"), {"sentence": "a", "label": 2})


# -- metrics against hand computations ---------------------------------------------------------


def test_accuracy_f1_matthews_by_hand():
    targets = [1, 1, 1, 1, 0, 0, 0, 0, 1, 0]
    preds = [1, 1, 1, 0, 0, 0, 1, -1, -1, 0]  # the two -1 (invalid) become wrong: (t=0 -> 1), (t=1 -> 0)
    tp, fp, fn, tn = 3, 2, 2, 3
    assert glue.accuracy(targets, preds) == 100 * 6 / 10
    assert glue.binary_f1(targets, preds) == pytest.approx(100 * 2 * tp / (2 * tp + fp + fn))
    # MCC: the binary formula on the same counts with the invalid predictions replaced by the wrong class
    wrong = [p if p != -1 else 1 - t for t, p in zip(targets, preds)]
    mcc = (tp * tn - fp * fn) / math.sqrt((tp + fp) * (tp + fn) * (tn + fp) * (tn + fn))
    assert glue.matthews_corrcoef(targets, wrong) == pytest.approx(100 * mcc)
    assert glue.matthews_corrcoef([1, 1, 0], [1, 1, 1]) == 0.0  # undefined -> 0 (as sklearn)
    assert glue.binary_f1([0, 0], [0, 0]) == 0.0


def test_matthews_with_invalid_predictions_is_multiclass_like_t5():
    """T5 scores CoLA with sklearn's multiclass MCC over {-1, 0, 1}: an invalid output is its own class."""
    # s=4, correct c=3; targets t: {0: 2, 1: 2}; predictions p: {-1: 1, 0: 2, 1: 1}
    # (c*s - sum p_k t_k) / sqrt((s^2 - sum p_k^2) (s^2 - sum t_k^2)) = (12 - 6) / sqrt(10 * 8)
    assert glue.matthews_corrcoef([1, 1, 0, 0], [1, -1, 0, 0]) == pytest.approx(100 * 6 / math.sqrt(80))  # 67.08
    assert round(glue.matthews_corrcoef([1, 1, 0, 0], [1, -1, 0, 0]), 1) == 67.1  # the binary formula gave 57.7
    # binary case: tp=2, fp=1, fn=1, tn=1 -> (2*1 - 1*1) / sqrt(3*3*2*2)
    assert glue.matthews_corrcoef([1, 1, 1, 0, 0], [1, 1, 0, 0, 1]) == pytest.approx(100 / 6)
    assert glue.matthews_corrcoef([1, 0, 1, 0], [1, 0, 1, 0]) == 100.0
    assert glue.matthews_corrcoef([1, 0, 1, 0], [0, 1, 0, 1]) == -100.0
    assert glue.matthews_corrcoef([1, 1, 0, 0], [-1, -1, -1, -1]) == 0.0  # constant predictions: undefined -> 0


def test_correlations_by_hand():
    targets, preds = [0.5, 1.0, 2.6, 3.0, 4.8], [0.8, 0.6, 2.0, 3.6, 4.0]
    mt, mp = sum(targets) / 5, sum(preds) / 5
    cov = sum((t - mt) * (p - mp) for t, p in zip(targets, preds))
    r = cov / math.sqrt(sum((t - mt) ** 2 for t in targets) * sum((p - mp) ** 2 for p in preds))
    assert glue.pearson(targets, preds) == pytest.approx(100 * r)
    # ranks: targets 1..5; preds (0.8, 0.6, 2.0, 3.6, 4.0) -> 2, 1, 3, 4, 5; d^2 = 1 + 1 = 2
    assert glue.spearman(targets, preds) == pytest.approx(100 * (1 - 6 * 2 / (5 * (25 - 1))))
    assert glue.pearson(targets, [1.0] * 5) == 0.0  # constant predictions: undefined -> 0, like T5


def test_task_metrics_per_task():
    assert task_metrics(get_task("cola"), [1, 0], ["acceptable", "unacceptable"]) == {"mcc": 100.0}
    assert task_metrics(get_task("qqp"), [1, 0, 1, 0], ["duplicate", "duplicate", "?", "not_duplicate"]) == {
        "accuracy": 50.0, "f1": pytest.approx(100 * 2 / 4)}  # fmt: skip
    mnli = task_metrics(get_task("mnli"), [0, 1, 2], ["entailment", "contradiction", "contradiction"])
    assert mnli == {"accuracy": pytest.approx(200 / 3)}
    stsb = task_metrics(get_task("stsb"), [1.0, 2.0, 3.0], ["1.0", "2.2", "3.4"])
    assert stsb == {"pearson": pytest.approx(glue.pearson([1, 2, 3], [1.0, 2.2, 3.4])), "spearman": 100.0}
    with pytest.raises(ValueError, match="2 targets but 1 predictions"):
        task_metrics(get_task("rte"), [0, 1], ["entailment"])


def test_glue_average_by_hand():
    scores = {
        "cola": {"mcc": 40.0}, "sst2": {"accuracy": 92.0}, "mrpc": {"f1": 89.0, "accuracy": 85.0},
        "stsb": {"pearson": 88.0, "spearman": 87.0}, "qqp": {"accuracy": 90.0, "f1": 87.0}, "mnli_m": {"accuracy": 83.0},
        "mnli_mm": {"accuracy": 84.0}, "qnli": {"accuracy": 90.0}, "rte": {"accuracy": 70.0},
    }  # fmt: skip
    hand = (40 + 92 + 87 + 87.5 + 88.5 + 83 + 84 + 90 + 70) / 9
    assert glue_average(scores) == pytest.approx(hand)
    del scores["rte"]
    with pytest.raises(ValueError, match=r"missing \['rte'\]"):
        glue_average(scores)


# -- data sources ------------------------------------------------------------------------------


def test_local_jsonl_folder_and_missing_file(tmp_path):
    rows = [{"sentence1": "a b.", "sentence2": "a b.", "label": 0, "idx": 0}]
    (tmp_path / "rte").mkdir()
    (tmp_path / "rte" / "train.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    assert load_split(get_task("rte"), "train", str(tmp_path)) == rows
    with pytest.raises(FileNotFoundError, match=r"rte/validation\.jsonl not found.*to_json"):
        load_split(get_task("rte"), "validation", str(tmp_path))


def test_hub_source_calls_datasets_lazily(monkeypatch):
    datasets = pytest.importorskip("datasets")
    calls = []

    def fake_load_dataset(path, name, split):
        calls.append((path, name, split))
        return [{"premise": "p", "hypothesis": "h", "label": 1, "idx": 0}]

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    assert load_split(get_task("mnli"), "validation_mismatched", "hub")[0]["label"] == 1
    assert calls == [("glue", "mnli", "validation_mismatched")]


def test_generated_examples_have_glue_fields_and_labels():
    for task in glue.TASKS.values():
        rows = glue.generated_examples(task, "train", 20)
        assert all(set(task.fields) | {"label", "idx"} == set(r) for r in rows)
        for row in rows:
            text, target = to_text(task, row)
            assert text.startswith(task.name + " ") and target
    assert glue.generated_examples(get_task("rte"), "train", 5) == glue.generated_examples(get_task("rte"), "train", 5)


# -- configs and the recipe --------------------------------------------------------------------


def test_yaml_configs_load_and_validate():
    from mkopt.experiments.glue_finetune import GlueRunConfig

    assert [c.name for c in CONFIGS] == ["baseline.yaml", "mk.yaml"]
    for path in CONFIGS:
        config = load_config(GlueRunConfig, path)
        assert config.tasks == list(glue.TASKS) and config.model == "t5-small"
        assert "python mkopt/recipes/t5_glue.py --config mkopt/recipes/configs/t5_glue/" + path.name in path.read_text().splitlines()[1]
    assert load_config(GlueRunConfig, CONFIGS[1]).label == "mk_e3"
    assert load_config(GlueRunConfig, CONFIGS[0]).label == "baseline"
    assert load_config(GlueRunConfig, CONFIGS[1], ["lr=1e-3", "tasks=rte"]).lr == 1e-3
    with pytest.raises(ValueError, match="unknown key .learning_rate."):
        load_config(GlueRunConfig, CONFIGS[1], ["learning_rate=1e-3"])
    with pytest.raises(ValueError, match="not key=value"):
        load_config(GlueRunConfig, CONFIGS[1], ["max_steps"])
    with pytest.raises(ValueError, match="unknown GLUE task 'wnli'"):
        load_config(GlueRunConfig, CONFIGS[1], ["tasks=[rte, wnli]"])


TINY = ["model=tiny-random", "data=generated", "generated_examples=8", "batch_size=4", "max_steps=4", "eval_every=2",
        "sampler_compile=false", "threads=1"]  # fmt: skip


def recipe_main():
    return runpy.run_path(str(ROOT / "mkopt" / "recipes" / "t5_glue.py"), run_name="t5_glue")["main"]


@pytest.mark.slow
def test_recipe_end_to_end_on_tiny_t5_baseline_and_mk(tmp_path, capsys):
    main = recipe_main()
    for config in CONFIGS:
        assert main(["--config", str(config), *TINY, f"out_dir={tmp_path}"]) == 0
    for label in ("baseline", "mk_e3"):
        for task in glue.TASKS:
            run = tmp_path / label / "seed0" / task
            result = json.loads((run / "result.json").read_text())
            entries = [e for e, _ in get_task(task).eval_splits]
            assert sorted(result["final"]["metrics"]) == sorted(entries) and result["final"]["step"] == 4
            steps = {line.split(",")[0] for line in (run / "eval.csv").read_text().splitlines()[1:]}
            assert steps == {"0", "2", "4"}  # evaluated at the start and every 2 steps
            assert len((run / "train.csv").read_text().splitlines()) == 1 + 4
    table = (tmp_path / "table4.md").read_text()
    assert "| baseline | 1 |" in table and "| mk_e3 | 1 |" in table and "MNLI-mm" in table
    assert (tmp_path / "curves.png").stat().st_size > 10_000
    assert main(["--report", str(tmp_path)]) == 0 and "GLUE avg" in capsys.readouterr().out


def test_recipe_mk_saves_a_plain_deployed_t5_and_skips_finished_tasks(tmp_path):
    from transformers import T5ForConditionalGeneration

    from mkopt.experiments.glue_finetune import GlueRunConfig, run

    config = load_config(GlueRunConfig, CONFIGS[1], [*TINY, "tasks=[rte]", "save_model=true", f"out_dir={tmp_path}"])
    first = run(config)
    model, info = T5ForConditionalGeneration.from_pretrained(tmp_path / "mk_e3" / "seed0" / "rte" / "model", output_loading_info=True)
    assert (info["missing_keys"], info["unexpected_keys"]) == (set(), set())
    assert model.lm_head.weight is model.shared.weight
    assert run(config) == first  # finished: read back, not retrained
    changed = load_config(GlueRunConfig, CONFIGS[1], [*TINY, "tasks=[rte]", "lr=1e-2", f"out_dir={tmp_path}"])
    recorded = (tmp_path / "mk_e3" / "seed0" / "config.yaml").read_text()
    with pytest.raises(ValueError, match="different config"):
        run(changed)
    # the refused run must not overwrite the config of the results on disk
    assert (tmp_path / "mk_e3" / "seed0" / "config.yaml").read_text() == recorded


def test_recipe_bad_inputs_fail_clearly(tmp_path):
    from mkopt.experiments.glue_finetune import GlueRunConfig, run

    main = recipe_main()
    with pytest.raises(ValueError, match="unknown GLUE task 'mnli_m'"):
        main(["--config", str(CONFIGS[1]), "tasks=[mnli_m]"])
    with pytest.raises(FileNotFoundError, match=r"sst2/train\.jsonl not found"):
        run(load_config(GlueRunConfig, CONFIGS[1], [*TINY, "tasks=[sst2]", f"data={tmp_path}", f"out_dir={tmp_path}"]))
    with pytest.raises(ValueError, match="matched no tensor of T5ForConditionalGeneration"):
        run(load_config(GlueRunConfig, CONFIGS[1], [*TINY, "tasks=[rte]", "targets=no.such.*", f"out_dir={tmp_path}"]))
    with pytest.raises(ConfigError, match="config file .*missing.yaml not found"):
        main(["--config", str(tmp_path / "missing.yaml")])


def test_a_task_killed_mid_way_resumes_from_its_checkpoint_bit_identically(tmp_path, monkeypatch):
    """Item 10 of the hardening issue: 8 tasks x 10k steps must survive a kill inside a task."""
    from mkopt.experiments import glue_finetune
    from mkopt.experiments.glue_finetune import GlueRunConfig, run

    settings = dict(method="mk", model="tiny-random", data="generated", tasks=["rte"], max_steps=6, eval_every=3,
                    generated_examples=16, batch_size=4, sampler_compile=False, checkpoint_every=2, progress=False)  # fmt: skip
    whole = run(GlueRunConfig(**settings, out_dir=str(tmp_path / "whole")))["rte"]

    real = glue_finetune._batches
    calls = {"n": 0}

    def dies_after_five_batches(*args, **kwargs):
        calls["n"] += 1
        calls["skip"] = kwargs.get("skip")
        for count, batch in enumerate(real(*args, **kwargs)):
            if calls["n"] == 1 and count == 5:
                raise KeyboardInterrupt("killed at step 6")
            yield batch

    monkeypatch.setattr(glue_finetune, "_batches", dies_after_five_batches)
    config = GlueRunConfig(**settings, out_dir=str(tmp_path / "killed"))
    with pytest.raises(KeyboardInterrupt):
        run(config)
    task = tmp_path / "killed" / "mk_e3" / "seed0" / "rte"
    assert sorted(p.name for p in (task / "checkpoints").glob("ckpt-*.pt")) == ["ckpt-0000000002.pt", "ckpt-0000000004.pt"]
    resumed = run(config)["rte"]
    assert calls == {"n": 2, "skip": 4}  # the rerun started after step 4, from the checkpoint, not from scratch
    assert resumed["final"] == whole["final"] and resumed["best"] == whole["best"]
    losses = lambda folder: [row.split(",")[1] for row in (folder / "train.csv").read_text().splitlines()]  # noqa: E731
    assert losses(task) == losses(tmp_path / "whole" / "mk_e3" / "seed0" / "rte")  # every step's loss, bit for bit
    assert (task / "eval.csv").read_text() == (tmp_path / "whole" / "mk_e3" / "seed0" / "rte" / "eval.csv").read_text()
    assert not (task / "checkpoints").exists()  # removed once result.json exists
