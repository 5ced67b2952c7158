"""The `seminar` command, assembled at the top of the house.

    seminar train [--config SPEC] [--set k=v] [--in-process | --address ADDR]
    seminar evaluate | runs | data ...   (seminar.cli: Ray-free)
    seminar serve ...                    (serving.cli)
    seminar submit | tune | jobs | models ...   (jobs.cli)

Every package below registers its commands here; none of them imports this module, so
the method package stays free of Ray, the cluster layer and serving. `python -m jobs.main`
is the same command (the entrypoint of submitted jobs).
"""

from __future__ import annotations

import os

# OpenMP reads its wait policy once, when torch loads it: set before anything imports torch.
# Passive: intra-op threads that wait sleep instead of spinning, so training beside other work
# (a server, a second job) keeps its share of the cores instead of losing 10x to spinning.
os.environ.setdefault("OMP_WAIT_POLICY", "passive")

from pathlib import Path  # noqa: E402
from typing import Optional  # noqa: E402

import typer  # noqa: E402

import jobs.cli  # noqa: E402
import seminar.cli  # noqa: E402
import serving.cli  # noqa: E402
from seminar.cli import fail, spec_from_options  # noqa: E402

app = typer.Typer(add_completion=False, no_args_is_help=True, rich_markup_mode=None,
                  help="Semantic segmentation from clicks with seminar learning, on Ray.")


@app.command()
def train(
    config: Optional[Path] = typer.Option(None, "--config", "-c", help="job spec (YAML); default: the embedded synthetic job"),
    overrides: list[str] = typer.Option([], "--set", "-s", metavar="KEY=VALUE", help="override a spec field: key=value (repeatable)"),
    address: Optional[str] = typer.Option(None, "--address", envvar="RAY_ADDRESS", help="Ray cluster address; default: an embedded local Ray"),
    in_process: bool = typer.Option(False, "--in-process", help="all students in this process, without Ray"),
) -> None:
    """Train the students, evaluate them, save a checkpoint."""
    from seminar.checkpoint import CheckpointError
    from seminar.config import SpecError
    from seminar.data import ClickFileError, DatasetError
    from seminar.storage import NotWritable

    cfg = spec_from_options(config, overrides)
    try:
        if in_process:
            from seminar.runs import run_in_process

            result = run_in_process(cfg, seminar.cli.console)
        else:
            from cluster import PreflightError, run_training  # Ray is imported on this path only

            try:
                result = run_training(cfg, address=address, console=seminar.cli.console)
            except PreflightError as e:
                fail(str(e))
    except (ClickFileError, DatasetError, SpecError, NotWritable, FileNotFoundError, CheckpointError) as e:
        fail(str(e))  # CheckpointError: an init_from whose weights do not load (refused, no code run)
    seminar.cli.print_training_summary(cfg, result)


seminar.cli.register(app)
serving.cli.register(app)
jobs.cli.register(app)

if __name__ == "__main__":
    app()
