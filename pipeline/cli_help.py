"""How every ``deeper`` command explains itself: one formatter, one way to show defaults.

Used by ``pipeline/app/cli.py`` for the top-level parser and every subcommand (including those that
register themselves from ``producers/`` and ``consumers/``), so ``--help`` reads the same
everywhere: each option says what it does, and an option with a default shows it as
``(default: X)``. Options whose default comes from the environment say so in their own text
(:func:`from_setting`) and keep ``None`` as their argparse default, so an unset flag still
means "whatever the settings say".
"""

from __future__ import annotations

import argparse
import re

from pipeline.config import ENVIRONMENT

#: The exit statuses of the commands that take photos (imagenet, featurize, train, predict, report).
EXIT_STATUS = """\
exit status:
  0    every photo was processed
  1    some photos failed, each named with its reason (on stderr, or in the output's error
       column); the others were processed and their results written
  2    the command could not do its job, and one line on stderr says why: bad arguments,
       a missing path, no model, or (featurize, train) no photo left to write or train on
  130  interrupted"""


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Appends ``(default: X)`` to an option's help unless it has no default or already says it.

    Raw descriptions keep the epilog's exit-status table as written. Flags (store_true) and
    options defaulting to ``None`` show nothing: their help says what happens without them.
    """

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        default = action.default
        if (not action.option_strings or default is None or default is False or default == argparse.SUPPRESS
                or "%(default)" in text):
            return text
        return f"{text} (default: %(default)s)"


class Parser(argparse.ArgumentParser):
    """An ``ArgumentParser`` that uses :class:`HelpFormatter` unless told otherwise."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", HelpFormatter)
        super().__init__(*args, **kwargs)


def from_setting(name: str) -> str:
    """``(default: $VARIABLE or value)`` for a :class:`pipeline.config.Settings` field."""
    variable, default = ENVIRONMENT[name]
    return f"(default: ${variable} or {default})" if default else f"(default: ${variable})"


def plain(text: str) -> str:
    """Docstring text for a terminal: reST roles and literal markers removed."""
    text = re.sub(r":[a-z]+:`~?([^`]+)`", r"\1", text)
    return text.replace("``", "").replace("`", "")
