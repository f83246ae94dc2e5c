"""Errors the balancer answers with. Each maps to an HTTP status and OpenAI's error JSON
(``{"error": {"message", "type", "param", "code"}}``); messages say what to do next.

    PrefixlbError
    ├── ClientError                    4xx: the request is wrong; never retried
    │   ├── BadRequest                 400  malformed JSON, wrong types, missing fields
    │   ├── Unauthorized               401  admin endpoints without the bearer token
    │   ├── NotFound                   404  no such route
    │   ├── ModelNotFound              404  unknown model / tier
    │   ├── MethodNotAllowed           405
    │   ├── PayloadTooLarge            413  body over limits.max_body_bytes
    │   └── UnsupportedMediaType       415  not application/json
    └── ServerError                    5xx: the balancer or the fleet failed
        ├── NoReplicaAvailable         503  every replica of the tier unhealthy / draining (Retry-After)
        ├── UpstreamFailed             502  every attempt failed before the first byte
        └── UpstreamTimedOut           504  the last attempt got no first byte in time
"""

from __future__ import annotations

import orjson

__all__ = [
    "BadRequest",
    "json_object",
    "ClientError",
    "MethodNotAllowed",
    "ModelNotFound",
    "NoReplicaAvailable",
    "NotFound",
    "PayloadTooLarge",
    "PrefixlbError",
    "ServerError",
    "Unauthorized",
    "UnsupportedMediaType",
    "UpstreamFailed",
    "UpstreamTimedOut",
    "error_json",
]


def error_json(status: int, message: str, type_: str, param: str | None = None) -> bytes:
    return orjson.dumps({"error": {"message": message, "type": type_, "param": param, "code": status}})


class PrefixlbError(Exception):
    status = 500
    type = "internal_error"

    def __init__(self, message: str, param: str | None = None, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        self.headers = headers or {}

    def body(self) -> bytes:
        return error_json(self.status, self.message, self.type, self.param)


class ClientError(PrefixlbError):
    status = 400
    type = "invalid_request_error"


class BadRequest(ClientError):
    pass


def json_object(raw: bytes) -> dict:
    """A request body that must be a JSON object (empty: ``{}``), or BadRequest saying why not."""
    try:
        v = orjson.loads(raw or b"{}")
    except orjson.JSONDecodeError as exc:
        raise BadRequest(f"body is not valid JSON: {exc}") from None
    if not isinstance(v, dict):
        raise BadRequest("body must be a JSON object")
    return v


class Unauthorized(ClientError):
    status = 401
    type = "authentication_error"


class NotFound(ClientError):
    status = 404
    type = "not_found_error"


class ModelNotFound(ClientError):
    status = 404
    type = "model_not_found"


class MethodNotAllowed(ClientError):
    status = 405
    type = "method_not_allowed"


class Conflict(ClientError):
    status = 409
    type = "conflict"


class PayloadTooLarge(ClientError):
    status = 413
    type = "request_too_large"


class UnsupportedMediaType(ClientError):
    status = 415
    type = "unsupported_media_type"


class ServerError(PrefixlbError):
    status = 500


class NoReplicaAvailable(ServerError):
    status = 503
    type = "service_unavailable"


class UpstreamFailed(ServerError):
    status = 502
    type = "upstream_error"


class UpstreamTimedOut(ServerError):
    status = 504
    type = "upstream_timeout"
