"""Errors the server raises, each with a stable machine-readable code.

Every error response has the shape ``{"error": {"code": "...", "message": "..."}}``.
Handlers map these classes (and FastAPI's own errors) to that shape in
:mod:`fleet_server.app`.
"""

from __future__ import annotations

from typing import Any


class ServerError(Exception):
    """Root of the server's errors."""

    status_code = 500
    code = "internal_error"

    def __init__(self, message: str, *, details: Any = None) -> None:
        super().__init__(message)
        self.message = message
        self.details = details


class NotAuthenticatedError(ServerError):
    status_code = 401
    code = "not_authenticated"


class InvalidTokenError(ServerError):
    status_code = 401
    code = "invalid_token"


class PermissionDeniedError(ServerError):
    status_code = 403
    code = "permission_denied"


class NotFoundError(ServerError):
    status_code = 404
    code = "not_found"


class ConflictError(ServerError):
    status_code = 409
    code = "conflict"


class EnrollmentTokenError(ServerError):
    """The enrollment token is unknown, already used or expired."""

    status_code = 401
    code = "enrollment_token_invalid"


class BundleRejectedError(ServerError):
    """An uploaded bundle failed verification against the server's trust store."""

    status_code = 422
    code = "bundle_rejected"


class BadRequestError(ServerError):
    status_code = 400
    code = "bad_request"


class PayloadTooLargeError(ServerError):
    status_code = 413
    code = "payload_too_large"


class RangeNotSatisfiableError(ServerError):
    status_code = 416
    code = "range_not_satisfiable"


class NotImplementedYetError(ServerError):
    status_code = 501
    code = "not_implemented"


class ServiceUnavailableError(ServerError):
    status_code = 503
    code = "unavailable"


class NotConfiguredError(ServerError):
    """The request needs a feature this server was started without (a client error: the
    message says which setting enables it)."""

    status_code = 409
    code = "not_configured"


def error_body(code: str, message: str, details: Any = None) -> dict[str, Any]:
    """The JSON body of every error response."""
    err: dict[str, Any] = {"code": code, "message": message}
    if details is not None:
        err["details"] = details
    return {"error": err}


class InvalidRolloutSpecError(ServerError):
    status_code = 422
    code = "invalid_rollout_spec"


class InvalidTransitionError(ServerError):
    """The rollout's status does not allow this action (e.g. resume a running rollout)."""

    status_code = 409
    code = "invalid_transition"
