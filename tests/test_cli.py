"""The command line: every flag explained with its default and environment variable, the
variables honoured, the command line winning, and bad values refused by name."""

from __future__ import annotations

import argparse

import pytest

from toolkit import __version__
from toolkit.server_args import ServerArgs
from toolkit.server_flags import build_parser


def _flags(parser: argparse.ArgumentParser) -> list[argparse.Action]:
    return [a for a in parser._actions if a.option_strings and a.dest not in ("help", "version")]


def test_every_flag_has_help_and_names_its_environment_variable() -> None:
    for action in _flags(build_parser({})):
        help_text = action.help or ""
        variable = f"[env: TOOLKIT_{action.dest.upper()}]"
        assert help_text.endswith(variable), action.option_strings
        assert len(help_text) > len(variable) + 10, f"{action.option_strings} has no explanation"
        if action.default not in (None, False, ()) and not isinstance(action, argparse._StoreFalseAction):
            assert "[default: " in help_text, action.option_strings


def test_environment_variables_set_flags_and_the_command_line_wins() -> None:
    environ = {
        "TOOLKIT_PORT": "31000",
        "TOOLKIT_TRUNCATE": "yes",
        "TOOLKIT_WARMUP": "0",
        "TOOLKIT_HOST": "0.0.0.0",
    }
    args = ServerArgs.from_cli([], environ=environ)
    assert (args.port, args.truncate, args.warmup, args.host) == (31000, True, False, "0.0.0.0")
    assert ServerArgs.from_cli(["--port", "32000"], environ=environ).port == 32000
    normalized = {"TOOLKIT_NORMALIZE": "1"}
    assert ServerArgs.from_cli(["--no-normalize"], environ=normalized).normalize is False
    assert ServerArgs.from_cli([], environ={}) == ServerArgs()


@pytest.mark.parametrize(
    ("variable", "value"),
    [
        ("TOOLKIT_PORT", "abc"),
        ("TOOLKIT_DTYPE", "float8"),
        ("TOOLKIT_TRUNCATE", "maybe"),
        ("TOOLKIT_HTTP_WORKERS", "-1"),
    ],
)
def test_a_bad_environment_value_is_refused_by_name(
    variable: str, value: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exited:
        ServerArgs.from_cli([], environ={variable: value})
    assert exited.value.code == 2
    assert f"{variable}={value!r}" in capsys.readouterr().err


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        ServerArgs.from_cli(["--version"], environ={})
    assert capsys.readouterr().out.strip() == f"toolkit {__version__}"


def test_the_api_key_comes_from_a_file_and_not_from_both(tmp_path) -> None:  # type: ignore[no-untyped-def]
    key_file = tmp_path / "key"
    key_file.write_text("sésame\n", encoding="utf-8")
    assert ServerArgs.from_cli(["--api-key-file", str(key_file)], environ={}).api_key == "sésame"
    assert ServerArgs.from_cli([], environ={"TOOLKIT_API_KEY_FILE": str(key_file)}).api_key == "sésame"
    with pytest.raises(SystemExit, match="not both"):
        ServerArgs.from_cli(["--api-key", "x", "--api-key-file", str(key_file)], environ={})
    (tmp_path / "empty").write_text("\n")
    with pytest.raises(SystemExit, match="is empty"):
        ServerArgs.from_cli(["--api-key-file", str(tmp_path / "empty")], environ={})
    assert "sésame" not in ServerArgs.from_cli(["--api-key-file", str(key_file)], environ={}).banner()
