"""ops/cli.py: one spelling per option (old ones still accepted, hidden), an example closing every --help,
--version, checked option values, and `config show --json` read back by --config."""
import json

import click
import pytest
from click.testing import CliRunner

from ops.cli import main


def _invoke(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def _commands(command: click.Command, path=()):
    yield path, command
    for name, sub in getattr(command, "commands", {}).items():
        yield from _commands(sub, (*path, name))


def test_every_help_ends_with_one_example():
    for path, _ in _commands(main):
        result = _invoke(*path, "--help")
        assert result.exit_code == 0, (path, result.output)
        lines = [line.strip() for line in result.output.strip().splitlines()]
        assert lines[-2] == "Example:" and lines[-1].startswith("cotrain "), (path, lines[-3:])
        assert result.output.count("Example:") == 1, path


def test_version():
    result = _invoke("--version")
    assert result.exit_code == 0 and result.output.startswith("cotrain ")


@pytest.mark.parametrize("command,current,old", [
    (("shards", "synth"), "--count", "--n"), (("demo",), "--count", "--n"), (("export",), "--out", "--output")])
def test_old_spellings_are_accepted_but_hidden(command, current, old):
    help_text = _invoke(*command, "--help").output
    assert current in help_text and f"{old} " not in help_text and f"{old}," not in help_text
    option = next(p for p in _commands(main) if p[0] == command)[1]
    assert any(old in param.opts and current in param.opts for param in option.params)


@pytest.mark.parametrize("args,message", [
    (("train", "--shards", "s", "--out", "r", "--preset", "nope"), "'nope' is not one of"),
    (("train", "--shards", "s", "--out", "r", "--metrics-port", "-5"), "-5 is not in the range"),
    (("demo", "--metrics-port", "-5"), "-5 is not in the range"),
    (("eval", "--run", ".", "--shards", "no-such-dir"), "'no-such-dir' does not exist"),
])
def test_bad_option_values_are_refused_before_any_work(args, message):
    result = _invoke(*args)
    assert result.exit_code == 2 and message in result.output, result.output


def test_config_show_json_is_accepted_by_config(tmp_path):
    shown = _invoke("config", "show", "--preset", "emotion", "--set", "optim.lr=0.0007", "--json")
    assert shown.exit_code == 0, shown.output
    file = tmp_path / "run.json"
    file.write_text(shown.output)
    again = _invoke("config", "show", "--config", file, "--shards", "s", "--out", "r", "--json")
    assert again.exit_code == 0, again.output
    first, second = json.loads(shown.output), json.loads(again.output)
    assert second["run"] == dict(first["run"], shards="s", out="r") and second["deepspeed"] == first["deepspeed"]
    from ops.config import resolve_config
    with pytest.raises(ValueError, match="no 'shards' given"):  # the placeholders are not taken for paths
        resolve_config(file=file)
