"""`seminar serve MODEL`: host a trained model over HTTP with Ray Serve; `seminar predict`:
segment a folder (serving.predict_folder), without Ray.

    seminar serve runs/<run>/checkpoints/step_0000300            # a checkpoint directory
    seminar serve s3://bucket/runs/<run>/checkpoints/step_0000300
    seminar serve models/seminar/3                                # a registry version
    seminar serve seminar --registry s3://bucket/models           # the latest version there
    seminar serve MODEL --port 8000 --replicas 2 --set infer_size=384 --set max_bytes=4000000

Without --address it starts a local Ray (dashboard on 127.0.0.1) and serves until
Ctrl-C; with --address it deploys onto that cluster (add --detach to leave it running).
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console

from seminar.cli import fail

console = Console()


def register(app: typer.Typer) -> None:
    app.command("serve")(serve_command)
    app.command("predict")(predict_command)


def predict_command(
    model: str = typer.Argument(..., help="checkpoint or run dir, registry name, or exported .onnx, as `seminar serve` takes"),
    input_uri: str = typer.Argument(..., metavar="INPUT", help="a folder or s3:// prefix of .jpg/.png images"),
    out: str = typer.Option(..., "--out", "-o", help="where the label maps and predictions.parquet go (folder or s3://)"),
    which: Optional[str] = typer.Option(None, help="the network whose labels are written (default: the spec's)"),
    registry: Optional[str] = typer.Option(None, help="registry for bare model names"),
    runtime: str = typer.Option("onnx", help="onnx | torch"),
    batch_size: int = typer.Option(4, "--batch-size", min=1, max=256, help="images per forward"),
    suggest: int = typer.Option(5, "--suggest", min=0, max=1000, help="suggested clicks per image (where the teachers disagree)"),
    threads: Optional[int] = typer.Option(None, "--threads", min=1, help="intra-op threads (default: all cores)"),
) -> None:
    """Segment a folder of images: a label map per image and one table, with where to click next. Resumable."""
    from tqdm import tqdm

    from seminar.registry import resolve_model
    from serving.committee import Committee
    from serving.predict_folder import PredictError, input_images, predict_folder

    if runtime not in ("onnx", "torch"):
        fail(f"--runtime: onnx or torch, got {runtime!r}")
    from seminar.storage import NotWritable, check_output

    try:
        check_output(out, "--out", is_file=False)
    except NotWritable as e:
        fail(str(e))
    try:
        input_images(input_uri)  # an empty or missing folder is named before the model loads
        resolved = resolve_model(model, registry)
        committee = Committee.load(resolved.checkpoint, which, runtime, threads)
    except PredictError as e:
        fail(str(e))
    except Exception as e:  # noqa: BLE001 - registry, storage and file errors alike
        fail(f"cannot load model {model!r}: {' '.join(str(e).split())}")
    bars = []

    def progress(total: int):
        bars.append(tqdm(total=total, desc="predict", unit="image", dynamic_ncols=True))
        return bars[-1]

    try:
        summary = predict_folder(committee, input_uri, out, batch_size, suggest, progress=progress)
    except PredictError as e:
        fail(str(e))
    finally:
        for bar in bars:
            bar.close()
    for line in summary["failed"]:
        console.print(f"[yellow]skipped[/] {line}", soft_wrap=True)
    why = (f"suggested clicks where its {summary['committee']} teachers disagree" if summary["committee"]
           else "no committee (one network): no disagreement, no suggested clicks")
    console.print(f"{summary['written']} label maps written, {summary['skipped']} already done, "
                  f"{len(summary['failed'])} unreadable; table {summary['table']} ({why})", soft_wrap=True)
    if summary["failed"]:
        raise typer.Exit(1)


def serving_config(config: Optional[Path], overrides: list[str], **explicit):
    """ServingConfig from a job spec's `serving:` section, `--set` overrides and flags."""
    from seminar.config import ServingConfig, load_spec

    cfg = load_spec(config, [f"serving.{o}" for o in overrides]).serving
    updates = {k: v for k, v in explicit.items() if v is not None}
    return ServingConfig.model_validate({**cfg.model_dump(), **updates})


class StartupTimeout(Exception):
    """`seminar serve --startup-timeout` passed before Serve was up."""


def serve_command(
    model: str = typer.Argument(..., help="checkpoint dir, s3:// URI, or registry name <prefix>/<model>(/<version>)"),
    host: str = typer.Option("127.0.0.1", help="address the HTTP proxy binds (0.0.0.0 for every interface)"),
    port: int = typer.Option(8000, help="HTTP port"),
    replicas: Optional[int] = typer.Option(None, "--replicas", min=1, help="a fixed number of replicas (default: autoscale)"),
    min_replicas: Optional[int] = typer.Option(None, "--min-replicas", min=0, help="autoscaling lower bound"),
    max_replicas: Optional[int] = typer.Option(None, "--max-replicas", min=1, help="autoscaling upper bound"),
    which: Optional[str] = typer.Option(None, help="best_teacher | primary_teacher | primary_student | teacher_ensemble"),
    registry: Optional[str] = typer.Option(None, help="registry for bare model names: a local directory or s3://bucket/prefix; default: $SEMINAR_REGISTRY, else runs/registry"),
    config: Optional[Path] = typer.Option(None, "--config", "-c", help="a job spec whose serving: section to use"),
    overrides: list[str] = typer.Option([], "--set", "-s", metavar="KEY=VALUE", help="a serving field: key=value (repeatable)"),
    address: Optional[str] = typer.Option(None, "--address", envvar="RAY_ADDRESS", help="Ray cluster address; default: a local Ray"),
    name: str = typer.Option("seminar", help="Serve application name"),
    route_prefix: str = typer.Option("/", help="URL prefix of the application"),
    detach: bool = typer.Option(False, help="deploy and exit, leaving the application running (needs --address)"),
    startup_timeout: float = typer.Option(600, "--startup-timeout", min=0.001, help="seconds Serve may take to start "
                                          "(proxy up, replicas ready) before the command gives up"),
) -> None:
    """Serve a trained model over HTTP (Ray Serve + FastAPI): POST /v1/segment, GET /v1/model, a web page at /."""
    from pydantic import ValidationError

    from seminar.config import SpecError
    from seminar.predict import Segmenter
    from seminar.registry import resolve_model

    try:
        cfg = serving_config(config, overrides, num_replicas=replicas, min_replicas=min_replicas,
                             max_replicas=max_replicas)
    except (SpecError, ValidationError) as e:
        fail(str(e))
    if detach and not address:
        fail("--detach needs --address (a local Ray ends with this command)")
    try:  # fail here, with the user's words, rather than in a replica's log
        resolved = resolve_model(model, registry)
        # the weights too: a refused file is named now (and the ONNX export is cached for the replicas)
        Segmenter.load(resolved.checkpoint, which, runtime=cfg.runtime, threads=cfg.torch_threads)
    except Exception as e:  # noqa: BLE001 - registry, storage and file errors alike
        fail(f"cannot load model {model!r}: {' '.join(str(e).split())}")

    import ray
    from ray import serve

    from serving.app import ServeArgs, build_app

    if address:
        ray.init(address=address, log_to_driver=False)
    else:
        # A local Ray on a busy machine (training beside it): Serve's proxy gets a minute, not
        # 5-10 s, to answer its ready and health checks before the controller gives up on it.
        for var in ("RAY_SERVE_PROXY_READY_CHECK_TIMEOUT_S", "RAY_SERVE_PROXY_HEALTH_CHECK_TIMEOUT_S"):
            os.environ.setdefault(var, "60")
        ray.init(include_dashboard=True, dashboard_host="127.0.0.1", log_to_driver=False)

    def stop(signum, frame):  # SIGTERM (a service manager, `kill`) stops it as Ctrl-C does
        raise KeyboardInterrupt

    def too_slow(signum, frame):
        raise StartupTimeout

    # Ctrl-C and SIGTERM must reach this command even when it was started with them ignored or
    # blocked (both survive exec: a parent's mask was seen to leave the command deaf to Ctrl-C).
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT, signal.SIGTERM, signal.SIGALRM})
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, stop)
    # The start-up deadline is an alarm on this (the main) thread, which also handles SIGTERM.
    signal.signal(signal.SIGALRM, too_slow)
    try:
        signal.setitimer(signal.ITIMER_REAL, startup_timeout)
        try:
            serve.start(http_options={"host": host, "port": port})
            args = ServeArgs(model=model, which=which, registry=registry, serving=cfg)
            serve.run(build_app(args), name=name, route_prefix=route_prefix)
        except StartupTimeout:
            fail(f"Serve did not start within {startup_timeout:g} s (--startup-timeout; a busy machine starts "
                 "slower): stopped", code=1)
        except (ray.exceptions.RayError, RuntimeError) as e:  # a proxy or replica that died starting
            fail(f"Serve failed to start: {type(e).__name__}: {str(e).strip().splitlines()[0][:300]}", code=1)
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)
        url = f"http://{host}:{port}{route_prefix.rstrip('/')}/"
        console.print(f"serving [bold]{resolved.version}[/] at {url}  (POST {url}v1/segment, page at {url})", soft_wrap=True)
        if detach:
            return
        console.print("Ctrl-C (or SIGTERM) to stop")
        while True:
            time.sleep(1)
    except KeyboardInterrupt:
        pass
    finally:
        if not detach:
            serve.shutdown()
            ray.shutdown()
