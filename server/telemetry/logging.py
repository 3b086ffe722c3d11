"""Structured JSON logs. Fields come from `extra=`; keys and audio never reach a log line.
With tracing on, a line logged while a span is current carries `trace_id` and `span_id`."""

from __future__ import annotations

import logging
import sys
import time

import msgspec

from server.telemetry.tracing import TRACING, current_ids

_STD = set(vars(logging.LogRecord("", 0, "", 0, "", None, None)))
_encoder = msgspec.json.Encoder()


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, object] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        for key, value in vars(record).items():
            if key not in _STD and not key.startswith("_"):
                out[key] = value if isinstance(value, (str, int, float, bool, type(None))) \
                    else str(value)
        if TRACING.on:
            # The span current where the line was logged (a session's tasks, an HTTP request,
            # an upstream call): the line is found from its trace and the other way round.
            ids = current_ids()
            if ids is not None:
                out["trace_id"], out["span_id"] = ids
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return _encoder.encode(out).decode()


def setup_logging(level: str, json: bool) -> None:
    handler = logging.StreamHandler(sys.stderr)
    if json:
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # websockets logs every connection at INFO; our own session logs carry what matters.
    logging.getLogger("streamgate.ws.protocol").setLevel(logging.WARNING)
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)
