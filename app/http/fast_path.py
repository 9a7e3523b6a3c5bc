"""The lookup at the outermost ASGI layer: a valid `POST /api/users`, answered before routing.

`POST /api/users` with 50 cached ids spent about 40 % of its in-process time in the
framework rather than the lookup: routing, the request wrappers, the response object.
`GatewayMiddleware` calls `FastLookup.serve` once it has read the headers (one pass),
named the client, checked its key and its requests a minute and set the request id, so
all of those apply as before.

What is served here is exactly what the route would answer, because it runs the route's
own steps, in the route's order, with the route's functions: `require_json`,
`parse_user_ids`, `start_lookup` (the ids a minute, then `Gateway.lookup_now`, which also
keeps the gateway's counts). Anything the route would refuse (another content type, a
body that is not a valid id list) is not judged here: the request goes on to FastAPI
untouched, its body replayed, and the route answers it with its own message.

When memory cannot answer the batch whole, the lookup is finished here too, with the
route's `finish_lookup` (its new ids taken from the client's miss quota, then the store
and the fetches): the store path, which the route served at a FastAPI route's cost, is
as cheap at the edge as a memory hit's, and nothing is counted twice.

Answered here, a request is labelled in the metrics by the route FastAPI would have
matched (`scope["route"]`), so it is counted exactly as before. The route stays the
one documented in /docs.
"""

from __future__ import annotations

from starlette.routing import BaseRoute
from starlette.types import Message, Receive, Scope, Send

from app.errors import InvalidRequest, UnsupportedMediaType
from app.gateway import LookupResult
from app.http.auth import Client
from app.http.dependencies import finish_lookup, start_lookup
from app.http.schemas.common import require_json
from app.http.schemas.users import parse_user_ids
from app.http.state import Services

PATH = "/api/users"
_JSON = b"application/json"


class FastLookup:
    """Serves `POST /api/users` before routing: from memory, the store and the fetches."""

    def __init__(self, services: Services, route: BaseRoute) -> None:
        self.services = services
        self.route = route
        """The route that serves the path in FastAPI: the metrics label by it."""

    async def serve(
        self,
        scope: Scope,
        receive: Receive,
        send: Send,
        client: Client,
        content_type: bytes | None,
    ) -> Receive | None:
        """Answer the lookup (None: a 200 was sent), or the `receive` to hand FastAPI:
        the body replayed. `send` is the middleware's, which adds the request id and
        notes what was sent (an error after the 200 started is then not answered again).

        Called only for a POST to PATH with a declared Content-Length, after the
        middleware's checks. GatewayErrors raised here (429, 503) are answered by the
        middleware as the route's would be by the app's handler.
        """
        gateway = self.services.gateway
        if gateway is None:
            return receive  # the route answers 503
        message = await receive()
        if message["type"] == "http.request" and not message.get("more_body", False):
            messages, body = [message], message.get("body", b"")
        else:
            messages, body = await _read_rest(message, receive)
            if messages[-1]["type"] != "http.request":
                return _replaying(messages, receive)  # the client left: FastAPI sees it
        try:
            if content_type != _JSON:  # the common case needs no decoding
                require_json(content_type.decode("latin-1") if content_type else None)
            user_ids = parse_user_ids(body, max_ids=gateway.settings.max_users_per_request)
        except (InvalidRequest, UnsupportedMediaType):
            return _replaying(messages, receive)  # the route says what is wrong, its way
        scope["route"] = self.route  # from here on the request is the route's, for metrics
        limits = self.services.limits
        result = start_lookup(limits, client, gateway, user_ids)
        if not isinstance(result, LookupResult):
            result = await finish_lookup(limits, client, gateway, result)
        answer = result.to_json()
        # The route's `Response(media_type=...)` headers in its order (the middleware's
        # `send` adds the request id after them, as to every answer).
        headers = [(b"content-length", b"%d" % len(answer)), (b"content-type", _JSON)]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        await send({"type": "http.response.body", "body": answer})
        return None


async def _read_rest(first: Message, receive: Receive) -> tuple[list[Message], bytes]:
    """The messages received until the body ended (or the client left), and the body."""
    messages = [first]
    chunks = [first.get("body", b"")]
    message = first
    # Bounded: the middleware checked the declared Content-Length.
    while message["type"] == "http.request" and message.get("more_body", False):
        message = await receive()
        messages.append(message)
        chunks.append(message.get("body", b""))
    return messages, b"".join(chunks)


def _replaying(messages: list[Message], receive: Receive) -> Receive:
    """`receive`, giving back the messages already read first."""
    pending = list(messages)

    async def replay() -> Message:
        if pending:
            return pending.pop(0)
        return await receive()

    return replay
