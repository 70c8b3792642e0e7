"""Caps request bodies while they are read: a declared Content-Length over the cap is refused before a
byte of the body is read, and a body without one (chunked) is counted as it arrives and refused at the
first byte over. A client that stalls mid-body for longer than read_timeout_s is answered 408. Both
answers close the connection, so the rest of such a body is never read."""
import asyncio

from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Receive, Scope, Send

from hark.server.errors import error_response

CLOSE = {"Connection": "close"}


class BodyLimit:
    def __init__(self, app: ASGIApp, max_upload_bytes: int, max_json_bytes: int, read_timeout_s: float = 30.0):
        self.app, self.max_upload_bytes, self.max_json_bytes = app, max_upload_bytes, max_json_bytes
        self.read_timeout_s = read_timeout_s

    def _cap(self, scope: Scope) -> int:
        return self.max_upload_bytes if scope["path"].startswith("/v1/audio/") else self.max_json_bytes

    def _too_large(self, cap: int) -> str:
        return f"request body is over the limit of {cap / 2**20:.1f} MiB; send a smaller or more compressed file"

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        cap = self._cap(scope)
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > cap:
            response = error_response(413, self._too_large(cap), code="request_too_large", headers=CLOSE)
            return await response(scope, receive, send)
        received, body_done = 0, False

        async def capped_receive():
            nonlocal received, body_done
            if body_done:
                return await receive()
            try:
                message = await asyncio.wait_for(receive(), self.read_timeout_s)
            except asyncio.TimeoutError:
                raise HTTPException(408, f"the request body stalled for over {self.read_timeout_s:g} s",
                                    headers=CLOSE) from None
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > cap:
                    raise HTTPException(413, self._too_large(cap), headers=CLOSE)
                body_done = not message.get("more_body", False)
            return message

        await self.app(scope, capped_receive, send)
