"""`streamgate` command line without a server: help texts, argument checks, `config` masking
(issue 11, item 17)."""

from __future__ import annotations

import argparse
import json

import pytest

from server.__main__ import MASK, build_parser, main, masked


def subcommands(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    raise AssertionError("no subcommands")


def test_top_level_help_lists_every_command_with_its_help(
        capsys: pytest.CaptureFixture[str]) -> None:
    parser = build_parser()
    commands = subcommands(parser)
    # Every command this issue names, and the ones that came before it.
    assert {"serve", "config", "asr", "tts", "call-sim", "migrate", "flusher",
            "reconcile", "tenant-create", "key-issue", "key-revoke", "topup", "balance",
            "usage"} <= set(commands)
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert "serve, asr, config check" not in out
    sub_action = next(a for a in parser._actions
                      if isinstance(a, argparse._SubParsersAction))
    helps = {a.dest: a.help for a in sub_action._choices_actions}
    for name in commands:
        assert helps.get(name), f"command {name} has no help text"
        assert name in out, name


def test_every_option_of_every_command_has_help_text() -> None:
    missing = []
    for name, sub in subcommands(build_parser()).items():
        for action in sub._actions:
            if isinstance(action, argparse._HelpAction):
                continue
            if not action.help or action.help == argparse.SUPPRESS:
                missing.append(f"{name} {'/'.join(action.option_strings) or action.dest}")
    assert missing == []


def test_usage_since_names_its_format(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        build_parser().parse_args(["usage", "dev", "--since", "yesterday"])
    assert exit_info.value.code == 2
    assert "YYYY-MM-DD" in capsys.readouterr().err
    args = build_parser().parse_args(["usage", "dev", "--since", "2026-11-01"])
    assert str(args.since) == "2026-11-01"
    help_text = subcommands(build_parser())["usage"].format_help()
    assert "YYYY-MM-DD" in help_text


def test_config_masks_secrets(monkeypatch: pytest.MonkeyPatch,
                              capsys: pytest.CaptureFixture[str]) -> None:
    secrets = {
        "STREAMGATE_BILLING__ADMIN_TOKEN": '"adm1n-s3cret-token"',
        "STREAMGATE_BILLING__DATABASE_URL": '"postgresql://sg:pgpass123@db.internal:5432/sg'
                                            '?sslpassword=sslpass456&sslmode=require"',
        "STREAMGATE_BILLING__REDIS_URL": '"redis://:redispass789@cache.internal:6379/0"',
        "STREAMGATE_AUTH__KEY_SHA256": '["' + "ab" * 32 + '"]',
    }
    for name, value in secrets.items():
        monkeypatch.setenv(name, value)
    assert main(["config"]) == 0
    out = capsys.readouterr().out
    for secret in ("adm1n-s3cret-token", "pgpass123", "sslpass456", "redispass789", "ab" * 32):
        assert secret not in out, secret
    shown = json.loads(out)
    billing = shown["billing"]
    assert billing["admin_token"] == MASK
    assert billing["database_url"] == (f"postgresql://sg:{MASK}@db.internal:5432/sg"
                                       f"?sslpassword={MASK}&sslmode=require")
    assert billing["redis_url"] == f"redis://:{MASK}@cache.internal:6379/0"
    assert shown["auth"]["key_sha256"] == [MASK]
    # What is not secret stays readable: ports, env var names, URLs without a password.
    assert shown["server"]["ws_port"] == 8765


@pytest.mark.parametrize(("value", "expected"), [
    ("", ""),
    ("http://127.0.0.1:9000", "http://127.0.0.1:9000"),
    ("https://user@example.com/v1", "https://user@example.com/v1"),
    ("https://user:pw@example.com/v1", f"https://user:{MASK}@example.com/v1"),
    ("postgresql://u:p@h/db?password=p2", f"postgresql://u:{MASK}@h/db?password={MASK}"),
    ("http://[::1:bad", MASK),  # not parseable: shown as nothing rather than leaked
])
def test_urls_are_shown_without_their_passwords(value: str, expected: str) -> None:
    assert masked({"url": value}) == {"url": expected}


def test_empty_secrets_stay_empty() -> None:
    # "" tells the operator that nothing is set (a token will be generated at start).
    assert masked({"billing": {"admin_token": ""}, "auth": {"key_sha256": []}}) == {
        "billing": {"admin_token": ""}, "auth": {"key_sha256": []}}
