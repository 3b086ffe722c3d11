"""API keys and per-key rate limits for the HTTP model APIs (`/v1/...`), as at the WebSocket
upgrade: the same Authenticator, the same admission policy (GCRA per key)."""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from aiohttp import web

from server.http.errors import ApiError, error_response
from server.protocol.admission import AdmissionPolicy, Authenticator, Principal
from server.protocol.errors import Rejected, refuse

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
PrincipalFor = Callable[[web.Request], Awaitable[Principal]]
PRINCIPAL_KEY: web.AppKey[PrincipalFor] = web.AppKey("principal_for")


def api_key_of(request: web.Request) -> str | None:
    auth = request.headers.get("Authorization", "")
    scheme, _, value = auth.partition(" ")
    if scheme.lower() == "bearer" and value.strip():
        return value.strip()
    return request.headers.get("X-API-Key") or None


def api_error(refused: Rejected) -> ApiError:
    """A refusal from the error catalogue as this HTTP API raises it."""
    return ApiError(refused.status, refused.code, refused.message, refused.headers or None)


def install_api_auth(app: web.Application, authenticator: Authenticator,
                     policy: AdmissionPolicy | None) -> None:
    """Routes call `await principal(request)`; errors become JSON with the right status."""

    async def principal_for(request: web.Request) -> Principal:
        try:
            principal = await authenticator.authenticate(api_key_of(request))
        except Exception:
            raise api_error(refuse("auth_unavailable",
                                   "cannot check API keys right now; retry")) from None
        if principal is None:
            raise api_error(refuse("unauthorized", "missing or invalid API key"))
        if policy is not None:
            refused: Rejected | None = await policy.check_upgrade(principal)
            if refused is not None:
                raise api_error(refused)
        return principal

    @web.middleware
    async def api_errors(request: web.Request, handler: Handler) -> web.StreamResponse:
        try:
            return await handler(request)
        except ApiError as exc:
            return error_response(exc.status, exc.code, exc.message, exc.headers)
        except web.HTTPException as exc:
            if exc.status < 400:
                raise
            # aiohttp's own refusals (body over client_max_size, unknown route, wrong method)
            # come as text/plain: answer them in the one JSON error shape too.
            headers = {k: v for k, v in exc.headers.items() if k.lower() == "allow"}
            return error_response(exc.status, _AIOHTTP_CODES.get(exc.status, "http_error"),
                                  exc.text or exc.reason, headers or None)

    app[PRINCIPAL_KEY] = principal_for
    app.middlewares.append(api_errors)


_AIOHTTP_CODES = {404: "not_found", 405: "method_not_allowed", 413: "payload_too_large"}


async def principal(request: web.Request) -> Principal:
    principal_for: PrincipalFor = request.app[PRINCIPAL_KEY]
    return await principal_for(request)
