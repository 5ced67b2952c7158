"""Submitting job specs to a Ray cluster through Ray's Jobs API, and watching them.

A submission hands Ray the project's code as the job's `working_dir` (minus
WORKING_DIR_EXCLUDES: Ray packs and uploads it) and the validated spec in the job's
environment ($SEMINAR_JOB_SPEC), and runs

    python -m jobs.job train        (or `tune`)

on the head node, where the command connects to the cluster it runs in. Everything here
talks to the cluster's dashboard (the Jobs API, http://HEAD:8265) with
`ray.job_submission.JobSubmissionClient`.

Authentication: Ray clusters require a token by default. The token is read from where
Ray itself keeps it - `RAY_AUTH_TOKEN`, the file named by `RAY_AUTH_TOKEN_PATH`, or
`~/.ray/auth_token` - and sent as `Authorization: Bearer <token>`, whether or not this
machine sets `RAY_AUTH_MODE=token` (Ray's client only adds it itself when it does).

Every failure to talk to the cluster becomes one `ClusterError` with a one-line message.
"""

from __future__ import annotations

import asyncio
import logging
import os
import secrets
import shlex
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Iterator, TextIO
from urllib.parse import urlparse

from cluster.preflight import unreachable
from seminar.config import SweepConfig, TrainConfig, dump_spec
from seminar.history import new_run_name

if TYPE_CHECKING:
    from ray.job_submission import JobSubmissionClient

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_ADDRESS = "http://127.0.0.1:8265"
JOB_SPEC_ENV = "SEMINAR_JOB_SPEC"  # a submitted job's spec, read by jobs.job

# What stays on the user's machine: environments, outputs, data and weights, VCS (gitignore
# patterns, as Ray's runtime_env `excludes` reads them: one with a '/' is anchored at the
# repository root; Ray also leaves out what .gitignore names).
WORKING_DIR_EXCLUDES = (
    ".git", ".gitignore", ".venv", "venv", ".env", "runs", "out", "tests/data", ".whl", ".gl",
    "__pycache__", "*.pyc", "*.egg-info", ".pytest_cache", ".mypy_cache", ".ruff_cache", ".ipynb_checkpoints",
    "node_modules", "*.pt", "*.pth", "*.ckpt", "*.parquet", "*.png", "*.jpg", "*.jpeg",
)


class ClusterError(RuntimeError):
    """The cluster cannot be reached or refuses us; str() is one line for the user."""


# --------------------------------------------------------------------------------------
# Address and token
# --------------------------------------------------------------------------------------


def resolve_address(address: str | None = None) -> str:
    """The Jobs API URL: --address, else RAY_API_SERVER_ADDRESS, else RAY_ADDRESS, else local.

    `host:port` means `http://host:port`, as for `ray job submit`.
    """
    address = address or os.environ.get("RAY_API_SERVER_ADDRESS") or os.environ.get("RAY_ADDRESS") or DEFAULT_ADDRESS
    if address.startswith("ray://"):
        raise ClusterError(f"{address} is a Ray Client address; jobs go to the dashboard URL, "
                           "e.g. http://HEAD:8265")
    if "://" not in address:
        address = f"http://{address}"
    return address.rstrip("/")


def auth_token() -> tuple[str | None, str]:
    """(token, where it came from), looking where Ray looks, in Ray's order."""
    token = os.environ.get("RAY_AUTH_TOKEN", "").strip()
    if token:
        return token, "RAY_AUTH_TOKEN"
    path = os.environ.get("RAY_AUTH_TOKEN_PATH")
    if path:
        p = Path(path).expanduser()
        if not p.is_file():
            raise ClusterError(f"RAY_AUTH_TOKEN_PATH={path}: no such file")
        return p.read_text().strip() or None, f"RAY_AUTH_TOKEN_PATH={path}"
    default = Path.home() / ".ray" / "auth_token"
    if default.is_file():
        return default.read_text().strip() or None, str(default)
    return None, "RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH and ~/.ray/auth_token"


@contextmanager
def cluster_errors(address: str, job_id: str | None = None) -> Iterator[None]:
    """Translate what Ray's client raises into one ClusterError line."""
    import requests
    from ray.exceptions import AuthenticationError

    try:
        yield
    except ClusterError:
        raise
    except AuthenticationError:
        token, source = auth_token()
        if token is None:
            raise ClusterError(f"the Ray cluster at {address} requires an auth token; none found in {source} "
                               "(set RAY_AUTH_TOKEN or RAY_AUTH_TOKEN_PATH to the cluster's token)") from None
        raise ClusterError(f"the Ray cluster at {address} rejected the auth token from {source} "
                           "(a different cluster's token?)") from None
    except (ConnectionError, requests.exceptions.ConnectionError, requests.exceptions.Timeout) as e:
        raise ClusterError(f"cannot reach the Ray cluster at {address}: {_short(e)}") from None
    except RuntimeError as e:
        text = str(e)
        if job_id and ("404" in text or "does not exist" in text):
            raise ClusterError(f"no job '{job_id}' on the Ray cluster at {address}") from None
        raise ClusterError(f"the Ray cluster at {address} answered: {_short(e)}") from None


def _short(e: BaseException) -> str:
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    return (lines[0] if lines else type(e).__name__)[:300]


def _check_reachable(address: str, timeout_s: float = 5.0) -> None:
    # requests has no connect timeout by default: a firewalled head would hang for minutes.
    url = urlparse(address)
    why_not = unreachable(url.hostname, url.port or (443 if url.scheme == "https" else 80), timeout_s)
    if why_not:
        raise ClusterError(f"cannot reach the Ray cluster at {address} ({why_not}); "
                           "is the head up and its dashboard port reachable?")


def connect(address: str | None = None) -> JobSubmissionClient:
    """A Jobs API client for the cluster at address, authenticated, connection checked."""
    from ray.job_submission import JobSubmissionClient

    address = resolve_address(address)
    _check_reachable(address)
    # Ray's client logs every upload and socket at INFO; this command says what matters itself.
    for name in ("ray", "ray.dashboard.modules.dashboard_sdk", "ray.dashboard.modules.job.sdk"):
        logging.getLogger(name).setLevel(logging.WARNING)
    token, _ = auth_token()
    headers = {"Authorization": f"Bearer {token}"} if token else None
    with cluster_errors(address):
        return JobSubmissionClient(address, headers=headers)


# --------------------------------------------------------------------------------------
# The job: the project's code, the spec in its environment
# --------------------------------------------------------------------------------------


def job_runtime_env(cfg: TrainConfig, repo: Path = REPO_ROOT) -> dict:
    """Ray's runtime_env of a submitted job: the code as its working_dir, the spec (and the
    code version: the job has no .git) in its environment, read by `jobs.job`."""
    from seminar.registry import CODE_VERSION_ENV, code_version  # imports torch: not for `seminar jobs list`

    return {"working_dir": str(repo), "excludes": list(WORKING_DIR_EXCLUDES),
            "env_vars": {JOB_SPEC_ENV: dump_spec(cfg), CODE_VERSION_ENV: code_version()}}


def for_cluster(cfg: TrainConfig, run_name: str | None) -> TrainConfig:
    """The spec as the cluster must see it: a fixed run name and absolute local paths.

    Relative paths are relative to where the user runs `seminar`, not to the job's
    temporary working dir on the cluster (which Ray deletes): make them absolute.
    """

    def absolute(p: str | None) -> str | None:
        return p if p is None or "://" in p else str(Path(p).expanduser().resolve())

    raw = cfg.model_dump(mode="json")
    data = raw["data"]
    for key in ("root", "sbd_root", "clicks"):
        data[key] = absolute(data[key])
    data["extra_clicks"] = [absolute(p) for p in data["extra_clicks"]]
    for student in raw["students"]:
        if student["pretrained"] != "imagenet":  # the packaged weights, not a path
            student["pretrained"] = absolute(student["pretrained"])
    raw["storage"]["path"] = absolute(raw["storage"]["path"])
    if run_name:
        raw["storage"]["run_name"] = run_name
    if raw.get("sweep") and raw["sweep"].get("registry"):
        raw["sweep"]["registry"] = absolute(raw["sweep"]["registry"])
    return TrainConfig.model_validate(raw)


# --------------------------------------------------------------------------------------
# Submitting and watching
# --------------------------------------------------------------------------------------


@dataclass
class SubmittedJob:
    job_id: str
    address: str
    run_name: str
    storage: str  # where the run (checkpoints, sweep results) lands: <storage.path>/<run_name>


def submit_spec(cfg: TrainConfig, address: str | None = None, *, kind: str = "train",
                client: JobSubmissionClient | None = None, python: str = "python") -> SubmittedJob:
    """Submit a validated spec as a Ray job; kind is 'train' or 'tune'. Returns at once.

    `python` is the interpreter on the cluster that has this project's dependencies
    (`python` on the head's PATH, as in Ray's images; or e.g. /opt/venv/bin/python).
    """
    address = resolve_address(address)
    client = client or connect(address)
    if kind == "tune":
        given = cfg.sweep.name if cfg.sweep else None
        run_name = given or new_run_name("tune")
        cfg = for_cluster(cfg, None)
        cfg = cfg.model_copy(update={"sweep": (cfg.sweep or SweepConfig()).model_copy(update={"name": run_name})})
        entrypoint = f"{shlex.quote(python)} -m jobs.job tune"
    else:
        given = cfg.storage.run_name
        run_name = given or new_run_name("train")
        cfg = for_cluster(cfg, run_name)
        entrypoint = f"{shlex.quote(python)} -m jobs.job train"
    if "://" not in cfg.storage.path and urlparse(address).hostname not in ("127.0.0.1", "localhost", "::1"):
        print(f"note: storage.path {cfg.storage.path} is a directory on the cluster's nodes, not on this "
              "machine; a cluster of several nodes needs shared storage (s3://bucket/prefix)", file=sys.stderr)
    # A new name doubles as the job id; a given name (resuming a run) may be submitted again.
    job_id = f"{run_name}-{secrets.token_hex(2)}" if given else run_name
    with cluster_errors(address):
        job_id = client.submit_job(
            entrypoint=entrypoint,
            submission_id=job_id,
            runtime_env=job_runtime_env(cfg),
            metadata={"seminar_kind": kind, "seminar_run": run_name, "seminar_storage": cfg.storage.path},
        )
    return SubmittedJob(job_id, address, run_name, f"{cfg.storage.path.rstrip('/')}/{run_name}")


TERMINAL = ("SUCCEEDED", "FAILED", "STOPPED")


def follow_logs(client: JobSubmissionClient, job_id: str, out: TextIO | None = None) -> str:
    """Stream the job's logs until it ends; return its final status (e.g. 'SUCCEEDED')."""
    out = out or sys.stdout

    async def tail() -> None:
        async for chunk in client.tail_job_logs(job_id):
            out.write(chunk)
            out.flush()

    with cluster_errors(client.get_address(), job_id):
        asyncio.run(tail())
        return wait_for_job(client, job_id, timeout_s=60)


def wait_for_job(client: JobSubmissionClient, job_id: str, timeout_s: float = 600, poll_s: float = 1.0) -> str:
    deadline = time.monotonic() + timeout_s
    with cluster_errors(client.get_address(), job_id):
        while True:
            status = str(client.get_job_status(job_id).value)
            if status in TERMINAL or time.monotonic() > deadline:
                return status
            time.sleep(poll_s)
