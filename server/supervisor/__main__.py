"""`python -m server.supervisor [serve options]`: what `streamgate serve --workers N` (N > 1)
turns into, by exec, so the supervisor carries none of the CLI's other commands."""

from __future__ import annotations

import argparse
import sys

from server.__main__ import add_serve_arguments, load_serve_config
from server.supervisor.cores import worker_count


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="streamgate serve")
    add_serve_arguments(parser)
    args = parser.parse_args(argv)
    config = load_serve_config(args)
    if config is None:
        return 2
    workers = worker_count(args.workers, config.server.workers)
    if workers == 1:
        from server.app import run

        return run(config)
    from server.supervisor.workers import run_supervisor

    return run_supervisor(config, workers)


if __name__ == "__main__":
    sys.exit(main())
