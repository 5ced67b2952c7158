"""The commands that README.md and docs/*.md show.

Every `seminar ...` line in their code blocks must parse against the CLI as it is (the
command exists, every option exists and takes the value given), and every repository file
or make target they name must exist. Placeholders (RUN, HEAD, bucket) parse like any value;
scripts/readme_walk.sh runs the README's commands themselves, with real values for them.
"""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest
import typer

from conftest import REPO
from jobs.main import app

DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]


SHELL_BLOCKS = ("```bash", "```sh", "```console", "```")
COMMANDS = ("seminar", ".venv/bin/seminar", "make", "bash", "ray", "serve", "python", ".venv/bin/python")


def code_lines(path: Path) -> list[str]:
    """The lines inside the file's shell code blocks (a leading '$ ' prompt removed, lines
    continued with a backslash joined)."""
    lines, in_block, shell, pending = [], False, False, ""
    for line in path.read_text().splitlines():
        if line.startswith("```"):
            in_block, shell = (False, False) if in_block else (True, line.strip() in SHELL_BLOCKS)
        elif shell and line.strip():
            pending += line.strip().removeprefix("$ ")
            if pending.endswith("\\"):
                pending = pending[:-1]
            else:
                lines.append(pending)
                pending = ""
    return lines


def shown_commands() -> list[tuple[str, list[str]]]:
    """(where, argv) of every command in a shell block, split as the shell splits
    `a; b`, `a && b`, `a | b`, `a > file` and `a &`."""
    commands = []
    for path in DOCS:
        for line in code_lines(path):
            if line.split()[0] not in COMMANDS:
                continue  # output shown in the block, or a shell built-in
            lexer = shlex.shlex(line, posix=True, punctuation_chars=";&|<>")
            lexer.whitespace_split = True
            argv: list[str] = []
            for token in [*lexer, ";"]:
                if set(token) <= set(";&|<>"):
                    if argv and argv[0] in COMMANDS:
                        argv[0] = argv[0].removeprefix(".venv/bin/")
                        commands.append((f"{path.name}: {line}", argv))
                    argv = []
                else:
                    argv.append(token)
    return commands


SEMINAR = [(where, argv) for where, argv in shown_commands() if argv[0] == "seminar"]


def test_the_docs_show_the_commands_a_user_needs():
    names = {" ".join(argv[1:3]) for _, argv in SEMINAR}
    for expected in ("train", "evaluate runs/RUN", "models publish", "serve runs/registry/seminar", "tune jobs/configs/sweep.yaml",
                     "submit jobs/configs/synthetic.yaml", "predict runs/registry/seminar", "runs list"):
        assert any(name.startswith(expected) for name in names), expected
    assert len(SEMINAR) >= 25, len(SEMINAR)


@pytest.mark.parametrize("where, argv", SEMINAR, ids=[" ".join(argv[1:4]) for _, argv in SEMINAR])
def test_every_seminar_command_in_the_docs_parses(where, argv):
    """Parsed as the CLI parses it, without running it: unknown commands and options, and
    values of the wrong type, fail here."""
    command, name, args, parent = typer.main.get_command(app), "seminar", argv[1:], None
    try:
        while getattr(command, "commands", None):  # a group: its first argument names a command
            assert args and args[0] in command.commands, f"no command {args[:1]} under {name!r}"
            parent = command.make_context(name, args[:1], parent=parent)
            command, name, args = command.commands[args[0]], args[0], args[1:]
        command.make_context(name, list(args), parent=parent)
    except (AssertionError, Exception) as e:  # typer's own click: UsageError, NoSuchOption, BadParameter
        pytest.fail(f"{where}\n  does not parse: {e}")


@pytest.mark.parametrize("where, argv", [(w, a) for w, a in shown_commands() if a[0] != "seminar"])
def test_files_and_targets_the_docs_name_exist(where, argv):
    if argv[0] == "make":
        targets = re.findall(r"^([\w-]+):", (REPO / "Makefile").read_text(), re.M)
        assert set(argv[1:]) <= set(targets), where
    for arg in argv[1:]:
        if re.fullmatch(r"(jobs|cluster|serving|scripts|bench|tests)/[\w./-]+", arg):
            assert (REPO / arg).exists(), f"{where}\n  {arg} does not exist"
