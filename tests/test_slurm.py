"""The launcher (``mkopt.launch``) and a real SLURM cluster.

Unit tests (no SLURM): profiles, overrides, job-folder errors, submit-time rejections (a fake sbatch),
and the inline / local executors. Cluster tests (``slow``, need ``slurm/up.sh``; they skip with the
reason when SLURM is not installed or not answering): a job, a job-array sweep of the Table-1 harness,
a killed job, a 2-task DDP job over gloo, and a preemption/requeue round trip. Every wait has a limit.
"""

from __future__ import annotations

import argparse
import math
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from mkopt.errors import ConfigError

submitit = pytest.importorskip("submitit")
pytest.importorskip("yaml")

from mkopt import launch  # noqa: E402
from mkopt.launch import InlineLauncher, LocalPoolLauncher  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
TESTS = Path(__file__).resolve().parent
PROFILES = ROOT / "slurm" / "profiles"
LOCAL_TEST = PROFILES / "local-test.yaml"
RECIPE = TESTS / "slurm_recipe.py"  # a toy recipe driven by mkopt.job.RecipeJob


def _slurm_unavailable() -> str | None:
    if shutil.which("sbatch") is None:
        return "SLURM is not installed (no sbatch on PATH): `slurm/up.sh` (root, apt) brings up a single-node cluster"
    try:
        ping = subprocess.run(["scontrol", "ping"], capture_output=True, text=True, timeout=15)
    except (OSError, subprocess.TimeoutExpired) as error:
        return f"`scontrol ping` failed ({error}): start the cluster with slurm/up.sh"
    if ping.returncode != 0 or "UP" not in ping.stdout:
        said = ((ping.stdout + ping.stderr).strip().splitlines() or ["no output"])[-1]
        return f"the SLURM controller is not answering `scontrol ping` ({said}): start it with slurm/up.sh"
    return None


SLURM_MISSING = _slurm_unavailable()
needs_slurm = pytest.mark.skipif(SLURM_MISSING is not None, reason=SLURM_MISSING or "")


@pytest.fixture
def job_env(monkeypatch):
    """submitit's own state polls use the sacct stand-in (slurm/up.sh also installs it on PATH)."""
    monkeypatch.setenv("PATH", f"{ROOT / 'slurm' / 'bin'}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.delenv(launch.JOB_DIR_ENV, raising=False)


# ---------------------------------------------------------------- profiles and overrides


@pytest.mark.parametrize("path", sorted(PROFILES.glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_profile_loads_and_builds_sbatch_parameters(path):
    profile = launch.load_profile(path)
    params = profile.slurm_parameters()
    assert params["ntasks_per_node"] == profile.tasks_per_node and params["time"] == profile.time_min
    from submitit.slurm.slurm import _make_sbatch_string

    script = _make_sbatch_string(command="true", folder="/tmp/x/%j", **params)  # submitit accepts every parameter
    assert "#SBATCH --ntasks-per-node" in script


def test_local_test_profile_fits_this_cluster():
    profile = launch.load_profile(LOCAL_TEST)
    assert profile.partition == "local" and profile.gpus_per_task == 0 and profile.job_dir is None


def test_overrides_win_and_per_task_resources_scale_to_the_node(tmp_path):
    path = tmp_path / "p.yaml"
    path.write_text("partition: gpu\ntasks_per_node: 4\ngpus_per_task: 1\nmem_gb_per_task: 8\nsbatch: {constraint: a100}\n")
    profile = launch.load_profile(path, tasks_per_node=2, qos="high")
    params = profile.slurm_parameters("sweep")
    assert (profile.partition, profile.tasks_per_node, profile.qos) == ("gpu", 2, "high")
    assert params["gpus_per_node"] == 2 and params["mem"] == "16384M" and params["job_name"] == "sweep"
    assert params["additional_parameters"] == {"constraint": "a100"}
    assert "gpus_per_node" not in profile.replace(gpus_per_task=0).slurm_parameters()
    assert launch.parse_overrides(["partition=cpu", "time_min=5", "account=null"]) == {"partition": "cpu", "time_min": 5, "account": None}


@pytest.mark.parametrize(
    "text, error, words",
    [
        ("partiton: gpu\n", ConfigError, ["unknown key 'partiton'", "valid keys here:", "partition"]),
        ("cpus_per_task: four\n", ConfigError, ["cpus_per_task expects int", "'four'"]),
        ("nodes: 0\n", ConfigError, ["nodes=0", ">= 1"]),
        ("- partition\n", ConfigError, ["must hold a mapping"]),
        ("sbatch: [a]\n", ConfigError, ["sbatch expects dict"]),
        ("gpus_per_node: 3\ntasks_per_node: 2\n", ConfigError, ["gpus_per_node=3 is not a multiple of tasks_per_node=2"]),
        ("partition: [gpu\n", ConfigError, ["not valid YAML (line"]),
    ],
)
def test_bad_profiles_are_errors_naming_the_file(tmp_path, text, error, words):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(error) as info:
        launch.load_profile(path)
    assert str(path) in str(info.value) and all(w in str(info.value) for w in words)


def test_submitits_names_are_aliases(tmp_path):
    path = tmp_path / "submitit.yaml"
    path.write_text("tasks_per_node: 4\ngpus_per_node: 8\nmem_gb: 64\ntimeout_min: 90\n")
    profile = launch.load_profile(path)
    assert (profile.gpus_per_task, profile.mem_gb_per_task, profile.time_min) == (2, 16.0, 90)
    assert profile.slurm_parameters()["gpus_per_node"] == 8 and profile.slurm_parameters()["mem"] == "65536M"
    assert launch.load_profile(None, timeout_min=5, gpus_per_node=1).replace(mem_gb=2).time_min == 5
    with pytest.raises(ConfigError, match="'timeout_min' and 'time_min' set the same thing"):
        launch.load_profile(None, timeout_min=5, time_min=6)


def test_bad_overrides_are_errors():
    with pytest.raises(FileNotFoundError, match="slurm/profiles"):
        launch.load_profile("/nonexistent/profile.yaml")
    with pytest.raises(ConfigError, match=r"unknown cluster setting\(s\) \['gpus'\]"):
        launch.load_profile(LOCAL_TEST, gpus=1)
    with pytest.raises(ValueError, match="key=value"):
        launch.parse_overrides(["partition"])
    with pytest.raises(ValueError, match="local executor runs on this machine only"):
        launch.ClusterProfile(nodes=2).local_parameters()


# ---------------------------------------------------------------- the job folder


def test_job_folder_comes_from_argument_then_env_then_profile(tmp_path, monkeypatch):
    (tmp_path / "arg").mkdir(), (tmp_path / "env").mkdir(), (tmp_path / "profile").mkdir()
    profile = launch.ClusterProfile(job_dir=str(tmp_path / "profile"))
    monkeypatch.delenv(launch.JOB_DIR_ENV, raising=False)
    assert launch.resolve_job_dir(None, profile) == tmp_path / "profile"
    monkeypatch.setenv(launch.JOB_DIR_ENV, str(tmp_path / "env"))
    assert launch.resolve_job_dir(None, profile) == tmp_path / "env"
    assert launch.resolve_job_dir(tmp_path / "arg", profile) == tmp_path / "arg"
    monkeypatch.setenv("MKOPT_TEST_ROOT", str(tmp_path))
    assert launch.resolve_job_dir("$MKOPT_TEST_ROOT/arg") == tmp_path / "arg"


def test_job_folder_errors_name_the_folder_and_the_fix(tmp_path, monkeypatch):
    monkeypatch.delenv(launch.JOB_DIR_ENV, raising=False)
    with pytest.raises(ValueError, match=f"no job folder: pass --job-dir.*{launch.JOB_DIR_ENV}"):
        launch.resolve_job_dir()
    with pytest.raises(ValueError, match="'jobs' \\(from the job_dir argument\\) is relative"):
        launch.resolve_job_dir("jobs")
    monkeypatch.setenv(launch.JOB_DIR_ENV, "relative/jobs")
    with pytest.raises(ValueError, match=f"from \\${launch.JOB_DIR_ENV}\\) is relative"):
        launch.resolve_job_dir()
    missing = tmp_path / "not" / "there"
    with pytest.raises(FileNotFoundError, match=f"{missing} .*does not exist: create it with `mkdir -p {missing}`"):
        launch.resolve_job_dir(missing)
    (tmp_path / "file").write_text("")
    with pytest.raises(NotADirectoryError, match="is not a folder"):
        launch.resolve_job_dir(tmp_path / "file")
    if os.geteuid() == 0:
        unwritable = Path("/sys")  # root may write anywhere else
    else:
        unwritable = tmp_path / "ro"
        unwritable.mkdir(mode=0o500)
    with pytest.raises(PermissionError, match=f"job folder {unwritable} .*is not writable"):
        launch.resolve_job_dir(unwritable)
    monkeypatch.delenv(launch.JOB_DIR_ENV)
    with pytest.raises(ValueError, match="no job folder"):
        launch.make_launcher("local")  # the launcher checks it before submitting anything


# ---------------------------------------------------------------- launchers without SLURM


def test_make_launcher_kinds(tmp_path):
    assert isinstance(launch.make_launcher("inline"), InlineLauncher)
    assert list(launch.make_launcher("inline").run(abs, [-1, 2])) == [(-1, 1), (2, 2)]
    assert isinstance(launch.make_launcher("pool", workers=2), LocalPoolLauncher)
    local = launch.make_launcher("local", profile=LOCAL_TEST, job_dir=tmp_path, workers=3, time_min=2)
    assert isinstance(local, launch.SubmititLauncher) and local.max_running == 3 and local.profile.time_min == 2
    assert local.folder.parent == tmp_path
    with pytest.raises(ValueError, match="takes no cluster profile"):
        launch.make_launcher("inline", profile=LOCAL_TEST)


def test_local_max_running_counts_every_task_of_a_job(tmp_path, monkeypatch):
    monkeypatch.setattr(launch.os, "cpu_count", lambda: 8)
    profile = launch.ClusterProfile(cpus_per_task=2, tasks_per_node=2)  # one job = 2 processes x 2 CPUs
    assert launch.SubmititLauncher("local", profile, job_dir=tmp_path).max_running == 2
    assert launch.SubmititLauncher("local", profile.replace(tasks_per_node=16), job_dir=tmp_path).max_running == 1


def test_a_requeued_job_is_not_timed_out_by_its_earlier_ending(monkeypatch):
    """NODE_FAIL, then PENDING again (SLURM requeued it): the grace period of the first ending must not fire."""
    states = iter(["NODE_FAIL", "PENDING", "PENDING"])
    monkeypatch.setattr("mkopt.launch.waiting._states", lambda jobs: {key: next(states) for key in jobs})
    task = argparse.Namespace(paths=argparse.Namespace(result_pickle=Path("/nonexistent/result.pkl")))
    job = argparse.Namespace(job_id="7", num_tasks=1, task=lambda i: task)
    watch = launch._Watch(poll_s=0.0, state_poll_s=0.0, result_grace_s=0.05)
    watch.add("k", job)
    assert watch.poll() == [] and "k" in watch.ended_at
    assert watch.poll() == [] and "k" not in watch.ended_at  # alive again
    time.sleep(0.1)  # past the grace period counted from the NODE_FAIL
    assert watch.poll() == [] and len(watch) == 1


def test_slurm_launcher_without_slurm_says_what_to_do(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))  # no sbatch/srun/squeue
    with pytest.raises(RuntimeError, match=r"sbatch, srun, squeue not found on PATH.*--launcher local.*slurm/up.sh"):
        launch.make_launcher("slurm", job_dir=tmp_path)


FAKE_SBATCH = """#!/bin/sh
echo "sbatch: error: {message}" >&2
exit 1
"""


@pytest.mark.parametrize(
    "message, settings, hint",
    [
        ("Invalid generic resource (gres) specification", {"gpus_per_task": 1}, "set gpus_per_task: 0"),
        ("Batch job submission failed: More processors requested than permitted", {"cpus_per_task": 64}, "lower cpus_per_task"),
        ("Memory specification can not be satisfied", {"mem_gb_per_task": 4096}, "lower mem_gb_per_task"),
        ("Batch job submission failed: Invalid partition name specified", {"partition": "nope"}, "sinfo -s"),
    ],
)
def test_rejected_submission_carries_slurms_message_and_a_fix(tmp_path, monkeypatch, message, settings, hint):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, text in (("sbatch", FAKE_SBATCH.format(message=message)), ("srun", "#!/bin/sh\n"), ("squeue", "#!/bin/sh\n")):
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    launcher = launch.make_launcher("slurm", job_dir=tmp_path, **settings)
    with pytest.raises(launch.SubmissionError) as info:
        list(launcher.run(math.sqrt, [1.0, 4.0]))
    text = str(info.value)
    assert "SLURM rejected the job array" in text and message in text and hint in text
    assert all(f"{k}={v}" in text for k, v in settings.items())


def test_local_executor_runs_a_sweep_and_reports_failures_after_the_rest(tmp_path):
    launcher = launch.SubmititLauncher("local", launch.ClusterProfile(time_min=2), job_dir=tmp_path, max_running=2)
    results = {}
    with pytest.raises(launch.JobError) as info:
        for item, result in launcher.run(math.sqrt, [4.0, -1.0, 9.0]):
            results[item] = result
    assert results == {4.0: 2.0, 9.0: 3.0}
    assert "1 of 3 job(s) failed" in str(info.value) and "-1.0: job" in str(info.value) and "math domain error" in str(info.value)
    assert len([p for p in launcher.folder.iterdir() if p.is_dir() and p.name != "%j"]) == 3  # one folder per job (submitit's local controller also makes an empty "%j")


def test_local_wait_has_a_limit_and_sees_a_killed_job(tmp_path):
    launcher = launch.SubmititLauncher("local", launch.ClusterProfile(time_min=2), job_dir=tmp_path)
    job = launcher.submit(time.sleep, 600)  # far longer than any bound below: only the cancel can end it
    with pytest.raises(TimeoutError, match=f"still waiting for job\\(s\\) {job.job_id}"):
        launch.wait(job, timeout_s=1, poll_s=0.2)
    job.cancel()
    start = time.monotonic()
    # a cancelled job either dies at once (no result file) or, under load, first runs submitit's
    # signal handler, which writes a "not requeued" failure: both must end the wait with a JobError
    with pytest.raises(launch.JobError, match=f"job {job.job_id} (ended in state .* without a result|failed:[\\s\\S]*not requeued)"):
        launch.wait(job, timeout_s=300, poll_s=0.2, state_poll_s=0.5, result_grace_s=1)
    assert time.monotonic() - start < 120  # seconds on an idle machine; the bound leaves room for a loaded CI box


def test_table1_takes_launcher_options(tmp_path, monkeypatch):
    from mkopt.experiments import table1

    monkeypatch.setenv("MKOPT_THREADS", "1")  # make_launcher sets it when unset

    parser = argparse.ArgumentParser()
    table1.add_arguments(parser)
    args = parser.parse_args(["--launcher", "local", "--profile", str(LOCAL_TEST), "--job-dir", str(tmp_path), "--cluster", "time_min=3"])
    launcher = table1.make_launcher(args)
    assert isinstance(launcher, launch.SubmititLauncher) and launcher.kind == "local" and launcher.profile.time_min == 3
    assert isinstance(table1.make_launcher(parser.parse_args(["--workers", "1"])), InlineLauncher)
    assert isinstance(table1.make_launcher(parser.parse_args(["--workers", "2"])), LocalPoolLauncher)
    with pytest.raises(ValueError, match="apply to --launcher local or slurm"):
        table1.make_launcher(parser.parse_args(["--launcher", "inline", "--profile", str(LOCAL_TEST)]))


# ---------------------------------------------------------------- against the real cluster


def slurm_launcher(tmp_path: Path, **overrides) -> launch.SubmititLauncher:
    profile = launch.load_profile(LOCAL_TEST, time_min=5, **overrides)
    return launch.SubmititLauncher("slurm", profile, job_dir=tmp_path, state_poll_s=2, result_grace_s=5)


@needs_slurm
@pytest.mark.slow
def test_slurm_single_job(tmp_path, job_env):
    launcher = slurm_launcher(tmp_path)
    job = launcher.submit(os.getenv, "SLURM_JOB_ID")  # a stdlib function: no torch import in the job
    assert launch.wait(job, timeout_s=120) == job.job_id


@needs_slurm
@pytest.mark.slow
def test_slurm_job_array_sweep_of_the_table1_harness_resumes(tmp_path, job_env, monkeypatch):
    from mkopt.experiments.sweep import SweepConfig, run_sweep

    monkeypatch.setenv("MKOPT_THREADS", "1")  # one CPU per array task
    config = SweepConfig(dataset="synthetic", archs=("A1",), optimizers=("adam",), methods=("baseline",), lrs={"adam": [1e-3, 1e-2]}, seeds=(0, 1), base_epochs=1)
    (tmp_path / "jobs").mkdir()
    launcher = slurm_launcher(tmp_path / "jobs")
    store = run_sweep(config, tmp_path / "runs", launcher, progress=False)
    runs = [result for _, result in store.all()]
    assert len(runs) == 3 and all(0 <= r["test_accuracy"] <= 1 for r in runs)  # the lr grid at seed 0, then seed 1
    array_tasks = sorted(p.name for p in launcher.folder.iterdir() if p.is_dir() and "_" in p.name)
    assert len(array_tasks) == 2 and array_tasks[0].split("_")[0] == array_tasks[1].split("_")[0]  # the grid went out as one array
    again = slurm_launcher(tmp_path / "jobs")
    run_sweep(config, tmp_path / "runs", again, progress=False)
    assert not again.folder.exists()  # everything was done: nothing submitted


@needs_slurm
@pytest.mark.slow
def test_slurm_rejects_impossible_requests_at_submit_time(tmp_path, job_env):
    for settings, words in (
        ({"gpus_per_task": 1}, ["gres", "gpus_per_task: 0"]),
        ({"cpus_per_task": 4096}, ["More processors requested than permitted", "lower cpus_per_task"]),
        ({"mem_gb_per_task": 1 << 20}, ["Memory specification can not be satisfied", "lower mem_gb_per_task"]),
        ({"partition": "no-such-partition"}, ["Invalid partition name specified", "sinfo -s"]),
    ):
        with pytest.raises(launch.SubmissionError) as info:
            slurm_launcher(tmp_path, **settings).submit(math.sqrt, 4.0)
        assert all(w in str(info.value) for w in words), str(info.value)


@needs_slurm
@pytest.mark.slow
def test_slurm_killed_job_ends_in_an_error_not_a_hang(tmp_path, job_env):
    launcher = slurm_launcher(tmp_path)
    job = launcher.submit(time.sleep, 120)
    deadline = time.monotonic() + 60
    while launch.slurm_states([job.job_id])[job.job_id] != "RUNNING":
        assert time.monotonic() < deadline, "the job never started"
        time.sleep(0.5)
    subprocess.run(["scancel", job.job_id], check=True, timeout=30)
    with pytest.raises(launch.JobError, match=f"job {job.job_id} ended in state CANCELLED without a result"):
        launch.wait(job, timeout_s=90, poll_s=0.5, state_poll_s=1, result_grace_s=2)
    # submitit's own polling sees it too, through the sacct stand-in (slurm/bin/sacct)
    assert job.done(force_check=True) and job.state == "CANCELLED"


@needs_slurm
@pytest.mark.slow
def test_slurm_ddp_two_tasks_gloo_keeps_mk_copies_identical_across_ranks(tmp_path, job_env):
    import torch

    from mkopt.job import RecipeJob

    launcher = slurm_launcher(tmp_path, tasks_per_node=2, cpus_per_task=1)
    job = launcher.submit(RecipeJob(RECIPE, {"out": str(tmp_path), "steps": 4}))
    ranks = launch.wait(job, timeout_s=180)
    assert [(r["rank"], r["world_size"], r["source"], r["backend"]) for r in ranks] == [(0, 2, "submitit", "gloo"), (1, 2, "submitit", "gloo")]
    first, second = ranks[0]["state"], ranks[1]["state"]
    assert first.keys() == second.keys()
    for key in first:
        assert torch.equal(first[key], second[key]), f"{key} differs across ranks"
    expanded = [v for v in first.values() if v.dim() >= 3]  # [e, out, in] stacks of copies
    assert expanded and all(v.shape[0] == 3 and not torch.equal(v[0], v[1]) for v in expanded)  # MK trained them apart


@needs_slurm
@pytest.mark.slow
def test_slurm_preempted_recipe_job_requeues_and_matches_an_uninterrupted_run(tmp_path, job_env):
    import torch

    from mkopt.job import RecipeJob, load_recipe

    steps = 20
    (tmp_path / "interrupted").mkdir(), (tmp_path / "reference").mkdir()
    threads = torch.get_num_threads()
    try:
        reference = load_recipe(RECIPE).run({"out": str(tmp_path / "reference"), "steps": steps})["state"]
    finally:
        torch.set_num_threads(threads)
    launcher = slurm_launcher(tmp_path)
    job = launcher.submit(RecipeJob(RECIPE, {"out": str(tmp_path / "interrupted"), "steps": steps, "step_sleep_s": 0.2}))
    progress = tmp_path / "interrupted" / "progress.txt"
    deadline = time.monotonic() + 120
    while not (progress.exists() and progress.read_text() and int(progress.read_text()) >= 3):
        assert time.monotonic() < deadline, f"no training progress within 120 s; log: {job.paths.stderr}"
        time.sleep(0.2)
    job._interrupt()  # what SLURM does on preemption: SIGTERM, then USR2 -> checkpoint at a step boundary + requeue
    result = launch.wait(job, timeout_s=240, poll_s=0.5, state_poll_s=2)["state"]
    starts = (tmp_path / "interrupted" / "starts.txt").read_text().splitlines()
    assert len(starts) == 2 and starts[0] == "start at step 0" and starts[1] != starts[0], starts  # one requeue, resumed mid-run
    assert result.keys() == reference.keys()
    for key in reference:
        assert torch.equal(result[key], reference[key]), f"{key} differs from the uninterrupted run"


@needs_slurm
@pytest.mark.slow
def test_slurm_resnet50_recipe_runs_ddp_over_two_tasks_and_deploys_a_torchvision_resnet50(tmp_path, job_env):
    """The issue's end-to-end check: mkopt/recipes/resnet50_imagenet.py (MK, width 8, 32 px) as a 2-task SLURM job."""
    import torch
    import torchvision
    from PIL import Image

    from mkopt.job import RecipeJob, load_recipe

    recipe_path = ROOT / "mkopt" / "recipes" / "resnet50_imagenet.py"
    images = tmp_path / "images"
    g = torch.Generator().manual_seed(0)
    for split, count in (("train", 4), ("val", 1)):  # one global batch of 8 per epoch
        for c in range(3):
            folder = images / split / f"n0000{c}"
            folder.mkdir(parents=True)
            for i in range(count):
                pixels = torch.randint(0, 256, (40, 40, 3), generator=g, dtype=torch.uint8).numpy()
                Image.fromarray(pixels).save(folder / f"{i}.JPEG", quality=90)
    overrides = [
        f"data.root={images}", f"out={tmp_path / 'run'}", "data.image_size=32", "data.eval_resize=36", "data.workers=0",
        "data.eval_batch=4", "model.num_classes=3", "model.width_per_group=8", "optim.batch_size=8", "schedule.epochs=2",
        "schedule.milestones=[1]", "device=cpu", "amp=off", "deterministic=true", "log.progress=false", "mk.sampler_compile=false",
    ]  # fmt: skip
    config = load_recipe(recipe_path).load_config(ROOT / "mkopt" / "recipes" / "configs" / "resnet50_imagenet" / "mk.yaml", overrides)
    launcher = slurm_launcher(tmp_path, tasks_per_node=2, cpus_per_task=1)
    ranks = launch.wait(launcher.submit(RecipeJob(recipe_path, config)), timeout_s=300)
    assert [r["world_size"] for r in ranks] == [2, 2] and ranks[0]["steps"] == 2 and ranks[0]["method"] == "mk"
    plain = torchvision.models.resnet50(num_classes=3, width_per_group=8)
    plain.load_state_dict(torch.load(tmp_path / "run" / "model_deployed.pt", weights_only=True), strict=True)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(pytest.main([__file__, "-q"]))


def test_a_profile_built_in_python_is_type_checked_too():
    with pytest.raises(ConfigError, match=r"cluster setting cpus_per_task='four' must be int"):
        launch.ClusterProfile(cpus_per_task="four")
    with pytest.raises(ConfigError, match=r"cluster setting setup=.*must be list\[str\]"):
        launch.ClusterProfile(setup=[1, {"a": 2}])
    assert launch.ClusterProfile(setup=("module load cuda",)).setup == ("module load cuda",)
