"""Every command's --help: each option has a help line and a shown default, and no help text is
shared by two commands unless the option behaves the same in both (issue 19, item 10)."""

from __future__ import annotations

import re
from collections import defaultdict

import click
import pytest
import typer

from clipret.cli import app

# Options whose meaning is the same wherever they appear: they may share one help text.
SAME_EVERYWHERE = {
    "--device", "--amp", "--workers", "--batch-size", "--json", "--tta", "--exact-decode", "--pretrained",
    "--allow-mismatch", "--dba", "--qe", "--qe-alpha", "--rerank", "--k1", "--k2", "--lambda", "--nprobe",
    "--ef-search", "--keep-self", "--search-device", "--help",
}
SHOWN = re.compile(r"\[(default: [^\]]+|required)\]\s*$")


def _options():
    group = typer.main.get_command(app)
    for name, cmd in group.commands.items():
        ctx = click.Context(cmd, info_name=name, parent=click.Context(group, info_name="clipret"))
        for param in cmd.params:
            if isinstance(param, typer.core.TyperOption) and param.name != "help":
                yield name, param, param.get_help_record(ctx)


def test_every_option_has_a_help_line_and_a_shown_default():
    missing = []
    for command, param, record in _options():
        text = record[1] if record else ""
        help_line = SHOWN.sub("", text).strip()
        if not help_line or not SHOWN.search(text):
            missing.append(f"{command} {param.opts[0]}: {text!r}")
    assert not missing, "options without a help line or a shown default:\n" + "\n".join(missing)


def test_no_help_text_is_shared_by_options_that_behave_differently():
    users = defaultdict(set)
    for command, param, _ in _options():
        users[param.help].add((command, param.opts[0]))
    shared = {text: sorted(who) for text, who in users.items() if len({c for c, _ in who}) > 1}
    wrong = {text: who for text, who in shared.items() if not {opt for _, opt in who} <= SAME_EVERYWHERE}
    assert not wrong, "one help text for options that behave differently: " + repr(wrong)


@pytest.mark.parametrize("command", sorted(typer.main.get_command(app).commands))
def test_every_command_help_has_an_example(command):
    group = typer.main.get_command(app)
    assert "Example" in (group.commands[command].help or "")
    assert re.search(r"clipret " + command, group.commands[command].help or "")
