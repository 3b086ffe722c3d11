"""`streamgate` command line: serve, asr (streaming client), config check."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from server.config import ConfigError, load_config


def _serve(args: argparse.Namespace) -> int:
    from server.app import run

    overrides: dict[str, dict[str, object]] = {"server": {}}
    if args.host:
        overrides["server"]["host"] = args.host
    if args.ws_port is not None:
        overrides["server"]["ws_port"] = args.ws_port
    if args.http_port is not None:
        overrides["server"]["http_port"] = args.http_port
    try:
        config = load_config(args.config, overrides=overrides)
    except ConfigError as exc:
        print(f"streamgate: {exc}", file=sys.stderr)
        return 2
    return run(config)


def _check_config(args: argparse.Namespace) -> int:
    import msgspec

    try:
        config = load_config(args.config)
    except ConfigError as exc:
        print(f"streamgate: {exc}", file=sys.stderr)
        return 2
    print(msgspec.json.format(msgspec.json.encode(config)).decode())
    return 0


def _asr(args: argparse.Namespace) -> int:
    from server.client.asr_client import main

    return main(args)


def _tts(args: argparse.Namespace) -> int:
    from server.client.tts_client import main

    return main(args)


def _swarm(args: argparse.Namespace) -> int:
    from loadtest.swarm import run_cli

    return run_cli(args)


def _call_sim(args: argparse.Namespace) -> int:
    from server.client.call_sim import main

    return main(args)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="streamgate", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="run the gateway (WebSocket + HTTP)")
    serve.add_argument("--config", type=Path, help="TOML file layered over config/default.toml")
    serve.add_argument("--host")
    serve.add_argument("--ws-port", type=int)
    serve.add_argument("--http-port", type=int)
    serve.set_defaults(func=_serve)

    check = sub.add_parser("config", help="print the effective configuration and exit")
    check.add_argument("--config", type=Path)
    check.set_defaults(func=_check_config)

    from server.client.asr_client import add_arguments

    asr = sub.add_parser("asr", help="stream an audio file to /v1/asr/stream, print transcripts")
    add_arguments(asr)
    asr.set_defaults(func=_asr)

    from server.client.tts_client import add_arguments as add_tts_arguments

    tts = sub.add_parser("tts", help="speak text through /v1/tts/stream into a WAV file")
    add_tts_arguments(tts)
    tts.set_defaults(func=_tts)

    from server.client.call_sim import add_arguments as add_call_sim_arguments

    call_sim = sub.add_parser(
        "call-sim", help="place a simulated Twilio call: play a WAV into /v1/telephony/twilio")
    add_call_sim_arguments(call_sim)
    call_sim.set_defaults(func=_call_sim)

    from loadtest.swarm import add_arguments as add_swarm_arguments

    swarm = sub.add_parser(
        "swarm", help="hold N real-time sessions from a scenario TOML; JSON + PNG report")
    add_swarm_arguments(swarm)
    swarm.set_defaults(func=_swarm)

    from server.billing.cli import add_subcommands

    add_subcommands(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    result: int = args.func(args)
    return result


if __name__ == "__main__":
    sys.exit(main())
