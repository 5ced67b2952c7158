"""The cluster commands of `seminar`: submit, tune, jobs, models.

    seminar submit SPEC --address http://HEAD:8265 [--set k=v] [--follow]
    seminar tune SPEC [--address URL] [--registry PREFIX]
    seminar jobs list | status ID | logs ID [-f] | stop ID
    seminar models list | show NAME[/VERSION] | publish RUN --name NAME  [--registry PREFIX]
    seminar models export MODEL --out model.onnx

`register(app)` adds them to the `seminar` app (`jobs/main.py`). Specs are validated in full here, before
anything reaches a cluster; cluster and registry failures print one line, not a trace.
"""

from __future__ import annotations

import json
import os
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Optional

import typer
from rich.table import Table

from seminar.cli import console, errors, fail, spec_from_options

ADDRESS_HELP = "the cluster's Jobs API (dashboard) URL, e.g. http://HEAD:8265; default: $RAY_API_SERVER_ADDRESS, $RAY_ADDRESS"
PYTHON_HELP = "the Python on the cluster with this project's dependencies (default: python on the head's PATH)"
REGISTRY_HELP = "model registry: a local directory or s3://bucket/prefix; default: $SEMINAR_REGISTRY, else runs/registry"

jobs_app = typer.Typer(no_args_is_help=True, rich_markup_mode=None, help="Ray jobs on a cluster: list, status, logs, stop.")
models_app = typer.Typer(no_args_is_help=True, rich_markup_mode=None, help="Published models in a registry.")


def _remote_address(address: Optional[str]) -> Optional[str]:
    """The Jobs API URL to submit to, if the user named one (flag or environment)."""
    if address:
        return address
    for var in ("RAY_API_SERVER_ADDRESS", "RAY_ADDRESS"):
        value = os.environ.get(var, "")
        if value.startswith(("http://", "https://")):
            return value
    return None


# --------------------------------------------------------------------------------------
# submit, tune
# --------------------------------------------------------------------------------------


def submit(
    spec: Path = typer.Argument(..., help="job spec (YAML)"),
    address: Optional[str] = typer.Option(None, "--address", "-a", help=ADDRESS_HELP),
    overrides: list[str] = typer.Option([], "--set", "-s", metavar="KEY=VALUE", help="override a spec field: key=value (repeatable)"),
    follow: bool = typer.Option(False, "--follow", "-f", help="stream the job's logs until it ends"),
    python: str = typer.Option("python", "--python", help=PYTHON_HELP),
) -> None:
    """Submit a training job to a Ray cluster (Ray Jobs API); prints the job id."""
    from jobs.submit import submit_spec

    cfg = spec_from_options(spec, overrides)
    with jobs_api(address) as client:
        job = submit_spec(cfg, address, kind="train", client=client, python=python)
    _print_submitted(job)
    if follow:
        _follow(client, job.job_id)


def tune(
    spec: Path = typer.Argument(..., help="job spec (YAML) with a sweep section"),
    address: Optional[str] = typer.Option(None, "--address", "-a",
                                          help=ADDRESS_HELP + ". Given: submit the sweep as a job; "
                                               "else run it here (on $RAY_ADDRESS's cluster or a local Ray)"),
    overrides: list[str] = typer.Option([], "--set", "-s", metavar="KEY=VALUE", help="override a spec field: key=value (repeatable)"),
    registry: Optional[str] = typer.Option(None, "--registry", help=REGISTRY_HELP + "; default: sweep.registry"),
    name: Optional[str] = typer.Option(None, "--name", help="sweep name; default: sweep.name or a new one"),
    follow: bool = typer.Option(False, "--follow", "-f", help="(with --address) stream the job's logs"),
    publish: bool = typer.Option(True, "--publish/--no-publish", help="publish the best checkpoint"),
    python: str = typer.Option("python", "--python", help="(with --address) " + PYTHON_HELP),
) -> None:
    """Hyperparameter search with Ray Tune and ASHA; publishes the best model."""
    if registry:
        overrides = [*overrides, f"sweep.registry={registry}"]
    if name:
        overrides = [*overrides, f"sweep.name={name}"]
    cfg = spec_from_options(spec, overrides)
    if cfg.sweep is None or not cfg.sweep.params:
        fail(f"{spec}: sweep.params: name at least one field to sweep (see jobs/configs/sweep.yaml)", code=2)

    remote = _remote_address(address)
    if remote:
        from jobs.submit import submit_spec

        with jobs_api(remote) as client:
            job = submit_spec(cfg, remote, kind="tune", client=client, python=python)
        _print_submitted(job)
        if follow:
            _follow(client, job.job_id)
        return

    from cluster.preflight import PreflightError
    from seminar.registry import RegistryError
    from jobs.sweep import run_sweep

    try:
        # In a submitted job RAY_ADDRESS is the cluster's own (GCS) address.
        result = run_sweep(cfg, address=os.environ.get("RAY_ADDRESS") or None, publish=publish, console=console)
    except (PreflightError, RegistryError, ValueError) as e:
        fail(str(e), code=1)
    if result.best is None:
        raise typer.Exit(1)


def _print_submitted(job) -> None:
    console.print(f"submitted job [bold]{job.job_id}[/] to {job.address}")
    console.print(f"  results:   {job.storage}")
    console.print(f"  logs:      seminar jobs logs {job.job_id} -f   (dashboard: {job.address}/#/jobs/{job.job_id})")
    # The bare id last, alone on its line, for scripts: `seminar submit ... | tail -1`.
    print(job.job_id, flush=True)


def _follow(client, job_id: str) -> None:
    """Stream a job's logs until it ends; exit 1 unless it succeeded."""
    from jobs.submit import ClusterError, follow_logs

    t0 = time.perf_counter()
    try:
        status = follow_logs(client, job_id)
    except ClusterError as e:
        fail(str(e), code=1)
    except KeyboardInterrupt:
        errors.print(f"stopped following; the job keeps running (seminar jobs stop {job_id} ends it)")
        raise typer.Exit(130)
    colour = "green" if status == "SUCCEEDED" else "red"
    console.print(f"job {job_id}: [{colour}]{status}[/] after {time.perf_counter() - t0:.0f} s")
    if status != "SUCCEEDED":
        raise typer.Exit(1)


# --------------------------------------------------------------------------------------
# jobs
# --------------------------------------------------------------------------------------


@contextmanager
def jobs_api(address: Optional[str], job_id: Optional[str] = None):
    """A Jobs API client for the cluster at `address`; what goes wrong there (unreachable,
    refused token, unknown job) ends the command with one `error:` line."""
    from jobs.submit import ClusterError, cluster_errors, connect

    try:
        client = connect(address)
        with cluster_errors(client.get_address(), job_id):
            yield client
    except ClusterError as e:
        fail(str(e), code=1)


def _when(ms: Optional[int]) -> str:
    return "-" if not ms else time.strftime("%m-%d %H:%M:%S", time.localtime(ms / 1000))


@jobs_app.command("list")
def jobs_list(address: Optional[str] = typer.Option(None, "--address", "-a", help=ADDRESS_HELP)) -> None:
    """Jobs on the cluster, newest first."""
    with jobs_api(address) as client:
        jobs = client.list_jobs()
    table = Table(title=f"jobs on {client.get_address()}")
    table.add_column("job id", no_wrap=True)
    for col in ("status", "kind", "started"):
        table.add_column(col, no_wrap=True)
    for job in sorted(jobs, key=lambda j: j.start_time or 0, reverse=True):
        kind = (job.metadata or {}).get("seminar_kind", "-")  # jobs not submitted by seminar: "-"
        table.add_row(job.submission_id or job.job_id or "-", str(job.status.value), kind, _when(job.start_time))
    console.print(table)


@jobs_app.command("status")
def jobs_status(job_id: str = typer.Argument(...),
                address: Optional[str] = typer.Option(None, "--address", "-a", help=ADDRESS_HELP)) -> None:
    """A job's status, message, and where its results go."""
    with jobs_api(address, job_id) as client:
        info = client.get_job_info(job_id)
    meta = info.metadata or {}
    console.print(f"job [bold]{job_id}[/]: {info.status.value}")
    if info.message:
        console.print(f"  message:    {info.message}")
    console.print(f"  entrypoint: {info.entrypoint}")
    console.print(f"  started:    {_when(info.start_time)}   ended: {_when(info.end_time)}")
    if "seminar_run" in meta:
        console.print(f"  results:    {meta['seminar_storage'].rstrip('/')}/{meta['seminar_run']}")


@jobs_app.command("logs")
def jobs_logs(job_id: str = typer.Argument(...),
              follow: bool = typer.Option(False, "--follow", "-f", help="stream until the job ends"),
              address: Optional[str] = typer.Option(None, "--address", "-a", help=ADDRESS_HELP)) -> None:
    """A job's logs (driver output)."""
    with jobs_api(address, job_id) as client:
        if not follow:
            sys.stdout.write(client.get_job_logs(job_id))
            return
    _follow(client, job_id)  # outside jobs_api: its exit code is the job's


@jobs_app.command("stop")
def jobs_stop(job_id: str = typer.Argument(...),
              address: Optional[str] = typer.Option(None, "--address", "-a", help=ADDRESS_HELP)) -> None:
    """Stop a running job."""
    with jobs_api(address, job_id) as client:
        stopped = client.stop_job(job_id)
    console.print(f"job {job_id}: " + ("stop requested" if stopped else "already finished"))


# --------------------------------------------------------------------------------------
# models
# --------------------------------------------------------------------------------------


@models_app.command("list")
def models_list(registry: Optional[str] = typer.Option(None, "--registry", "-r", help=REGISTRY_HELP)) -> None:
    """Models and their versions."""
    from seminar.metrics import SERVED_MIOU
    from seminar.registry import ModelRegistry, RegistryError

    try:
        reg = ModelRegistry(registry)
        rows = [(m, reg.versions(m)) for m in reg.models()]
        stray = reg.stray_entries()
    except RegistryError as e:
        fail(str(e), code=1)
    table = Table(title=f"models in {reg.uri}")
    for col in ("model", "versions", "latest", "created", "val/miou", "click source"):
        table.add_column(col)
    unreadable = []
    for model, versions in rows:
        try:  # one broken version does not hide the other models
            meta = reg.get(model, versions[-1]).metadata
        except RegistryError as e:
            unreadable.append(str(e))
            table.add_row(model, ", ".join(map(str, versions)), str(versions[-1]), "-", "-", "unreadable")
            continue
        miou = (meta.get("metrics") or {}).get(SERVED_MIOU)
        table.add_row(model, ", ".join(map(str, versions)), str(versions[-1]), str(meta.get("created", "-")),
                      f"{miou:.4f}" if isinstance(miou, (int, float)) else "-", str(meta.get("click_source")))
    console.print(table)
    for problem in unreadable:
        errors.print(f"warning: {problem}", highlight=False, soft_wrap=True)
    for entry in stray:
        errors.print(f"warning: {reg.uri}: {entry!r} is not a model name; left out", highlight=False, soft_wrap=True)
    if not rows:
        console.print("no models yet: `seminar models publish RUN --name NAME` or `seminar tune SPEC` add one")


@models_app.command("publish")
def models_publish(
    source: str = typer.Argument(..., help="a run directory (its latest checkpoint) or a checkpoint, local or s3://"),
    name: str = typer.Option(..., "--name", "-n", help="model name in the registry"),
    registry: Optional[str] = typer.Option(None, "--registry", "-r", help=REGISTRY_HELP),
    with_optimizer: bool = typer.Option(False, "--with-optimizer", help="keep the resume state (optimizer, look-ahead)"),
) -> None:
    """Publish a trained model as the next version of NAME (weights only, checksummed)."""
    from seminar import checkpoint
    from seminar.registry import ModelRegistry, RegistryError

    try:
        found = checkpoint.resolve(source)
        mv = ModelRegistry(registry).publish(found, name, include_optimizer=with_optimizer)
    except FileNotFoundError as e:
        fail(str(e))
    except RegistryError as e:
        fail(str(e), code=1)
    size = sum(f["bytes"] for f in mv.metadata["files"].values())
    console.print(f"published [bold]{mv.model}/{mv.version}[/] ({size / 2**20:.1f} MiB, from {found}) at {mv.uri}",
                  soft_wrap=True)
    console.print(f"  serve it: seminar serve {mv.model}/{mv.version} --registry {ModelRegistry(registry).uri}",
                  soft_wrap=True)


@models_app.command("export")
def models_export(
    model: str = typer.Argument(..., help="checkpoint, run directory or registry name, as `seminar serve` takes"),
    out: str = typer.Option(..., "--out", "-o", help="the .onnx file to write, local or s3://"),
    fmt: str = typer.Option("onnx", "--format", help="onnx (the only format)"),
    which: Optional[str] = typer.Option(None, "--which", help="best_teacher | primary_teacher | primary_student | teacher_ensemble"),
    registry: Optional[str] = typer.Option(None, "--registry", "-r", help=REGISTRY_HELP),
) -> None:
    """Write the served network as one ONNX file (probabilities out), with its classes, palette and preprocessing."""
    from seminar import export, storage
    from seminar.predict import Segmenter
    from seminar.registry import resolve_model

    if fmt != "onnx":
        fail(f"--format: only onnx is supported, got {fmt!r}")
    if not out.endswith(".onnx"):
        fail(f"--out: the file name must end in .onnx, got {out!r}")
    try:
        resolved = resolve_model(model, registry)
        segmenter = Segmenter.load(resolved.checkpoint, which)
    except Exception as e:  # noqa: BLE001 - registry, storage and file errors alike
        fail(f"cannot load model {model!r}: {' '.join(str(e).split())}")
    if segmenter.runtime == "onnx":
        fail(f"{model} is an exported graph already")
    graph = export.export_onnx(segmenter.network.network, export.graph_metadata(segmenter.meta, segmenter.which))
    try:
        storage.write_bytes(out, graph)
    except OSError as e:
        fail(f"--out: cannot write {out}: {e}")
    console.print(f"exported {segmenter.version} ({segmenter.which}) to {out} ({len(graph) / 2**20:.1f} MiB); "
                  f"serve it: seminar serve {out}", soft_wrap=True)


@models_app.command("show")
def models_show(
    model: str = typer.Argument(..., help="NAME or NAME/VERSION (default: the latest version)"),
    registry: Optional[str] = typer.Option(None, "--registry", "-r", help=REGISTRY_HELP),
    verify: bool = typer.Option(False, "--verify", help="also fetch the files and check their sha256"),
    as_json: bool = typer.Option(False, "--json", help="print metadata.json as it is"),
) -> None:
    """A model version's metadata: metrics, classes, click source, spec, files."""
    from seminar.registry import ModelRegistry, RegistryError, parse_model_ref

    try:
        name, version = parse_model_ref(model)
        reg = ModelRegistry(registry)
        mv = reg.get(name, version)
        local = reg.fetch(name, mv.version) if verify else None
    except RegistryError as e:
        fail(str(e), code=1)
    meta = mv.metadata
    if as_json:
        print(json.dumps(meta, indent=2))
        return
    console.print(f"[bold]{mv.model}/{mv.version}[/]  {mv.uri}")
    console.print(f"  created:      {meta.get('created')}")
    console.print(f"  code version: {meta.get('code_version')}")
    console.print(f"  click source: {meta.get('click_source')}")
    console.print(f"  classes:      {', '.join(meta.get('classes') or [])}")
    console.print(f"  students:     {meta.get('num_students')}   step: {meta.get('step')}")
    if meta.get("sweep"):
        sw = meta["sweep"]
        params = ", ".join(f"{k}={v}" for k, v in (sw.get("params") or {}).items())
        console.print(f"  sweep:        {sw.get('name')} trial {sw.get('trial_id')} ({params})")
    spec = meta.get("spec") or {}
    method = spec.get("method") or {}
    if method:
        console.print("  method:       " + ", ".join(f"{k}={method[k]}" for k in
                                                   ("ema_decay", "w_ts", "w_ss", "tau", "ss_start") if k in method))
    metrics = Table(title="metrics", show_header=False)
    for key, value in sorted((meta.get("metrics") or {}).items()):
        if key.startswith("val/iou/"):
            continue
        metrics.add_row(key, f"{value:.4f}" if isinstance(value, float) else str(value))
    console.print(metrics)
    files = Table(title="files")
    for col in ("file", "bytes", "sha256"):
        files.add_column(col)
    for rel, info in (meta.get("files") or {}).items():
        files.add_row(rel, str(info.get("bytes")), info.get("sha256", "")[:16] + "...")
    console.print(files)
    if local:
        console.print(f"[green]verified[/]: every file matches its sha256 ({local})")


def register(app: typer.Typer) -> None:
    """Add submit, tune, jobs and models to the `seminar` app."""
    app.command("submit")(submit)
    app.command("tune")(tune)
    app.add_typer(jobs_app, name="jobs")
    app.add_typer(models_app, name="models")
