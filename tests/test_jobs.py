"""The jobs layer: job specs, submission through Ray's Jobs API, sweeps, the model registry.

Fast tests (no Ray) check the spec validation, the CLI's error messages, the job's working
directory and the registry (local and on the moto S3 server). The Ray tests use the
session's token-authenticated `ray start --head` (tests/conftest.py): a submitted tiny
training job whose checkpoint lands on S3, the unauthorised and unreachable cases, and a
4-trial ASHA sweep that publishes its best model.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
import time
from pathlib import Path

import pytest
import ray  # noqa: F401 - imported here, not first inside CliRunner: Ray's log handler keeps that stderr
import yaml
from typer.testing import CliRunner

from seminar.registry import IntegrityError, ModelRegistry, RegistryError, fetch_reference
from seminar.checks import load_checked_spec
from jobs.submit import (JOB_SPEC_ENV, ClusterError, auth_token, for_cluster, resolve_address,
                         job_runtime_env)
from jobs.main import app
from seminar.config import SpecError, load_spec

from conftest import PYTHON, REPO, SHARED_DATA, free_port

CONFIGS = REPO / "jobs" / "configs"
runner = CliRunner()

# A training run of a few seconds: 32x32 synthetic images, batch 2, in-loop data loading.
TINY = {
    "data": {"dataset": "synthetic", "crop_size": [32, 32],
             "synthetic": {"image_size": 32, "num_train": 16, "num_val": 8}},
    "method": {"ss_start": 0, "rampup_steps": 4},
    "optim": {"batch_size": 2, "steps": 4},
    "schedule": {"eval_every": 4, "checkpoint_every": 4, "log_every": 2},
    "resources": {"loader_workers": 0, "max_failures": 0},
}


def write_spec(path: Path, **sections: dict) -> Path:
    """TINY with some sections extended or added, as a YAML file."""
    spec = json.loads(json.dumps(TINY))
    for name, values in sections.items():
        spec.setdefault(name, {}).update(values)
    path.write_text(yaml.safe_dump(spec))
    return path


def one_line_error(result) -> str:
    """The CLI's error: exactly one line starting with 'error:', and no traceback."""
    text = result.output
    assert "Traceback" not in text, text
    lines = [line for line in text.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, text
    return lines[0]


# ---------------------------------------------------------------------------------- specs


@pytest.mark.parametrize("name", ["synthetic", "camvid", "voc", "sweep"])
def test_example_specs_validate_in_full(name):
    cfg = load_checked_spec(CONFIGS / f"{name}.yaml")
    assert cfg.num_workers >= 2
    if name == "sweep":
        assert {"method.ema_decay", "method.w_ts", "method.w_ss", "method.tau", "method.ss_start"} <= set(cfg.sweep.params)


@pytest.mark.parametrize("overrides, field, words", [
    (["method.ema_decay=1.7"], "method.ema_decay", "less than 1"),
    (["optim.steps=many"], "optim.steps", "integer"),
    (["method.tau=-0.1"], "method.tau", "greater than or equal to 0"),
    (["optim.learning_rate=0.1"], "optim.learning_rate", "unknown field"),
    (["students.1.model=deeplabv3plus_vgg16"], "students.1.model", "unknown model"),
    (["data.dataset=camvid", "data.root=/no/such/camvid"], "data.root", "no such directory"),
    (["data.dataset=camvid", f"data.root={SHARED_DATA / 'camvid'}", "data.val_split=test"], "data.val_split",
     "no split file"),
    (["data.dataset=camvid", f"data.root={SHARED_DATA / 'camvid'}", "data.classes=[sky, road]"], "data.classes",
     "has 11"),
    (["data.dataset=voc", f"data.root={SHARED_DATA / 'voc' / 'tiny'}", "data.clicks=/no/clicks.json"], "data.clicks",
     "no such file"),
    (["sweep.params={method.ema_decay: {grid: [0.9, 1.5]}}"], "sweep.params.method.ema_decay", "value 1.5"),
    (["sweep.params={method.momentum: {choice: [0.5]}}"], "sweep.params.method.momentum", "not a field"),
    (["sweep.params={method.tau: {uniform: [0.9, 0.5]}}"], "sweep.params", "low < high"),
    (["sweep.params={method.tau: {gaussian: [0.5, 0.1]}}"], "sweep.params", "expected one of"),
])
def test_invalid_spec_names_the_field(overrides, field, words):
    with pytest.raises(SpecError) as err:
        load_checked_spec(None, overrides)
    message = str(err.value)
    assert f"  {field}:" in message and words in message, message


def test_click_classes_must_fit_the_dataset(tmp_path):
    """A folder dataset of 3 classes with a click of class 5: the click file is named."""
    from seminar.data.clicks import make_click_table, write_click_table

    (tmp_path / "images").mkdir()
    table = make_click_table(["a", "a"], [1.0, 2.0], [1.0, 2.0], [1, 5], [1, 1], "user")
    write_click_table(table, str(tmp_path / "clicks.parquet"))
    with pytest.raises(SpecError) as err:
        load_checked_spec(None, ["data.dataset=folder", f"data.root={tmp_path}",
                                 f"data.clicks={tmp_path / 'clicks.parquet'}", "data.classes=[bg, cat, dog]"])
    assert "data.clicks:" in str(err.value) and "class 5" in str(err.value)


def test_submit_checks_the_spec_before_the_cluster(tmp_path):
    """An invalid spec fails with exit 2 naming the field, without contacting any cluster."""
    spec = write_spec(tmp_path / "bad.yaml", method={"ema_decay": 1.7})
    result = runner.invoke(app, ["submit", str(spec), "--address", f"http://127.0.0.1:{free_port()}"])
    assert result.exit_code == 2
    assert "method.ema_decay" in result.output and "cannot reach" not in result.output


def test_unreachable_cluster_is_one_line(tmp_path):
    spec = write_spec(tmp_path / "ok.yaml")
    address = f"http://127.0.0.1:{free_port()}"
    for args in (["submit", str(spec), "--address", address], ["jobs", "list", "--address", address],
                 ["jobs", "logs", "some-job", "--address", address]):
        result = runner.invoke(app, args)
        assert result.exit_code == 1
        assert f"cannot reach the Ray cluster at {address}" in one_line_error(result)


def test_address_and_token_come_from_the_usual_places(tmp_path, monkeypatch):
    for var in ("RAY_API_SERVER_ADDRESS", "RAY_ADDRESS", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    assert resolve_address(None) == "http://127.0.0.1:8265"
    monkeypatch.setenv("RAY_ADDRESS", "http://head:8265/")
    assert resolve_address(None) == "http://head:8265"
    assert resolve_address("10.0.0.5:8265") == "http://10.0.0.5:8265"
    with pytest.raises(ClusterError, match="Ray Client address"):
        resolve_address("ray://head:10001")

    assert auth_token()[0] is None
    (tmp_path / ".ray").mkdir()
    (tmp_path / ".ray" / "auth_token").write_text("from-home\n")
    assert auth_token() == ("from-home", str(tmp_path / ".ray" / "auth_token"))
    (tmp_path / "tok").write_text("from-path")
    monkeypatch.setenv("RAY_AUTH_TOKEN_PATH", str(tmp_path / "tok"))
    assert auth_token()[0] == "from-path"
    monkeypatch.setenv("RAY_AUTH_TOKEN", "from-env")
    assert auth_token()[0] == "from-env"


def test_job_runtime_env_is_the_code_and_the_spec(tmp_path):
    cfg = for_cluster(load_spec(None, ["storage.path=runs", "data.dataset=camvid",
                                       f"data.root={os.path.relpath(SHARED_DATA / 'camvid')}"]), "run-1")
    assert Path(cfg.storage.path).is_absolute() and Path(cfg.data.root).is_absolute()
    assert cfg.storage.run_name == "run-1"

    env = job_runtime_env(cfg)
    assert Path(env["working_dir"]) == REPO and {".venv", ".git", "runs", "tests/data", "*.pt"} <= set(env["excludes"])
    spec = tmp_path / "spec.yaml"
    spec.write_text(env["env_vars"][JOB_SPEC_ENV])
    assert load_spec(spec) == cfg


# ------------------------------------------------------------------------------- registry


def fake_checkpoint(path: Path, miou: float = 0.5) -> Path:
    """A checkpoint directory as training writes it (the weights are stand-in bytes)."""
    for k in range(2):
        d = path / f"student_{k}"
        d.mkdir(parents=True)
        for name in ("student.pt", "teacher.pt", "optimizer.pt"):
            (d / name).write_bytes(os.urandom(256))
        (d / "state.json").write_text('{"step": 4}')
    meta = {"step": 4, "spec": load_spec(None).model_dump(mode="json"), "classes": ["bg", "a", "b", "c"],
            "palette": [[0, 0, 0], [1, 1, 1], [2, 2, 2], [3, 3, 3]], "click_source": "simulated",
            "metrics": {"val/miou": miou}, "version": "run@4", "code_version": "0.1.0", "num_students": 2}
    (path / "meta.json").write_text(json.dumps(meta))
    return path


@pytest.fixture(params=["local", "s3"])
def registry_uri(request, tmp_path):
    if request.param == "local":
        return str(tmp_path / "registry")
    bucket = request.getfixturevalue("s3_bucket")
    return f"s3://{bucket}/models"


def test_registry_versions_metadata_and_integrity(registry_uri, tmp_path, monkeypatch):
    monkeypatch.setenv("SEMINAR_CACHE", str(tmp_path / "cache"))
    reg = ModelRegistry(registry_uri)
    first = reg.publish(fake_checkpoint(tmp_path / "ckpt1", 0.4), "demo", metrics={"val/miou": 0.41})
    second = reg.publish(fake_checkpoint(tmp_path / "ckpt2", 0.6), "demo", include_optimizer=True)
    assert (first.version, second.version) == (1, 2)
    assert reg.models() == ["demo"] and reg.versions("demo") == [1, 2]

    meta = reg.get("demo").metadata  # the latest
    assert meta["version"] == 2 and meta["metrics"]["val/miou"] == 0.6
    assert meta["classes"] == ["bg", "a", "b", "c"] and meta["click_source"] == "simulated"
    assert meta["spec"]["method"]["ema_decay"] == 0.99 and meta["code_version"] and meta["created"]
    assert set(meta["files"]) == {"meta.json", *(f"student_{k}/{n}" for k in range(2)
                                                 for n in ("student.pt", "teacher.pt", "optimizer.pt", "state.json"))}
    assert reg.get("demo", 1).metadata["metrics"]["val/miou"] == 0.41
    assert "student_0/optimizer.pt" not in reg.get("demo", 1).metadata["files"]  # weights only by default

    local = fetch_reference("demo/1", registry=registry_uri)
    assert (local / "meta.json").is_file() and (local / "student_1" / "teacher.pt").is_file()
    assert fetch_reference(f"{registry_uri}/demo") == fetch_reference(f"{registry_uri}/demo/2")
    assert fetch_reference(str(tmp_path / "ckpt1")) == tmp_path / "ckpt1"  # a plain checkpoint dir
    if not registry_uri.startswith("s3://"):  # a relative path to a model's directory, as the README writes it
        monkeypatch.chdir(tmp_path)
        assert fetch_reference("registry/demo").resolve() == fetch_reference(f"{registry_uri}/demo/2").resolve()

    # Tamper with one file of version 1 where it is stored: reading it names the file.
    if registry_uri.startswith("s3://"):
        import boto3

        bucket, prefix = registry_uri[5:].split("/", 1)
        boto3.client("s3").put_object(Bucket=bucket, Key=f"{prefix}/demo/1/student_0/teacher.pt", Body=b"evil")
        for cached in (tmp_path / "cache").rglob("teacher.pt"):  # and in the local cache
            cached.write_bytes(b"evil")
    else:
        (Path(registry_uri) / "demo" / "1" / "student_0" / "teacher.pt").write_bytes(b"evil")
    with pytest.raises(IntegrityError, match="student_0/teacher.pt"):
        fetch_reference("demo/1", registry=registry_uri)
    with pytest.raises(RegistryError, match="no version 7"):
        fetch_reference("demo/7", registry=registry_uri)
    with pytest.raises(RegistryError, match="no model 'nope'"):
        reg.get("nope")


@pytest.mark.parametrize("bad_file", ["../../../../escaped.pt", "/tmp/absolute.pt", "student_0/../../x.pt", ""])
def test_registry_refuses_metadata_naming_files_outside_the_version(registry_uri, tmp_path, monkeypatch, bad_file):
    """A crafted metadata.json cannot make a fetch write (or a check read) outside the
    version: refused by name before anything is written."""
    monkeypatch.setenv("SEMINAR_CACHE", str(tmp_path / "cache"))
    reg = ModelRegistry(registry_uri)
    version = reg.publish(fake_checkpoint(tmp_path / "ckpt", 0.4), "demo")
    metadata = dict(version.metadata)
    metadata["files"] = {**metadata["files"], bad_file: {"sha256": "0" * 64, "bytes": 4}}
    reg.store.put_bytes(json.dumps(metadata).encode(), "demo", "1", "metadata.json")
    before = sorted(p for p in tmp_path.rglob("*"))
    with pytest.raises(IntegrityError, match="not a plain relative path"):
        fetch_reference("demo/1", registry=registry_uri)
    assert sorted(p for p in tmp_path.rglob("*")) == before
    assert not Path("/tmp/absolute.pt").exists()


@pytest.mark.parametrize("ref", ["good/../../outside/evil/1", "evil\\..\\..\\x/1", "a\\..\\b"])
def test_registry_model_names_stay_inside_the_registry(tmp_path, ref):
    with pytest.raises(RegistryError, match="model name|model reference"):
        fetch_reference(ref, registry=str(tmp_path / "registry"))


def test_registry_refuses_a_link_out_of_the_version(tmp_path):
    registry = tmp_path / "registry"
    ModelRegistry(str(registry)).publish(fake_checkpoint(tmp_path / "ckpt", 0.4), "demo")
    teacher = registry / "demo" / "1" / "student_0" / "teacher.pt"
    outside = tmp_path / "outside.pt"
    outside.write_bytes(teacher.read_bytes())  # same bytes, same sha256: only the link is wrong
    teacher.unlink()
    teacher.symlink_to(outside)
    with pytest.raises(IntegrityError, match="link to outside"):
        fetch_reference("demo/1", registry=str(registry))


def test_models_cli_list_show(tmp_path):
    registry = str(tmp_path / "registry")
    # a run directory publishes its latest checkpoint, weights only
    run = tmp_path / "runs" / "some-run"
    fake_checkpoint(run / "checkpoints" / "step_0000002", 0.55)
    published = runner.invoke(app, ["models", "publish", str(run), "--name", "demo", "--registry", registry])
    assert published.exit_code == 0 and "demo/1" in published.output, published.output
    files = ModelRegistry(registry).get("demo", 1).metadata["files"]
    assert "student_0/teacher.pt" in files and not any(f.endswith("optimizer.pt") for f in files)
    nothing = runner.invoke(app, ["models", "publish", str(tmp_path / "runs"), "--name", "x", "--registry", registry])
    assert nothing.exit_code == 2 and "not a checkpoint" in nothing.output
    listed = runner.invoke(app, ["models", "list", "--registry", registry])
    assert listed.exit_code == 0 and "demo" in listed.output and "0.5500" in listed.output
    shown = runner.invoke(app, ["models", "show", "demo", "--registry", registry, "--verify"])
    assert shown.exit_code == 0, shown.output
    assert "demo/1" in shown.output and "simulated" in shown.output and "verified" in shown.output
    missing = runner.invoke(app, ["models", "show", "demo/3", "--registry", registry])
    assert missing.exit_code == 1 and "no version 3" in one_line_error(missing)


def test_a_runs_final_evaluation_is_the_report_at_its_last_step(tmp_path):
    from seminar.history import append_history
    from seminar.runs import read_run

    run = str(tmp_path / "some-run")
    fake_checkpoint(tmp_path / "some-run" / "checkpoints" / "step_0000004")
    steps = load_spec(None).optim.steps
    append_history(run, {"step": 4, "val/miou": 0.1})
    assert read_run(run).final_evaluation is None  # not at its last step yet
    append_history(run, {"step": steps, "val/miou": 0.2})
    append_history(run, {"step": steps, "val/miou": 0.3})  # reported again after a resume: the last report counts
    assert read_run(run).final_evaluation == {"step": steps, "val/miou": 0.3}
    no_checkpoint = str(tmp_path / "no-checkpoint")
    append_history(no_checkpoint, {"step": steps, "val/miou": 0.3})
    assert read_run(no_checkpoint).final_evaluation is None  # its number of steps is unknown


# ------------------------------------------------------------------- the Ray cluster (jobs)


@pytest.mark.slow
def test_submit_tiny_job_with_token_auth_and_checkpoint_on_s3(ray_cluster, s3_bucket, tmp_path):
    """`seminar submit --follow` against the token-authenticated head: the job succeeds,
    its logs stream back, and its checkpoint is on the S3 bucket."""
    import boto3

    spec = write_spec(tmp_path / "tiny.yaml", storage={"path": f"s3://{s3_bucket}/runs"})
    t0 = time.perf_counter()
    # The cluster's python is this venv's (not first on the PATH the test cluster inherited).
    result = runner.invoke(app, ["submit", str(spec), "--address", ray_cluster.dashboard_url, "--follow",
                                 "--python", PYTHON])
    wall_s = time.perf_counter() - t0
    print(f"\nsubmitted tiny job: {wall_s:.1f} s wall, submit to SUCCEEDED")
    assert result.exit_code == 0, result.output
    job_id = [line for line in result.output.splitlines() if line.startswith("submitted job")][0].split()[2]
    assert "SUCCEEDED" in result.output
    assert "checkpoint:" in result.output  # the driver's summary, streamed back from the cluster

    keys = [o["Key"] for o in boto3.client("s3").list_objects_v2(Bucket=s3_bucket, Prefix=f"runs/{job_id}/")
            .get("Contents", [])]
    metas = [k for k in keys if k.endswith("/meta.json")]
    assert metas, keys
    assert any(k.endswith("student_1/teacher.pt") for k in keys)

    status = runner.invoke(app, ["jobs", "status", job_id, "--address", ray_cluster.dashboard_url])
    assert status.exit_code == 0 and "SUCCEEDED" in status.output and f"s3://{s3_bucket}/runs/{job_id}" in status.output
    listed = runner.invoke(app, ["jobs", "list", "--address", ray_cluster.dashboard_url])
    assert job_id in listed.output
    logs = runner.invoke(app, ["jobs", "logs", job_id, "--address", ray_cluster.dashboard_url])
    assert logs.exit_code == 0 and "checkpoint:" in logs.output
    # the job's logs hold its progress, printed by the driver while the workers trained
    progress = re.search(r"^step \d+/\d+ \(\d+%, eta \d+m\d\ds\) .*s0 sup \d", logs.output, re.M)
    assert progress and progress.start() < logs.output.index("checkpoint:"), logs.output
    stop = runner.invoke(app, ["jobs", "stop", "no-such-job", "--address", ray_cluster.dashboard_url])
    assert stop.exit_code == 1 and "no job 'no-such-job'" in one_line_error(stop)


def test_job_working_dir_is_the_code_without_data(ray_cluster, tmp_path):
    """What Ray uploads with job_runtime_env, seen from a job: the code and the spec, without
    environments, runs, test data or weights."""
    from jobs.submit import connect, wait_for_job

    cfg = for_cluster(load_spec(None, [f"storage.path={tmp_path}"]), "run-wd")
    lister = ("import os, json; from pathlib import Path; "
              "files = [p.as_posix() for p in Path('.').rglob('*') if p.is_file()]; "
              "print('FILES', json.dumps({'files': files, 'bytes': sum(os.path.getsize(f) for f in files), "
              f"'spec': os.environ['{JOB_SPEC_ENV}']}}))")
    client = connect(ray_cluster.dashboard_url)
    job_id = client.submit_job(entrypoint=f"{PYTHON} -c {shlex.quote(lister)}", runtime_env=job_runtime_env(cfg))
    assert wait_for_job(client, job_id, timeout_s=120) == "SUCCEEDED", client.get_job_logs(job_id)
    listing = json.loads(client.get_job_logs(job_id).split("FILES ", 1)[1].splitlines()[0])
    files = set(listing["files"])
    assert {"seminar/cli.py", "cluster/trainer.py", "jobs/job.py", "pyproject.toml"} <= files
    assert not any(f.split("/")[0] in (".git", ".venv", "runs") or f.startswith("tests/data") or "__pycache__" in f
                   or f.endswith((".pt", ".png", ".parquet")) for f in files), sorted(files)
    assert listing["bytes"] < 5 * 2**20, f"working dir of {listing['bytes'] / 2**20:.1f} MiB"
    spec = tmp_path / "spec.yaml"
    spec.write_text(listing["spec"])
    assert load_spec(spec) == cfg


def _jobs_list_in_subprocess(address: str, env_changes: dict[str, str | None]) -> subprocess.CompletedProcess:
    # Ray caches the auth token per process: another token needs another process.
    env = {k: v for k, v in os.environ.items() if k not in env_changes}
    env.update({k: v for k, v in env_changes.items() if v is not None})
    return subprocess.run([PYTHON, "-m", "jobs.main", "jobs", "list", "--address", address],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=120)


def test_unauthorised_cluster_is_one_line(ray_cluster, tmp_path):
    wrong = _jobs_list_in_subprocess(ray_cluster.dashboard_url, {"RAY_AUTH_TOKEN": "not-the-token"})
    assert wrong.returncode == 1 and "Traceback" not in wrong.stderr
    assert "rejected the auth token from RAY_AUTH_TOKEN" in wrong.stderr
    assert len(wrong.stderr.strip().splitlines()) == 1, wrong.stderr

    none = _jobs_list_in_subprocess(ray_cluster.dashboard_url,
                                    {"RAY_AUTH_TOKEN": None, "RAY_AUTH_TOKEN_PATH": None, "HOME": str(tmp_path)})
    assert none.returncode == 1 and "requires an auth token" in none.stderr, none.stderr

    # The token from a file, and no RAY_AUTH_MODE on this side: still let in.
    (tmp_path / "token").write_text(ray_cluster.token)
    ok = _jobs_list_in_subprocess(ray_cluster.dashboard_url, {"RAY_AUTH_TOKEN": None, "RAY_AUTH_MODE": None,
                                                              "RAY_AUTH_TOKEN_PATH": str(tmp_path / "token")})
    assert ok.returncode == 0, ok.stderr


# ------------------------------------------------------------------------------- the sweep


def test_sweep_on_a_cluster_too_small_for_one_trial_fails_at_once(ray_session, tmp_path, monkeypatch):
    """The test cluster has 8 CPUs; a trial of 2 workers with 5 CPUs each cannot be placed:
    `seminar tune` says so, naming the demand, instead of waiting for ever."""
    spec = write_spec(tmp_path / "sweep.yaml", resources={"cpus_per_worker": 5},
                      storage={"path": str(tmp_path / "runs")},
                      sweep={"params": {"optim.lr": {"grid": [1e-3, 1e-2]}}})
    import ray.tune

    def no_tuner(*args, **kwargs):
        raise AssertionError("a Tuner was built: the refusal should have come before any trial")

    monkeypatch.setattr(ray.tune, "Tuner", no_tuner)  # at once: before any trial is started
    result = runner.invoke(app, ["tune", str(spec)])
    assert result.exit_code == 1, result.output
    error = one_line_error(result)
    assert "needs 2 workers" in error and "CPU=5 each" in error and "can host only 1" in error, error
    assert not (tmp_path / "runs").exists()


# A scripted trial: fixed scores per learning rate, one per evaluation, reported as the real
# trial reports them (every student's metrics, the checkpoint path), without training.
SCRIPTED_SCORES = {1e-3: [0.50, 0.55], 2e-3: [0.60, 0.70], 3e-3: [0.10, 0.90], 4e-3: [0.20, 0.95]}


def scripted_trial(config: dict, base_spec: dict, runs_path: str) -> None:
    from ray import tune

    lr = config["optim.lr"]
    for i, score in enumerate(SCRIPTED_SCORES[lr]):
        step = 8 * (i + 1)
        tune.report({"val/miou": score, "step": step, "s0/val_miou_teacher": score, "s1/val_miou_teacher": score / 2,
                     "s1/loss": 1.0, "checkpoint_path": f"{runs_path}/lr-{lr:g}/checkpoint_{step}"})


ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # Tune's trial actors cannot import this module


@pytest.mark.slow
def test_sweep_asha_stops_the_trials_that_trail_at_its_rung(ray_session, tmp_path, monkeypatch):
    """ASHA's decisions, deterministically: scripted trials (fixed scores) one at a time, in grid
    order, grace 1 evaluation, reduction 2. At the first evaluation 0.50 meets no cut-off and
    0.60 meets 0.50: both run on; 0.10 meets the median of (0.50, 0.60) and 0.20 that of (0.50,
    0.60, 0.10): both stopped, although they would have scored best at the second (0.90, 0.95).
    The best finished trial (0.70) is the sweep's best."""
    import io

    from rich.console import Console

    import jobs.sweep
    from jobs.sweep import run_sweep

    monkeypatch.setattr(jobs.sweep, "train_trial", scripted_trial)
    console = Console(file=io.StringIO(), width=200)
    cfg = load_spec(write_spec(
        tmp_path / "sweep.yaml",
        optim={"batch_size": 2, "steps": 16},
        schedule={"eval_every": 8, "checkpoint_every": 8, "log_every": 4},
        storage={"path": str(tmp_path / "runs")},
        sweep={"params": {"optim.lr": {"grid": list(SCRIPTED_SCORES)}}, "num_samples": 1, "grace_period": 1,
               "reduction_factor": 2, "max_concurrent": 1}))
    result = run_sweep(cfg, name="scripted-sweep", console=console, publish=False)
    printed = console.file.getvalue()
    by_lr = {t.params["optim.lr"]: t for t in result.trials}
    assert sorted(by_lr) == sorted(SCRIPTED_SCORES) and all(t.status == "TERMINATED" for t in result.trials), printed
    assert {lr for lr, t in by_lr.items() if t.stopped_early} == {3e-3, 4e-3}, result.trials
    assert [by_lr[lr].evaluations for lr in sorted(by_lr)] == [2, 2, 1, 1]
    assert [by_lr[lr].value("val/miou") for lr in sorted(by_lr)] == [0.55, 0.70, 0.10, 0.20]
    assert result.best is by_lr[2e-3] and result.best.checkpoint.endswith("lr-0.002/checkpoint_16")
    assert re.search(r"^trial \w+, evaluation 1/2 \(step 8\): val/miou 0\.1000; .*", printed, re.M), printed
    assert Path(result.plot).is_file()


@pytest.mark.slow
def test_sweep_publishes_its_best_trial(ray_session, s3_bucket, tmp_path, monkeypatch):
    """A real sweep, small: 2 trials of 2-worker runs (lr 3e-3 trains, lr 1e-9 does not), ASHA on.
    Whatever ASHA decides (asynchronous: not asserted here), the sweep's best trial - the best
    score among its trials - is the one published to the S3 registry, and it loads. Until the
    sweep says why it waits, something else holds 5 of the cluster's 8 CPUs: the second
    trial's workers wait, and the sweep names their demand against what is free."""
    import io
    import threading

    from ray.util.placement_group import placement_group, remove_placement_group
    from rich.console import Console

    import jobs.sweep
    from jobs.sweep import run_sweep

    monkeypatch.setattr(jobs.sweep, "PENDING_REPORT_S", 3.0)
    holder = placement_group([{"CPU": 5}])
    ray.get(holder.ready(), timeout=600)
    console = Console(file=io.StringIO(), width=200)
    ended = threading.Event()

    def release_when_said():  # or after 10 minutes: a sweep that never says fails, not hangs
        deadline = time.monotonic() + 600
        while "waiting " not in console.file.getvalue() and time.monotonic() < deadline and not ended.wait(0.5):
            pass
        remove_placement_group(holder)

    releaser = threading.Thread(target=release_when_said, daemon=True)
    releaser.start()
    registry = f"s3://{s3_bucket}/models"
    cfg = load_spec(write_spec(
        tmp_path / "sweep.yaml",
        optim={"batch_size": 2, "steps": 16},
        schedule={"eval_every": 8, "checkpoint_every": 8, "log_every": 4},
        storage={"path": str(tmp_path / "runs")},
        sweep={"params": {"optim.lr": {"grid": [3e-3, 1e-9]}}, "num_samples": 1, "grace_period": 1,
               "reduction_factor": 2, "max_concurrent": 2, "registry": registry, "model_name": "tiny"}))
    try:
        result = run_sweep(cfg, name="tiny-sweep", console=console)
    finally:
        ended.set()
        releaser.join()
    printed = console.file.getvalue()
    print(f"\nsweep of {len(result.trials)} trials: {result.wall_s:.1f} s wall (not a check)\n{printed}")
    assert "2 trials of 2 workers (CPU=1 each), 2 at once on this cluster" in printed
    assert re.search(r"^waiting \d+ s for resources: 2 x \{CPU: 1\} \(running trials: \d\); "
                     r"free now: CPU [\d.]+ of 8", printed, re.M), printed

    assert len(result.trials) == 2 and all(t.status == "TERMINATED" for t in result.trials), result.trials
    for t in result.trials:
        # Every student's metrics reach Tune, not only rank 0's student - and they are its
        # own: a ResNet-18 and a MobileNetV2 do not score the same to 16 digits.
        assert {"s0/val_miou_teacher", "s1/val_miou_teacher", "s1/loss"} <= set(t.last)
        assert t.last["s0/val_miou_teacher"] != t.last["s1/val_miou_teacher"], t.last
    assert result.best.value("val/miou") == max(t.value("val/miou") for t in result.trials)
    assert result.best.params["optim.lr"] == 3e-3 and result.best.checkpoint
    assert Path(result.plot).is_file() and Path(result.plot).parent == tmp_path / "runs" / "tiny-sweep"

    published = result.published
    assert (published.model, published.version) == ("tiny", 1)
    assert published.metadata["metrics"]["val/miou"] == pytest.approx(result.best.value("val/miou"))
    assert published.metadata["sweep"]["trial_id"] == result.best.trial_id

    shown = runner.invoke(app, ["models", "show", "tiny", "--registry", registry, "--verify"])
    assert shown.exit_code == 0, shown.output
    assert "tiny/1" in shown.output and "verified" in shown.output and result.best.trial_id in shown.output
    local = fetch_reference("tiny", registry=registry)
    from seminar.predict import Segmenter

    segmenter = Segmenter.load(str(local))
    assert segmenter.classes == ["background", "disk_1", "square_2", "triangle_3"]


# ------------------------------------------------------------------- cluster set-up files


def test_ray_up_config_is_valid_for_this_ray():
    """cluster/ray-cluster.yaml passes the cluster launcher's own schema, with token auth
    and the dashboard on every start command."""
    from ray.autoscaler._private.commands import prepare_config
    from ray.autoscaler._private.util import validate_config

    config = prepare_config(yaml.safe_load((REPO / "cluster" / "ray-cluster.yaml").read_text()))
    validate_config(config)
    head = " ".join(config["head_start_ray_commands"])
    assert "RAY_AUTH_MODE=token" in head and "--include-dashboard=true" in head
    assert "RAY_AUTH_MODE=token" in " ".join(config["worker_start_ray_commands"])
    assert any("pip install" in c and "seminar" in c for c in config["setup_commands"])
    assert config["available_node_types"]["gpu_worker"]["node_config"]["InstanceType"].startswith(("g", "p"))


def test_kuberay_rayjob_runs_a_valid_spec_on_gpu_workers(tmp_path):
    import ray

    docs = list(yaml.safe_load_all((REPO / "cluster" / "kuberay-rayjob.yaml").read_text()))
    config_map = next(d for d in docs if d["kind"] == "ConfigMap")
    job = next(d for d in docs if d["kind"] == "RayJob")
    spec_file = tmp_path / "job_spec.yaml"
    spec_file.write_text(config_map["data"]["job_spec.yaml"])
    cfg = load_spec(spec_file)  # the embedded spec is a valid spec (its data lives on the cluster)
    assert "jobs.main train --config /etc/seminar/job_spec.yaml" in job["spec"]["entrypoint"]

    cluster = job["spec"]["rayClusterSpec"]
    assert cluster["rayVersion"] == ray.__version__ and cluster["authOptions"]["mode"] == "token"
    (gpu_group,) = cluster["workerGroupSpecs"]
    limits = gpu_group["template"]["spec"]["containers"][0]["resources"]["limits"]
    # Every Train worker fits a pod, and there are pods for all of them.
    assert float(limits["nvidia.com/gpu"]) >= cfg.resources.gpus_per_worker > 0
    assert float(limits["cpu"]) >= cfg.resources.cpus_per_worker
    per_pod = int(float(limits["nvidia.com/gpu"]) // cfg.resources.gpus_per_worker)
    assert gpu_group["replicas"] * per_pod >= cfg.num_workers
    mounts = {m["mountPath"] for m in gpu_group["template"]["spec"]["containers"][0]["volumeMounts"]}
    assert "/etc/seminar" in mounts and cfg.data.root.startswith(tuple(mounts))


def test_every_help_screen_is_plain_and_shows_no_flag_types():
    """Every command's --help: exit 0, no '<bool>' after a flag, --set shown as KEY=VALUE."""
    import click
    import typer

    def paths(command: click.Command, prefix: list[str]):
        yield prefix
        for name, sub in getattr(command, "commands", {}).items():
            yield from paths(sub, prefix + [name])

    screens = list(paths(typer.main.get_command(app), []))
    assert ["models", "publish"] in screens and ["runs", "plot"] in screens and ["train"] in screens
    for path in screens:
        shown = runner.invoke(app, [*path, "--help"])
        assert shown.exit_code == 0 and "Usage: " in shown.output, (path, shown.output)
        assert "<bool>" not in shown.output, (path, shown.output)
        if "--set" in shown.output:
            assert "--set KEY=VALUE" in shown.output, (path, shown.output)
