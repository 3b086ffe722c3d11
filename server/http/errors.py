"""One error shape for every HTTP response: {"error": {"code", "message"}}."""

from __future__ import annotations

from aiohttp import web


def error_response(
    status: int, code: str, message: str, headers: dict[str, str] | None = None
) -> web.Response:
    return web.json_response(
        {"error": {"code": code, "message": message}}, status=status, headers=headers
    )


class ApiError(Exception):
    """Raised by handlers; the middleware turns it into error_response."""

    def __init__(self, status: int, code: str, message: str,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.headers = headers
