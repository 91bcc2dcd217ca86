"""Every command's --help shows at least one example a user can paste, and every example parses."""

from __future__ import annotations

import shlex

import click
import pytest
from click.testing import CliRunner

from mlxpost.cli.main import cli


def commands(group: click.Group = cli, path: tuple = ()) -> list[tuple[str, ...]]:
    ctx = click.Context(group)
    out = []
    for name in group.list_commands(ctx):
        cmd = group.get_command(ctx, name)
        out.append(path + (name,))
        if isinstance(cmd, click.Group):
            out += commands(cmd, path + (name,))
    return out


def resolve(args: list[str]) -> tuple[click.Command, list[str], tuple[str, ...]]:
    """The (sub)command an example line names, the rest of its arguments, and the command's path."""
    cmd, path = cli, ()
    while isinstance(cmd, click.Group) and args and args[0] in cmd.list_commands(click.Context(cmd)):
        path += (args[0],)
        cmd, args = cmd.get_command(click.Context(cmd), args[0]), args[1:]
    return cmd, args, path


def parses(line: str, monkeypatch) -> tuple[str, ...]:
    """The command path of an example line, after parsing its arguments as the command would (the paths it
    names need not exist here). An unknown option, a bad value or a missing required option fails."""
    cmd, args, path = resolve(shlex.split(line, comments=True)[1:])
    for param in cmd.params:
        if isinstance(param.type, click.Path):
            monkeypatch.setattr(param.type, "exists", False)
    cmd.make_context(" ".join(path), args)
    return path


@pytest.mark.parametrize("path", commands(), ids=" ".join)
def test_help_has_an_example_that_parses(path, monkeypatch):
    out = CliRunner().invoke(cli, [*path, "--help"], terminal_width=110)
    assert out.exit_code == 0, out.output
    prefix = "mlxpost " + " ".join(path)
    examples = [line.strip() for line in out.output.splitlines()
                if line.strip() == prefix or line.strip().startswith(prefix + " ")]
    assert examples, f"{prefix} --help shows no example"
    for line in examples:
        assert parses(line, monkeypatch)[: len(path)] == path, line


def test_a_wrong_example_would_fail(monkeypatch):
    with pytest.raises(click.NoSuchOption):
        parses("mlxpost export runs/x --fromat mlx", monkeypatch)
    with pytest.raises(click.BadParameter):
        parses("mlxpost chat --adapter runs/x --temp hot", monkeypatch)
    with pytest.raises(click.MissingParameter):
        parses("mlxpost export runs/x", monkeypatch)
    assert parses("mlxpost data convert a.json --out d/", monkeypatch) == ("data", "convert")
