"""`--max-request-body-mb`: a request body over the limit is refused with a 400 in the OpenAI
error shape (code `request_too_large`) before any of it is parsed.

Pure ASGI (no BaseHTTPMiddleware), so streaming responses and disconnect detection are kept.
A declared Content-Length over the limit is refused without reading the body; a chunked body
is read up to the limit, then replayed to the app.
"""

from __future__ import annotations

from pagedllm.entrypoints.openai.errors import error_response

_METHODS_WITH_BODY = frozenset({"POST", "PUT", "PATCH"})


class BodySizeLimitMiddleware:
    def __init__(self, app, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http" or scope.get("method") not in _METHODS_WITH_BODY:
            await self.app(scope, receive, send)
            return
        declared = _content_length(scope)
        if declared is not None and declared > self.max_bytes:
            await self._refuse(scope, receive, send, declared)
            return
        messages, size = [], 0
        while True:
            message = await receive()
            messages.append(message)
            if message["type"] != "http.request":
                break
            size += len(message.get("body", b""))
            if size > self.max_bytes:
                await self._refuse(scope, receive, send, size)
                return
            if not message.get("more_body", False):
                break
        replay = iter(messages)

        async def replay_receive():
            message = next(replay, None)
            return message if message is not None else await receive()

        await self.app(scope, replay_receive, send)

    async def _refuse(self, scope, receive, send, size: int) -> None:
        limit_mb = self.max_bytes / 2**20
        response = error_response(
            f"Request body too large: {size} bytes; the limit is {self.max_bytes} bytes "
            f"({limit_mb:g} MiB, --max-request-body-mb).", 400, code="request_too_large",
        )
        await response(scope, receive, send)


def _content_length(scope) -> int | None:
    for name, value in scope.get("headers", ()):
        if name == b"content-length":
            try:
                return int(value)
            except ValueError:
                return None
    return None
