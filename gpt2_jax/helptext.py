"""Plain ``--help`` text from docstrings written in reStructuredText.

The command modules use their docstrings as ``--help`` descriptions; the docstrings are reST (for the API docs),
which reads badly in a terminal (````gpt2-jax train````, ``:mod:`gpt2_jax.training.loop```, ``Examples::``).
:func:`clean_parser_help` rewrites a parser's description, epilog and every argument's help to plain text once,
when the command line is built.
"""

from __future__ import annotations

import argparse
import re

__all__ = ["RST_MARKUP", "clean_parser_help", "plain_text"]

# :role:`text` / :role:`title <target>` / :role:`~a.b.c`
_ROLE = re.compile(r":[a-z]+(?::[a-z]+)?:`~?([^`<]*?)\s*(?:<[^`>]*>)?`")
_LITERAL = re.compile(r"``([^`]+)``")
_BLOCK = re.compile(r"(\S)::(?=\s*$)", re.MULTILINE)  # "Examples::" -> "Examples:"
_BARE_BLOCK = re.compile(r"^(\s*)::\s*$", re.MULTILINE)  # a paragraph that is only "::"

#: Patterns that must not appear in any ``--help`` output (the test over every command checks them).
RST_MARKUP = (re.compile(r"``"), re.compile(r":[a-z]+:`"), re.compile(r"\S::\s*$", re.MULTILINE))


def plain_text(text: str | None) -> str | None:
    """``text`` without reST inline markup: literals and roles become their text, ``Examples::`` becomes
    ``Examples:``. None stays None."""
    if not text:
        return text
    text = _ROLE.sub(lambda m: m.group(1), text)
    text = _LITERAL.sub(lambda m: m.group(1), text)
    text = _BLOCK.sub(r"\1:", text)
    return _BARE_BLOCK.sub("", text)


def clean_parser_help(parser: argparse.ArgumentParser) -> None:
    """Rewrite ``parser``'s description, epilog and argument help (and its subparsers', recursively) with
    :func:`plain_text`."""
    parser.description = plain_text(parser.description)
    parser.epilog = plain_text(parser.epilog)
    for action in parser._actions:  # argparse has no public accessor for them
        if isinstance(action.help, str) and action.help != argparse.SUPPRESS:
            action.help = plain_text(action.help)
        if isinstance(action, argparse._SubParsersAction):
            for choice in action._choices_actions:
                choice.help = plain_text(choice.help)
            for sub in dict.fromkeys(action.choices.values()):
                clean_parser_help(sub)
