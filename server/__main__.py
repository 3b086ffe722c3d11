"""streamgate: a self-hosted real-time gateway for speech and model APIs, with metering and
prepaid wallets. Run the server, its clients, and the billing administration:"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

from server.config import Config, ConfigError, load_config

MASK = "***"
# Config values that are credentials themselves. `*_env` keys name environment variables and are
# shown: the secret stays in the environment. key_sha256 digests are masked too: a digest lets
# anyone who reads it test guesses of a key offline, and it names which keys are accepted.
SECRET_KEYS = frozenset({"admin_token", "key_sha256"})
SECRET_QUERY_PARAMS = frozenset({"password", "sslpassword"})


def load_serve_config(args: argparse.Namespace) -> Config | None:
    """The configuration `serve` runs with (None: it is invalid, and the reason was printed)."""
    overrides: dict[str, dict[str, object]] = {"server": {}}
    if args.host:
        overrides["server"]["host"] = args.host
    if args.ws_port is not None:
        overrides["server"]["ws_port"] = args.ws_port
    if args.http_port is not None:
        overrides["server"]["http_port"] = args.http_port
    try:
        return load_config(args.config, overrides=overrides)
    except ConfigError as exc:
        print(f"streamgate: {exc}", file=sys.stderr)
        return None


def _serve(args: argparse.Namespace) -> int:
    config = load_serve_config(args)
    if config is None:
        return 2
    from server.supervisor.cores import worker_count

    workers = worker_count(args.workers, config.server.workers)
    if workers > 1:
        # The same process becomes the supervisor (server/supervisor/__main__.py): exec sheds
        # the modules this CLI imported for its other commands (~30 MB it would otherwise keep
        # for the node's lifetime).
        argv = [sys.executable, "-m", "server.supervisor", "--workers", str(workers)]
        for flag, value in (("--config", args.config), ("--host", args.host),
                            ("--ws-port", args.ws_port), ("--http-port", args.http_port)):
            if value is not None:
                argv += [flag, str(value)]
        sys.stdout.flush()
        sys.stderr.flush()
        os.execv(sys.executable, argv)
    from server.app import run

    return run(config)


def add_serve_arguments(serve: argparse.ArgumentParser) -> None:
    serve.add_argument("--config", type=Path, help="TOML file layered over config/default.toml")
    serve.add_argument("--host", help="listen address of both ports (default: server.host, "
                       "127.0.0.1)")
    serve.add_argument("--ws-port", type=int, help="WebSocket port (default: server.ws_port, "
                       "8765; 0 = any free port, printed at start)")
    serve.add_argument("--http-port", type=int, help="HTTP port: REST, admin, /metrics "
                       "(default: server.http_port, 8080; 0 = any free port)")
    serve.add_argument("--workers", type=_positive_int, metavar="N",
                       help="worker processes sharing both ports, under a supervisor that "
                       "restarts and drains them (default: server.workers, else one per "
                       "available core; 1 = a single process, no supervisor)")


def _mask_url(value: str) -> str:
    """The URL with the password of its user info and of its query (libpq's `password=`)
    replaced by MASK; anything that is not a URL comes back unchanged."""
    if "://" not in value:
        return value
    try:
        parts = urlsplit(value)
        password = parts.password
    except ValueError:
        return MASK  # unparseable: it may still hold a secret, so show none of it
    netloc = parts.netloc
    if password is not None:
        userinfo, _, host = netloc.rpartition("@")
        user = userinfo.partition(":")[0]
        netloc = f"{user}:{MASK}@{host}"
    query = parts.query
    pairs = parse_qsl(query, keep_blank_values=True)
    if any(k.lower() in SECRET_QUERY_PARAMS for k, _ in pairs):
        query = urlencode([(k, MASK if k.lower() in SECRET_QUERY_PARAMS else v)
                           for k, v in pairs], safe="*")
    return urlunsplit(parts._replace(netloc=netloc, query=query))


def masked(node: Any, key: str = "") -> Any:
    """The configuration as plain data with every secret replaced by MASK (empty values stay
    empty: they show that nothing is set)."""
    if isinstance(node, dict):
        return {k: masked(v, k) for k, v in node.items()}
    if isinstance(node, list):
        return [masked(v, key) for v in node]
    if isinstance(node, str):
        if key in SECRET_KEYS and node:
            return MASK
        return _mask_url(node)
    return node


def _check_config(args: argparse.Namespace) -> int:
    import msgspec

    try:
        config = load_config(args.config)
    except ConfigError as exc:
        print(f"streamgate: {exc}", file=sys.stderr)
        return 2
    shown = masked(msgspec.to_builtins(config))
    print(msgspec.json.format(msgspec.json.encode(shown)).decode())
    return 0


def _asr(args: argparse.Namespace) -> int:
    from streamgate_client.asr_client import main

    return main(args)


def _tts(args: argparse.Namespace) -> int:
    from streamgate_client.tts_client import main

    return main(args)


def _call_sim(args: argparse.Namespace) -> int:
    from streamgate_client.call_sim import main

    return main(args)


def _replay(args: argparse.Namespace) -> int:
    from streamgate_client.replay import main

    return main(args)


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole number: {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError("must be at least 1")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="streamgate", description=__doc__,
        epilog="`streamgate COMMAND --help` shows a command's options.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    serve = sub.add_parser("serve", help="run the gateway (WebSocket + HTTP)")
    add_serve_arguments(serve)
    serve.set_defaults(func=_serve)

    check = sub.add_parser(
        "config", help="print the effective configuration (secrets masked) and exit")
    check.add_argument("--config", type=Path, help="TOML file layered over config/default.toml")
    check.set_defaults(func=_check_config)

    from streamgate_client.asr_client import add_arguments

    asr = sub.add_parser("asr", help="stream an audio file to /v1/asr/stream, print transcripts")
    add_arguments(asr)
    asr.set_defaults(func=_asr)

    from streamgate_client.tts_client import add_arguments as add_tts_arguments

    tts = sub.add_parser("tts", help="speak text through /v1/tts/stream into a WAV file")
    add_tts_arguments(tts)
    tts.set_defaults(func=_tts)

    from streamgate_client.call_sim import add_arguments as add_call_sim_arguments

    call_sim = sub.add_parser(
        "call-sim", help="place a simulated Twilio call: play a WAV into /v1/telephony/twilio")
    add_call_sim_arguments(call_sim)
    call_sim.set_defaults(func=_call_sim)

    from streamgate_client.replay import add_arguments as add_replay_arguments

    replay = sub.add_parser(
        "replay", help="replay a recorded session (record=true) against a server, diff the answers")
    add_replay_arguments(replay)
    replay.set_defaults(func=_replay)

    from server.billing.cli import add_subcommands
    from server.infra.stores import resolve_urls

    add_subcommands(sub, locate=resolve_urls)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    result: int = args.func(args)
    return result


if __name__ == "__main__":
    sys.exit(main())
