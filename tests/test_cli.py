"""The ``python -m ctxprop`` dispatcher: every command is offered, and a broken one fails loudly."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from ctxprop._devtools import cli as _cli


def test_a_command_module_that_cannot_be_imported_fails_loudly(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A command whose module raises ImportError (a broken install) is an error with its cause, never a
    command silently missing from the list while the others keep working."""
    (tmp_path / "ctxprop_broken_cmd.py").write_text("import ctxprop_dependency_that_is_not_installed\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "ctxprop_broken_cmd", raising=False)
    monkeypatch.setitem(_cli._COMMANDS, "broken", ("ctxprop_broken_cmd", "a command that cannot load"))
    with pytest.raises(ImportError, match="ctxprop_dependency_that_is_not_installed"):
        _cli.main(["spool", "--dir", str(tmp_path / "spool"), "status"])


def test_every_command_is_offered(capsys: pytest.CaptureFixture[str]) -> None:
    """--help lists demo, spool and collector, and says what the tools are for."""
    with pytest.raises(SystemExit) as exit_info:
        _cli.main(["--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    for command in ("demo", "spool", "collector"):
        assert f"    {command}" in text
    assert "``" not in text  # no reStructuredText markup leaking into the terminal
