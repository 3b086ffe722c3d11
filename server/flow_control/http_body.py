"""Bounds on reading request bodies on the HTTP port (every route), and on HTTP at shutdown.

aiohttp's server reads a body only as fast as a handler asks for it and has no read timeout
of its own: a client that promises a Content-Length and stops sending holds its handler (and a
SIGTERM) for as long as it likes. What aiohttp does after an answer sent before the body was
read ("lingering close": read and drop the rest for up to 10 s) runs in the connection's task
after the request is over, where neither a vanished client nor shutdown ends it. So both live
in server/http/app.py, inside the request, where aiohttp's own disconnect and shutdown signals
(an exception set on the body stream) reach them; docs/decisions/0701-http-body-bounds.md.
"""

from __future__ import annotations

from typing import Final

# server.http_body_timeout_s: a handler waiting for body bytes that do not come for this long
# fails the request with 408. Silence, not the whole upload: a slow link that keeps sending is
# never cut, and time the server spends not reading (back pressure) never counts.
DEFAULT_BODY_TIMEOUT_S: Final = 30.0

# An answer sent before its body was read (415, 413, 401, a replay): the rest of the body is read
# and dropped after the answer is written, so a client still sending reads the answer instead of
# a reset (closing a socket with unread data sends RST, which can destroy what was sent). At most
# this long in all (aiohttp's lingering default is 10 s; the client already has its answer) ...
EARLY_ANSWER_LINGER_S: Final = 5.0
# ... and no longer than this after the client's last bytes (nginx's lingering_timeout idea):
# a client that has gone quiet has nothing in flight that a close could reset.
EARLY_ANSWER_QUIET_S: Final = 1.0

# SIGTERM: HTTP requests still running when the listeners close get what is left of
# server.drain_timeout_s, but at least this long to write their answer. Then aiohttp ends their
# body reads (503 `draining`) and, if they still run, cancels them.
HTTP_SHUTDOWN_MIN_GRACE_S: Final = 1.0
