"""A worker process of `streamgate serve --workers N`, as the supervisor starts it:

    python -m server.supervisor.worker CONFIG_JSON LIFELINE_FD WORKER_INDEX

It is an ordinary single-process gateway (server/app.py) with the node's shared configuration;
its log lines carry `"worker": WORKER_INDEX` (the supervisor's lines name the same index), and it
has a lifeline: the read end of a pipe whose write end only the supervisor holds. When the
supervisor dies without telling anyone (kill -9), the pipe reaches end of file and the worker
drains as on SIGTERM instead of serving on as an orphan that no one will ever stop.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import sys
import threading
from pathlib import Path

from server.supervisor.worker_config import read_worker_config


def watch_lifeline(fd: int) -> None:
    def wait_for_end() -> None:
        with contextlib.suppress(OSError):
            while os.read(fd, 64):
                pass
        os.kill(os.getpid(), signal.SIGTERM)  # the gateway's own handler drains

    # A thread blocked in read(): no cost, and no task for the strict leaked-task check.
    threading.Thread(target=wait_for_end, name="supervisor-lifeline", daemon=True).start()


def tag_log_records(index: int) -> None:
    """Every log record of this process carries the worker's index (the JSON formatter prints
    a record's extra attributes): N workers write to one stderr."""
    make_record = logging.getLogRecordFactory()

    def tagged(*args: object, **kwargs: object) -> logging.LogRecord:
        record = make_record(*args, **kwargs)
        record.worker = index
        return record

    logging.setLogRecordFactory(tagged)


def main(argv: list[str]) -> int:
    if len(argv) != 3:
        print("usage: python -m server.supervisor.worker CONFIG_JSON LIFELINE_FD WORKER_INDEX",
              file=sys.stderr)
        return 2
    config = read_worker_config(Path(argv[0]))
    tag_log_records(int(argv[2]))
    watch_lifeline(int(argv[1]))
    from server.app import run

    return run(config)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
