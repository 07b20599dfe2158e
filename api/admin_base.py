"""The admin API's plumbing: calls to the pool's controller, the bearer-token guard of mutating
calls, and errors as JSON in the shapes the published spec declares (``api/admin.py``)."""

import asyncio
import hmac
from typing import Annotated, Any

import ray
from fastapi import Depends, FastAPI, Request, Security
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from actors.admin_ops import GoalConflictError, PolicyValueError
from actors.admin_views import Overview, UnknownIdError
from actors.names import CONTROLLER_NAME
from api import admin_models as m
from pool.errors import UnknownBlockError

TOKEN_ENV = "WEIGHTPOOL_ADMIN_TOKEN"
CALL_TIMEOUT_S = 30.0


class PoolUnavailableError(Exception):
    """The pool's controller cannot be reached (no pool in the namespace, or it is down)."""


class Controller:
    """Calls to the pool's controller actor, found by name; the handle is cached and dropped
    when the actor stops answering (a restarted pool is found again)."""

    def __init__(self, namespace: str, timeout_s: float = CALL_TIMEOUT_S):
        self.namespace = namespace
        self.timeout_s = timeout_s
        self._handle: Any = None

    def handle(self) -> Any:
        if self._handle is None:
            try:
                self._handle = ray.get_actor(CONTROLLER_NAME, namespace=self.namespace)
            except Exception as err:  # no such actor, or Ray not connected
                raise PoolUnavailableError(
                    f"no pool answers in Ray namespace {self.namespace!r}: {err}"
                ) from None
        return self._handle

    async def call(self, method: str, *args: Any) -> Any:
        """``method`` on the controller; its own errors are raised as they were raised there.

        Raises:
            PoolUnavailableError: the controller is gone or did not answer within ``timeout_s``.
        """
        ref = getattr(self.handle(), method).remote(*args)
        try:
            return await asyncio.wait_for(_awaited(ref), self.timeout_s)
        except ray.exceptions.RayTaskError as err:
            raise (err.cause if isinstance(err.cause, Exception) else err) from None
        except (ray.exceptions.RayError, TimeoutError) as err:
            self._handle = None
            raise PoolUnavailableError(
                f"the pool's controller in namespace {self.namespace!r} did not answer: "
                f"{type(err).__name__}"
            ) from None

    def overview_or_none(self) -> Overview | None:
        """For the metrics collector (a thread): the overview, or None if the pool is down."""
        try:
            overview: Overview = ray.get(
                self.handle().admin_overview.remote(), timeout=self.timeout_s
            )
            return overview
        except (PoolUnavailableError, ray.exceptions.RayError):
            self._handle = None
            return None


async def _awaited(ref: Any) -> Any:
    return await ref


def error_response(status: int, detail: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"detail": detail}, status_code=status, headers=headers)


def validation_errors(errors: list[Any]) -> JSONResponse:
    """A 422 in FastAPI's shape whose messages name the field and the value."""
    detail = []
    for e in errors:
        loc = [str(p) for p in e.get("loc", ())]
        field = ".".join(p for p in loc if p not in ("body", "query", "path")) or "(body)"
        value = e.get("input")
        shown = repr(value) if len(repr(value)) <= 200 else repr(value)[:200] + "..."
        detail.append(
            {"loc": loc, "msg": f"{field}={shown}: {e.get('msg', '')}", "type": e.get("type", "")}
        )
    return JSONResponse({"detail": detail}, status_code=422)


MUTATING_METHODS = frozenset({"POST", "PUT", "PATCH", "DELETE"})


class RefusedError(Exception):
    def __init__(self, status: int, detail: str):
        super().__init__(detail)
        self.status = status
        self.detail = detail


def refusal(secret: bytes | None, authorization: str | None) -> RefusedError | None:
    """Why a mutating call with this ``Authorization`` header is refused; None if it is not.
    Tokens are compared in constant time."""
    if secret is None:
        return RefusedError(
            403,
            f"mutating calls are disabled: no admin token is configured (set {TOKEN_ENV} where "
            "the admin API runs)",
        )
    scheme, _, given = (authorization or "").strip().partition(" ")
    if scheme.lower() == "bearer" and hmac.compare_digest(given.strip().encode(), secret):
        return None
    wrong = "; the token given is wrong" if authorization else ""
    return RefusedError(401, f"a mutating call needs 'Authorization: Bearer <admin token>'{wrong}")


def refused_response(err: RefusedError) -> JSONResponse:
    headers = {"WWW-Authenticate": "Bearer"} if err.status == 401 else None
    return error_response(err.status, err.detail, headers)


ERRORS: dict[int | str, dict[str, Any]] = {503: {"model": m.ErrorOut}}
NOT_FOUND: dict[int | str, dict[str, Any]] = {404: {"model": m.ErrorOut}}
MUTATING: dict[int | str, dict[str, Any]] = {
    401: {"model": m.ErrorOut, "description": "no or wrong bearer token"},
    403: {"model": m.ErrorOut, "description": "no admin token is configured"},
    409: {"model": m.ErrorOut, "description": "the goal cannot be carried out"},
}
NOT_JSON: dict[int | str, dict[str, Any]] = {
    400: {"model": m.ErrorOut, "description": "the body is not JSON text"}
}


def install_guards(app: FastAPI, secret: bytes | None) -> list[Any]:
    """Install the token guard and the error handlers on ``app``; return the dependencies a
    mutating route declares (they put the bearer scheme in the spec). ``secret`` None: no token
    is configured, and every mutating call is refused (403)."""
    bearer = HTTPBearer(auto_error=False, description=f"the admin token (${TOKEN_ENV})")

    @app.middleware("http")
    async def authorize(request: Request, call_next: Any) -> Any:
        """Mutating calls are authorized before anything else (even reading their body)."""
        if request.method in MUTATING_METHODS:
            refused = refusal(secret, request.headers.get("authorization"))
            if refused is not None:
                return refused_response(refused)
        return await call_next(request)

    def require_token(
        request: Request,
        _: Annotated[HTTPAuthorizationCredentials | None, Security(bearer)],
    ) -> None:
        """The same check, declared per route (the spec's security) and kept as a backstop."""
        refused = refusal(secret, request.headers.get("authorization"))
        if refused is not None:
            raise refused

    auth = [Depends(require_token)]

    @app.exception_handler(RefusedError)
    async def refused(_: Request, err: RefusedError) -> JSONResponse:
        return refused_response(err)

    @app.exception_handler(PoolUnavailableError)
    async def unavailable(_: Request, err: PoolUnavailableError) -> JSONResponse:
        return error_response(503, str(err))

    @app.exception_handler(UnknownIdError)
    @app.exception_handler(UnknownBlockError)
    async def not_found(_: Request, err: Exception) -> JSONResponse:
        return error_response(404, str(err.args[0]) if err.args else str(err))

    @app.exception_handler(GoalConflictError)
    async def conflict(_: Request, err: GoalConflictError) -> JSONResponse:
        return error_response(409, str(err))

    @app.exception_handler(PolicyValueError)
    async def bad_policy(_: Request, err: PolicyValueError) -> JSONResponse:
        return validation_errors(
            [{"loc": ("body", err.field), "input": err.value, "msg": str(err), "type": "value"}]
        )

    @app.exception_handler(RequestValidationError)
    async def invalid(_: Request, err: RequestValidationError) -> JSONResponse:
        return validation_errors(list(err.errors()))

    return auth
