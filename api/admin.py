"""The admin API (FastAPI): what dashboards, scripts and operators call on a running pool.

Reads need nothing; every mutating call (PUT, POST, DELETE) needs ``Authorization: Bearer
<token>`` with the token given to :func:`create_app` or in ``WEIGHTPOOL_ADMIN_TOKEN``. Without a
configured token mutating calls are refused (403), never open; a missing or wrong token is 401.

The app holds no state of the pool: every call asks the pool's named controller actor. Mutating
calls record goals (pin a block, drain a tier, a new policy) that the controller's loop carries
out (STYLE rule 4); their progress shows in the reads and the audit log. Errors: an unknown id is
404, a goal that cannot be carried out 409, a bad value 422 naming the field and the value, a pool
that does not answer 503; nothing changes in any of these cases.

Run it with ``weightpool admin`` (uvicorn, loopback by default) or as the Ray Serve ingress
``api.serve:admin_app``.
"""

import json
import os
from pathlib import Path
from typing import Annotated, Any

import click
from fastapi import FastAPI, Query
from fastapi.exceptions import RequestValidationError
from fastapi.responses import Response
from pydantic import ValidationError
from starlette.concurrency import run_in_threadpool

from actors.admin_views import Overview
from api import admin_models as m
from api.admin_base import (
    ERRORS,
    MUTATING,
    NOT_FOUND,
    NOT_JSON,
    TOKEN_ENV,
    Controller,
    install_guards,
)
from api.metrics import CONTENT_TYPE, metrics_registry, render
from policy.config import PolicyConfig
from policy.plan import Rule
from pool.blocks import BlockKind
from pool.states import BlockState

DESCRIPTION = (
    "The admin API of a weightpool pool. Reads need no token; every PUT, POST and DELETE needs "
    "`Authorization: Bearer <token>` (the token in `WEIGHTPOOL_ADMIN_TOKEN` where the API runs; "
    "without one, mutating calls are refused with 403). Mutating calls record goals that the "
    "pool's control loop carries out; their progress shows in the reads and in the audit log."
)
Limit = Annotated[int, Query(ge=1, le=1000, description="items per page")]
Offset = Annotated[int, Query(ge=0, le=1 << 31, description="items skipped")]


def create_app(namespace: str = "weightpool", token: str | None = None) -> FastAPI:
    """The admin app for the pool in Ray namespace ``namespace`` (Ray must be connected when a
    request comes). ``token`` (else ``$WEIGHTPOOL_ADMIN_TOKEN``; an empty one counts as none)
    guards mutating calls. The app is stateless: several replicas may serve one pool."""
    secret = token if token is not None else os.environ.get(TOKEN_ENV)
    secret_bytes = secret.encode() if secret else None
    controller = Controller(namespace)
    app = FastAPI(
        title="weightpool admin",
        version="1",
        description=DESCRIPTION,
        redirect_slashes=False,
    )

    auth = install_guards(app, secret_bytes)

    @app.get("/health", response_model=m.Health, responses=ERRORS, tags=["read"])
    async def health() -> m.Health:
        """The pool answers: its size and goals (503 if its controller does not answer)."""
        o: Overview = await controller.call("admin_overview")
        return m.Health(
            status="ok",
            namespace=namespace,
            blocks=o.blocks,
            models=len(o.models),
            tiers=len(o.tiers),
            tiers_alive=sum(t.alive for t in o.tiers),
            pins=o.pins,
            drains=o.drains,
        )

    @app.get("/tiers", response_model=m.TierList, responses=ERRORS, tags=["read"])
    async def tiers() -> m.TierList:
        """Every tier: capacity, use, kind, node, emulated or real, alive, drain progress."""
        o: Overview = await controller.call("admin_overview")
        return m.TierList(tiers=[m.TierOut.model_validate(t) for t in o.tiers])

    @app.get("/blocks", response_model=m.BlockPage, responses={**ERRORS, **NOT_FOUND})
    async def blocks(
        offset: Offset = 0,
        limit: Limit = 100,
        state: Annotated[BlockState | None, Query()] = None,
        tier: Annotated[str | None, Query(description="blocks with a copy on this tier")] = None,
        layer: Annotated[int | None, Query(ge=-1, le=1 << 31)] = None,
        model: Annotated[str | None, Query()] = None,
        kind: Annotated[BlockKind | None, Query()] = None,
    ) -> m.BlockPage:
        """Blocks in registration order, filtered (all filters must hold); 404 for an unknown
        tier or model."""
        page = await controller.call(
            "admin_blocks",
            None if state is None else state.value,
            tier,
            layer,
            model,
            None if kind is None else kind.value,
            offset,
            limit,
        )
        return m.BlockPage(
            total=page.total,
            offset=offset,
            limit=limit,
            next_offset=m.next_offset(page, offset, limit),
            blocks=[m.BlockOut.model_validate(b) for b in page.items],
        )

    @app.get(
        "/blocks/{block_id:path}",
        response_model=m.BlockDetailOut,
        responses={**ERRORS, **NOT_FOUND},
    )
    async def block(block_id: str) -> m.BlockDetailOut:
        """One block: copies, encodings, state, lease holders, pin, last decision, history."""
        return m.block_detail_out(await controller.call("admin_block", block_id))

    async def audit(
        kind: str,
        block: str | None,
        to_state: str | None,
        rule: str | None,
        offset: int,
        limit: int,
    ) -> m.AuditPage:
        page = await controller.call("admin_audit", kind, block, to_state, rule, offset, limit)
        return m.audit_page(page, offset, limit)

    @app.get("/transitions", response_model=m.AuditPage, responses=ERRORS, tags=["audit"])
    async def transitions(
        offset: Offset = 0,
        limit: Limit = 100,
        block: Annotated[str | None, Query(description="one block's")] = None,
        to_state: Annotated[BlockState | None, Query()] = None,
    ) -> m.AuditPage:
        """Executed transitions, newest first."""
        state = None if to_state is None else to_state.value
        return await audit("transition", block, state, None, offset, limit)

    @app.get("/vetoes", response_model=m.AuditPage, responses=ERRORS, tags=["audit"])
    async def vetoes(
        offset: Offset = 0,
        limit: Limit = 100,
        block: Annotated[str | None, Query(description="one block's")] = None,
        rule: Annotated[Rule | None, Query()] = None,
    ) -> m.AuditPage:
        """Transitions the accuracy veto rejected, with rule and numbers, newest first."""
        return await audit(
            "rejection", block, None, None if rule is None else rule.value, offset, limit
        )

    @app.get("/audit", response_model=m.AuditPage, responses=ERRORS, tags=["audit"])
    async def audit_log(
        offset: Offset = 0,
        limit: Limit = 100,
        kind: Annotated[m.AuditKind | None, Query()] = None,
        block: Annotated[str | None, Query(description="one block's")] = None,
    ) -> m.AuditPage:
        """The whole audit log (goals included), newest first."""
        page = await controller.call(
            "admin_audit", None if kind is None else kind.value, block, None, None, offset, limit
        )
        return m.audit_page(page, offset, limit)

    @app.get("/goals", response_model=m.Goals, responses=ERRORS, tags=["goals"])
    async def goals() -> m.Goals:
        """Pins and drains the controller is carrying out."""
        pins, drains = await controller.call("admin_goals")
        return m.Goals(
            pins=[m.pin_out(g.block_id, g, ok) for g, ok in pins],
            drains=[m.drain_out(t, p) for t, p in drains],
        )

    @app.get("/policy", response_model=PolicyConfig, responses=ERRORS, tags=["policy"])
    async def get_policy() -> PolicyConfig:
        """The policy the control step uses now."""
        policy: PolicyConfig = await controller.call("policy")
        return policy

    @app.put(
        "/policy",
        response_model=PolicyConfig,
        dependencies=auth,
        responses={**ERRORS, **MUTATING, **NOT_JSON},
        tags=["policy"],
    )
    async def put_policy(update: m.PolicyUpdate) -> PolicyConfig:
        """Change policy fields (the others keep their values); used from the next step. A bad
        value is 422 naming the field and the value, and nothing changes."""
        current: PolicyConfig = await controller.call("policy")
        changes = update.model_dump(exclude_none=True)
        try:
            merged = PolicyConfig.model_validate({**current.model_dump(), **changes})
        except ValidationError as err:
            raise RequestValidationError(
                [{**e, "loc": ("body", *e["loc"])} for e in err.errors()]
            ) from None
        policy: PolicyConfig = await controller.call("set_policy", merged)
        return policy

    @app.post(
        "/blocks/{block_id:path}/pin",
        response_model=m.PinOut,
        dependencies=auth,
        responses={**ERRORS, **NOT_FOUND, **MUTATING},
        tags=["goals"],
    )
    async def pin(block_id: str) -> m.PinOut:
        """Goal: keep the block resident in its home HBM at full precision (idempotent)."""
        goal = await controller.call("pin", block_id)
        return m.pin_out(block_id, goal, await controller.call("pin_satisfied", block_id))

    @app.delete(
        "/blocks/{block_id:path}/pin",
        response_model=m.PinOut,
        dependencies=auth,
        responses={**ERRORS, **NOT_FOUND, **MUTATING},
        tags=["goals"],
    )
    async def unpin(block_id: str) -> m.PinOut:
        """Remove the block's pin goal (idempotent); the policy places it again."""
        await controller.call("unpin", block_id)
        return m.pin_out(block_id, None, False)

    @app.post(
        "/tiers/{tier_id:path}/drain",
        response_model=m.DrainOut,
        dependencies=auth,
        responses={**ERRORS, **NOT_FOUND, **MUTATING},
        tags=["goals"],
    )
    async def drain(tier_id: str) -> m.DrainOut:
        """Goal: move every copy off the tier and place nothing new there (idempotent). 409
        for the storage tier or the last HBM tier."""
        await controller.call("drain", tier_id)
        return m.drain_out(tier_id, await controller.call("drain_progress", tier_id))

    @app.delete(
        "/tiers/{tier_id:path}/drain",
        response_model=m.DrainOut,
        dependencies=auth,
        responses={**ERRORS, **NOT_FOUND, **MUTATING},
        tags=["goals"],
    )
    async def undrain(tier_id: str) -> m.DrainOut:
        """Remove the tier's drain goal (idempotent): placement may use it again."""
        await controller.call("undrain", tier_id)
        return m.drain_out(tier_id, None)

    registry = metrics_registry(controller.overview_or_none)

    @app.get(
        "/metrics",
        response_class=Response,
        tags=["read"],
        responses={200: {"content": {CONTENT_TYPE: {"schema": {"type": "string"}}}}},
    )
    async def metrics() -> Response:
        """Prometheus text exposition, read from the controller on every scrape."""
        return Response(await run_in_threadpool(render, registry), media_type=CONTENT_TYPE)

    return app


def openapi_spec(namespace: str = "weightpool") -> dict[str, Any]:
    """The admin API's OpenAPI document (no Ray needed)."""
    spec: dict[str, Any] = create_app(namespace, token="unused").openapi()
    return spec


@click.command("admin")
@click.option(
    "--address",
    default="auto",
    show_default=True,
    help="Ray cluster to join: 'auto' (the one on this machine) or host:port.",
)
@click.option(
    "--namespace", default="weightpool", show_default=True, help="Ray namespace of the pool."
)
@click.option(
    "--host",
    default="127.0.0.1",
    show_default=True,
    help="Interface to bind (loopback by default; the API is for operators).",
)
@click.option("--port", default=8080, show_default=True, type=click.IntRange(0, 65535))
@click.option(
    "--openapi",
    "openapi_file",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="Write the OpenAPI spec (JSON) to this file and exit.",
)
def admin(address: str, namespace: str, host: str, port: int, openapi_file: Path | None) -> None:
    """Serve the admin API of a running pool (uvicorn). Mutating calls need the bearer token in
    $WEIGHTPOOL_ADMIN_TOKEN; without it they are refused."""
    if openapi_file is not None:
        openapi_file.write_text(json.dumps(openapi_spec(namespace), indent=2) + "\n")
        click.echo(f"OpenAPI spec written to {openapi_file}")
        return
    import uvicorn

    from api.pool_cmds import connect_ray

    connect_ray(address)
    app = create_app(namespace)
    if not os.environ.get(TOKEN_ENV):
        click.echo(f"{TOKEN_ENV} is not set: mutating calls are refused (403)", err=True)
    if host not in ("127.0.0.1", "localhost", "::1"):
        click.echo(f"binding {host}: the admin API is reachable beyond this machine", err=True)
    click.echo(f"weightpool admin API on http://{host}:{port} (docs at /docs)")
    uvicorn.run(app, host=host, port=port, log_level="warning")


def serve_in_thread(app: Any, host: str = "127.0.0.1", port: int = 0) -> tuple[Any, str]:
    """Serve ``app`` with uvicorn on a daemon thread (``port`` 0: an ephemeral one) and wait
    until it listens; returns the server (set ``should_exit`` to stop it) and its base URL.

    Raises:
        OSError: the address cannot be bound.
        RuntimeError: the server did not start within 30 s.
    """
    import socket
    import threading
    import time

    import uvicorn

    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="off"))
    threading.Thread(
        target=server.run, kwargs={"sockets": [sock]}, daemon=True, name="admin-api"
    ).start()
    deadline = time.monotonic() + 30
    while not server.started:
        if time.monotonic() > deadline:
            server.should_exit = True
            raise RuntimeError(f"the admin API did not start on {host}:{port} within 30 s")
        time.sleep(0.05)
    return server, f"http://{host}:{sock.getsockname()[1]}"
