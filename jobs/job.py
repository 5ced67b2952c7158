"""The entrypoint of a submitted job: `python -m jobs.job train|tune`.

`jobs.submit` gives Ray the project's code as the job's working_dir and the validated spec
in the job's environment ($SEMINAR_JOB_SPEC); this writes the spec to a temporary file and
runs `seminar train --config FILE` (or `seminar tune FILE`) on it.
"""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

from jobs.submit import JOB_SPEC_ENV


def main(argv: list[str]) -> None:
    if len(argv) != 1 or argv[0] not in ("train", "tune") or JOB_SPEC_ENV not in os.environ:
        sys.exit(f"usage: {JOB_SPEC_ENV}=<spec YAML> python -m jobs.job train|tune (what `seminar submit` runs)")
    from jobs.main import app

    with tempfile.TemporaryDirectory(prefix="seminar-job-") as tmp:
        spec = Path(tmp) / "job_spec.yaml"
        spec.write_text(os.environ[JOB_SPEC_ENV])
        app(["train", "--config", str(spec)] if argv[0] == "train" else ["tune", str(spec)])


if __name__ == "__main__":
    main(sys.argv[1:])
