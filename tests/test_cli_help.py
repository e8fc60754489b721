"""``deeper --help`` as a new user reads it: every option explained, every default shown.

Walks the real parser (the same object ``deeper`` builds, streaming subcommands included) and
renders each subcommand's help exactly as ``deeper COMMAND --help`` prints it.
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
from importlib.metadata import version

import pytest

from pipeline.app.cli import PHOTO_COMMANDS, build_parser, main

PARSER = build_parser()


def _subparsers(p: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    action = next((a for a in p._actions if isinstance(a, argparse._SubParsersAction)), None)
    return dict(action.choices) if action else {}


SUBCOMMANDS = _subparsers(PARSER)
#: every command line that has a --help: "featurize", "broker start", ...
COMMANDS = {name: p for name, p in SUBCOMMANDS.items()}
COMMANDS.update({f"{name} {inner}": q for name, p in SUBCOMMANDS.items() for inner, q in _subparsers(p).items()})


def _options(p: argparse.ArgumentParser) -> list[argparse.Action]:
    return [a for a in p._actions if not isinstance(a, (argparse._HelpAction, argparse._SubParsersAction))]


def _help_of(p: argparse.ArgumentParser, action: argparse.Action) -> str:
    """The option's help text as rendered (``%(default)s`` expanded, wrapping undone)."""
    return " ".join(p._get_formatter()._expand_help(action).split())


def _shows(text: str, default) -> bool:
    return str(default) in text or (isinstance(default, float) and f"{default:g}" in text)


def _run_help(capsys, *argv: str) -> str:
    with pytest.raises(SystemExit) as exit_:
        main([*argv, "--help"])
    assert exit_.value.code == 0
    return capsys.readouterr().out


@pytest.mark.parametrize("name", sorted(COMMANDS))
def test_every_option_is_explained_with_its_default(name, capsys):
    p = COMMANDS[name]
    text = _run_help(capsys, *name.split())
    assert text.startswith(f"usage: deeper {name}"), text[:200]
    missing, no_default = [], []
    for action in _options(p):
        label = "/".join(action.option_strings) or action.dest
        if not action.help or action.help == argparse.SUPPRESS:
            missing.append(label)
        elif (action.option_strings and action.default not in (None, False, argparse.SUPPRESS)
              and not _shows(_help_of(p, action), action.default)):
            no_default.append(f"{label}={action.default!r}: {_help_of(p, action)!r}")
    assert not missing, f"deeper {name}: options without help text: {missing}"
    assert not no_default, f"deeper {name}: defaults not shown: {no_default}"


@pytest.mark.parametrize("name", sorted(COMMANDS))
def test_help_has_no_markup_and_a_summary(name, capsys):
    text = _run_help(capsys, *name.split())
    assert "``" not in text and ":func:" not in text and ":class:" not in text
    summary = text.split("\n\n")[1].strip()
    assert summary and not summary.startswith(("positional", "options")), text[:300]


def test_top_level_help_is_plain_and_lists_exit_statuses(capsys):
    text = _run_help(capsys)
    assert "``" not in text and "DeeperError" not in text
    for command in SUBCOMMANDS:
        assert re.search(rf"^\s+{command}\s+\S", text, re.M), command  # each command with its summary
    assert re.search(r"^\s+1\s+some photos failed", text, re.M)
    assert "--version" in text and "--verbose" in text


@pytest.mark.parametrize("name", PHOTO_COMMANDS)
def test_photo_commands_document_exit_statuses(name, capsys):
    text = _run_help(capsys, name)
    for status in ("0", "1", "2"):
        assert re.search(rf"^\s+{status}\s+\w", text, re.M), text


def test_version_is_the_package_version():
    run = subprocess.run([sys.executable, "-m", "pipeline.app.cli", "--version"], capture_output=True, text=True,
                         timeout=60)
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip() == f"deeper {version('go-deeper')}"


@pytest.mark.parametrize("name", ["predict", "report"])
def test_model_version_is_not_called_version(name):
    flags = {s for a in _options(SUBCOMMANDS[name]) for s in a.option_strings}
    assert "--model-version" in flags and "--version" not in flags


@pytest.mark.parametrize("name, flags", [
    ("featurizer", {"--images-topic", "--features-topic", "--dead-letter-topic"}),
    ("scorer", {"--features-topic", "--labels-topic", "--dead-letter-topic"}),
    ("labels", {"--labels-topic", "--topic"}),
])
def test_stream_commands_name_their_topics(name, flags, monkeypatch):
    monkeypatch.setenv("DEEPER_LABELS_TOPIC", "from-env")
    options = {s: a for a in _options(SUBCOMMANDS[name]) for s in a.option_strings}
    assert flags <= options.keys()
    for flag in flags:
        assert options[flag].default is None  # unset: the settings decide
        assert "$DEEPER_" in options[flag].help
    args = build_parser().parse_args([name, sorted(flags)[0], "elsewhere"])
    assert "elsewhere" in vars(args).values()
