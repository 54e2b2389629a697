"""mkopt/recipes/resnet50_imagenet.py end to end on a tiny generated ImageFolder (CPU, ResNet-50 at width 8, 32 px)."""

from __future__ import annotations

import csv
import signal
from pathlib import Path

import pytest

from mkopt.errors import ConfigError
import torch
import torchvision

from mkopt.job import RecipeJob, load_recipe

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "mkopt" / "recipes" / "resnet50_imagenet.py"
CONFIGS = sorted((ROOT / "mkopt" / "recipes" / "configs" / "resnet50_imagenet").glob("*.yaml"))
CLASSES = 3
MK_AMP = ("amp=fp16", "amp_init_scale=256")  # CPU autocast + GradScaler: the scaler's state is part of the resumed state
recipe = load_recipe(RECIPE)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One intra-op thread: on a busy 2-core machine two threads spin on each other (10x slower)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def imagenet(tmp_path_factory) -> Path:
    """3 classes of random 40x40 JPEGs: 8 per class for training, 3 for validation."""
    from PIL import Image

    root = tmp_path_factory.mktemp("tiny-imagenet")
    g = torch.Generator().manual_seed(0)
    for split, count in (("train", 8), ("val", 3)):
        for c in range(CLASSES):
            folder = root / split / f"n0000{c}"
            folder.mkdir(parents=True)
            for i in range(count):
                pixels = torch.randint(0, 256, (40, 40, 3), generator=g, dtype=torch.uint8).numpy()
                Image.fromarray(pixels).save(folder / f"{i}.JPEG", quality=90)
    return root


def tiny(variant: str, imagenet: Path, out: Path, *extra: str) -> dict:
    overrides = [
        f"data.root={imagenet}", f"out={out}", "data.image_size=32", "data.eval_resize=36", "data.workers=0",
        "data.eval_batch=16", f"model.num_classes={CLASSES}", "model.width_per_group=8", "optim.batch_size=8",
        "schedule.epochs=2", "schedule.milestones=[1]", "device=cpu", "amp=off", "deterministic=true",
        "log.progress=false", "mk.sampler_compile=false", *extra,
    ]  # fmt: skip
    return recipe.load_config(ROOT / "mkopt" / "recipes" / "configs" / "resnet50_imagenet" / f"{variant}.yaml", overrides)


def deployed(out: Path) -> dict[str, torch.Tensor]:
    return torch.load(out / "model_deployed.pt", weights_only=True)


@pytest.fixture(scope="module")
def runs(imagenet, tmp_path_factory) -> dict[str, Path]:
    base = tmp_path_factory.mktemp("runs")
    RecipeJob(RECIPE, tiny("baseline", imagenet, base / "baseline"))()
    RecipeJob(RECIPE, tiny("mk", imagenet, base / "mk", *MK_AMP))()
    return {"baseline": base / "baseline", "mk": base / "mk", "base": base}


@pytest.mark.parametrize("config", CONFIGS, ids=[c.stem for c in CONFIGS])
def test_every_config_loads_and_validates(config, tmp_path):
    cfg = recipe.load_config(config, [f"data.root={tmp_path}"])
    assert cfg["model"]["arch"] == "resnet50" and cfg["optim"]["lr_per_256"] == 0.1
    assert config.read_text().startswith("# ResNet-50 / ImageNet") and "--config mkopt/recipes/configs/resnet50_imagenet/" in config.read_text()
    with pytest.raises(ConfigError, match="unknown key .optim.lr."):
        recipe.load_config(config, ["optim.lr=0.1"])


def test_mk_runs_on_baseline_long_unchanged_and_lr_compensation_is_only_the_ablation(tmp_path):
    """Section 5.2: MK and Adv-MK use the BASELINE-LONG configuration unchanged (no lr compensation)."""
    def load(variant):
        return recipe.load_config(ROOT / "mkopt" / "recipes" / "configs" / "resnet50_imagenet" / f"{variant}.yaml", [f"data.root={tmp_path}"])

    long = load("baseline_long")
    for variant in ("mk", "adv_mk", "mk_lr_compensation"):
        cfg = load(variant)
        assert cfg["method"] == "mk" and cfg["optim"] == long["optim"] and cfg["schedule"] == long["schedule"]
        assert cfg["mk"]["lr_compensation"] is (variant == "mk_lr_compensation")
    ablation, mk = load("mk_lr_compensation"), load("mk")
    differing = {k for k in mk if k != "out" and mk[k] != ablation[k]}
    assert differing == {"mk"} and {k for k in mk["mk"] if mk["mk"][k] != ablation["mk"][k]} == {"lr_compensation"}
    assert load("adv_mk")["mk"]["probabilities"] == "adv-mk"
    with pytest.raises(ValueError, match="data.train_eval_samples"):
        recipe.load_config(ROOT / "mkopt" / "recipes" / "configs" / "resnet50_imagenet" / "mk.yaml", [f"data.root={tmp_path}", "data.train_eval_samples=-1"])


def test_overrides_parse_exponent_floats_and_numeric_keys_are_type_checked(tmp_path):
    mk = ROOT / "mkopt" / "recipes" / "configs" / "resnet50_imagenet" / "mk.yaml"
    cfg = recipe.load_config(mk, [f"data.root={tmp_path}", "schedule.gamma=1e-1", "optim.weight_decay=5e-5"])
    assert cfg["schedule"]["gamma"] == 0.1 and isinstance(cfg["schedule"]["gamma"], float)  # YAML 1.1 alone: '1e-1'
    assert cfg["optim"]["weight_decay"] == 5e-5
    for override, key in [
        ("optim.weight_decay=abc", "optim.weight_decay"), ("optim.lr_per_256=fast", "optim.lr_per_256"),
        ("schedule.gamma=[0.1]", "schedule.gamma"), ("schedule.epochs=2.5", "schedule.epochs"),
        ("schedule.milestones=[a, b]", "schedule.milestones"), ("optim.batch_size=1e2", "optim.batch_size"),
        ("optim.momentum=true", "optim.momentum"),
    ]:  # fmt: skip
        with pytest.raises(ValueError, match=key.replace(".", r"\.")):
            recipe.load_config(mk, [f"data.root={tmp_path}", override])
    with pytest.raises(ConfigError, match="key=value"):
        recipe.load_config(mk, ["optim.batch_size"])


@pytest.mark.parametrize("method", ["baseline", "mk"])
def test_runs_end_to_end_and_deploys_a_plain_torchvision_resnet50(runs, method):
    out = runs[method]
    rows = list(csv.DictReader((out / "log.csv").open()))
    assert [int(r["epoch"]) for r in rows] == [1, 2] and all(0 <= float(r["top1"]) <= 1 for r in rows)
    # Fig. 5.2's train curve: the deployed model on a fixed sample of training images (here all 24 of them)
    assert all(0 <= float(r["train_top1"]) <= 1 and float(r["train_eval_loss"]) > 0 for r in rows)
    assert float(rows[1]["lr"]) == pytest.approx(float(rows[0]["lr"]) * 0.1)  # milestone at epoch 1
    if method == "mk":  # MK's diagnostics in every epoch row (CSV, TensorBoard when on, stdout)
        assert all(float(r["mk/spread"]) > 0 and float(r["mk/collapsed"]) in (0.0, 1.0) for r in rows)
    else:
        assert all(r["mk/spread"] == "" for r in rows)
    plain = torchvision.models.resnet50(num_classes=CLASSES, width_per_group=8)
    plain.load_state_dict(deployed(out), strict=True)
    assert len(list((out / "checkpoints").glob("ckpt-*.pt"))) == 2  # the newest and the previous good one


def test_preempted_run_resumes_to_bit_identical_weights(runs, imagenet):
    """SIGUSR2 after step 2 (of 6): checkpoint at the step boundary, requeue, resume; same final weights."""
    out = runs["base"] / "mk-preempted"
    job = RecipeJob(RECIPE, tiny("mk", imagenet, out, *MK_AMP, "debug.signal_at_step=2"))
    requeued = []

    class Preempted(Exception):
        pass

    def submitit_like_handler(signum, frame):  # what submitit's handler does on rank 0, minus sbatch
        requeued.append(job.checkpoint())
        raise Preempted

    previous = signal.signal(signal.SIGUSR2, submitit_like_handler)
    try:
        with pytest.raises(Preempted):
            job()
    finally:
        signal.signal(signal.SIGUSR2, previous)
    assert not (out / "model_deployed.pt").exists()
    saved = torch.load(out / "checkpoints" / "ckpt-0000000002.pt", weights_only=True)
    assert saved["progress"]["step"] == 2 and saved["optimizer"]["mkopt"]["step"] == 2
    resubmitted = requeued[0].function  # a fresh RecipeJob: pickles without live state
    assert isinstance(resubmitted, RecipeJob) and resubmitted is not job
    resubmitted()
    reference, resumed = deployed(runs["mk"]), deployed(out)
    assert reference.keys() == resumed.keys()
    for key in reference:
        assert torch.equal(reference[key], resumed[key]), key
    losses = [[r["train_loss"] for r in csv.DictReader((o / "log.csv").open())] for o in (runs["mk"], out)]
    assert losses[0] == losses[1]


def test_resume_with_another_config_is_refused(runs, imagenet):
    with pytest.raises(ValueError, match=r"another config: .*optim.momentum"):
        RecipeJob(RECIPE, tiny("mk", imagenet, runs["mk"], *MK_AMP, "optim.momentum=0.5"))()


def test_adv_mk_ensemble_and_distilled_variants_run(runs, imagenet):
    one_epoch = ("schedule.epochs=1", "schedule.milestones=[]")
    adv = RecipeJob(RECIPE, tiny("adv_mk", imagenet, runs["base"] / "adv", *one_epoch, "amp=bf16"))()
    assert adv["mk"]["probabilities"] == "adv-mk" and adv["steps"] == 3
    torchvision.models.resnet50(num_classes=CLASSES, width_per_group=8).load_state_dict(deployed(runs["base"] / "adv"))
    members = f"[{runs['baseline']},{runs['mk']}]"
    ensemble = RecipeJob(RECIPE, tiny("ensemble", imagenet, runs["base"] / "ens", f"ensemble.members={members}"))()
    assert 0 <= ensemble["final"]["top1"] <= 1 and (runs["base"] / "ens" / "result.json").exists()
    distilled = RecipeJob(RECIPE, tiny("distilled", imagenet, runs["base"] / "kd", *one_epoch, f"distill.teachers={members}"))()
    assert distilled["steps"] == 3 and distilled["mk"] is None


def _exit_now(signum, frame):
    raise SystemExit(0)


def _ddp_rank(rank: int, port: int, config: dict, stop_on_signal: bool) -> None:
    """One of 2 gloo ranks running the recipe (torchrun's variables); the preemption signal exits every rank."""
    import os

    torch.set_num_threads(1)
    os.environ.update(RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    if stop_on_signal:
        signal.signal(signal.SIGUSR2, _exit_now)  # every rank stops at the same step boundary (PreemptionGuard)
    try:
        load_recipe(RECIPE).run(config)
    except SystemExit:
        pass


@pytest.mark.slow
def test_ddp_resume_mid_epoch_logs_the_same_train_loss(imagenet, tmp_path):
    """2 ranks, stopped after step 4 (mid-epoch 2, rank 0's checkpoint) and resumed: the epoch's train_loss
    equals the uninterrupted run's (each rank used to restore rank 0's partial loss sum)."""
    import socket

    import torch.multiprocessing as mp

    def launch(out: Path, *extra: str, stop: bool = False) -> list[str]:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        config = tiny("mk", imagenet, out, "checkpoint.every_minutes=0", *extra)  # rank 0 checkpoints every step
        mp.start_processes(_ddp_rank, args=(port, config, stop), nprocs=2, start_method="spawn")
        return [r["train_loss"] for r in csv.DictReader((out / "log.csv").open())]

    reference = launch(tmp_path / "a")
    launch(tmp_path / "b", "debug.signal_at_step=4", stop=True)
    assert torch.load(tmp_path / "b" / "checkpoints" / "ckpt-0000000004.pt", weights_only=True)["progress"]["batch"] == 1
    assert launch(tmp_path / "b") == reference
