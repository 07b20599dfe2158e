"""``weightpool start``, ``status`` and ``stop``: a pool on a Ray cluster, from the shell.

``start`` with ``--address`` joins a running Ray cluster, creates the pool's named, detached actors
(or finds them: it is idempotent) and returns; this is what the KubeRay head runs. Without
``--address`` it starts an embedded local Ray in this process, creates the pool, serves the admin
API on loopback and stays in the foreground until Ctrl-C, which stops the pool and Ray. Other
shells reach either kind with ``--address auto``.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any

import click

ADDRESS_HELP = "Ray cluster to join: 'auto' (the one running on this machine) or host:port."
NAMESPACE_HELP = "Ray namespace of the pool (default: the config's, else 'weightpool')."


def _mib(n: int | None) -> str:
    return "-" if n is None else f"{n / 2**20:,.1f}"


def connect_ray(address: str) -> None:
    import ray

    if ray.is_initialized():  # called from Python that is already connected (tests, notebooks)
        return
    try:
        ray.init(address=address, log_to_driver=False, logging_level="ERROR")
    except (ConnectionError, RuntimeError, ValueError) as err:
        raise click.ClickException(
            f"cannot reach a Ray cluster at {address!r}: {err}. Start one (`weightpool start` "
            "or `ray start --head`) or pass its address."
        ) from None


def _pool(namespace: str) -> Any:
    from actors.pool import connect

    try:
        return connect(namespace)
    except ValueError:
        raise click.ClickException(
            f"no pool runs in namespace {namespace!r} on this Ray cluster; start one with "
            "`weightpool start`"
        ) from None


def status_rows(status: dict[str, Any]) -> list[str]:
    """The status as lines of markdown (tiers, then block states, models, counters)."""
    lines = [
        "| tier | kind | node | capacity MiB | used MiB | used | copies | memory |",
        "|---|---|---|---:|---:|---:|---:|---|",
    ]
    dead = set(status["dead_tiers"])
    for tier_id, report in sorted(status["tiers"].items()):
        if report is None:
            why = "dead" if tier_id in dead else "no answer"
            lines.append(f"| {tier_id} | | | | | | | {why} |")
            continue
        cap, used = report.capacity_bytes, report.used_bytes
        share = "-" if not cap else f"{100 * used / cap:.0f}%"
        memory = "emulated" if report.emulated else "real"
        lines.append(
            f"| {tier_id} | {report.kind} | {report.node_id[:8]} | {_mib(cap)} | {_mib(used)} | "
            f"{share} | {report.copies} | {memory} |"
        )
    states = ", ".join(f"{k} {v}" for k, v in sorted(status["states"].items())) or "none"
    lines.append("")
    lines.append(f"blocks: {status['blocks']} ({states}); leases held: {status['leases']}")
    models = ", ".join(f"{m} on {home}" for m, home in sorted(status["models"].items()))
    lines.append(f"models: {models or 'none loaded'}")
    counters = status["counters"]
    moves = [
        f"{k.split(':', 1)[1]} {v}" for k, v in sorted(counters.items()) if k[:11] == "transition:"
    ]
    lines.append(f"transitions: {', '.join(moves) or 'none'}")
    cost, budget = status.get("quality_cost"), status.get("quality_budget")
    if cost is not None:
        lines.append(f"predicted quality cost {cost:.3g} of a budget of {budget:.3g}")
    return lines


def _status_json(status: dict[str, Any]) -> dict[str, Any]:
    tiers = {
        t: None if r is None else {k: getattr(r, k) for k in r.__dataclass_fields__}
        for t, r in status["tiers"].items()
    }
    return {**status, "tiers": tiers}


@click.command()
@click.option("--address", default=None, help=ADDRESS_HELP + " Default: an embedded local Ray.")
@click.option(
    "--config",
    "config_path",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="Pool config (YAML; see examples/pool.yaml). Default: the built-in defaults.",
)
@click.option(
    "--set",
    "overrides",
    multiple=True,
    metavar="KEY=VALUE",
    help="Override one top-level config key, e.g. --set hbm_bytes_per_device=512MiB.",
)
@click.option(
    "--admin-port",
    type=int,
    default=8080,
    show_default=True,
    help="Embedded mode: serve the admin API on 127.0.0.1 at this port (0: do not).",
)
def start(
    address: str | None, config_path: Path | None, overrides: tuple[str, ...], admin_port: int
) -> None:
    """Create the pool (idempotent): tier actors on every node and the placement controller."""
    from actors.config import ConfigError, load_config
    from actors.pool import start_pool

    values: dict[str, Any] = {}
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise click.BadParameter(f"{item!r}; expected KEY=VALUE", param_hint="--set")
        values[key.strip()] = value.strip()
    try:
        config = load_config(config_path, **values)
    except ConfigError as err:
        raise click.ClickException(str(err)) from None
    import ray

    if address is not None:
        connect_ray(address)
    else:
        ray.init(address="local", log_to_driver=False, logging_level="ERROR")  # a new Ray
    pool = start_pool(config)
    click.echo(f"pool running in namespace {config.namespace!r} ({len(pool.tiers)} tiers)")
    click.echo("\n".join(status_rows(pool.status())))
    if address is not None:
        return
    server = _serve_admin(config.namespace, admin_port) if admin_port else None
    gcs = ray.get_runtime_context().gcs_address
    click.echo(
        f"\nembedded Ray at {gcs}: other shells on this machine reach this pool with "
        f"--address auto (or --address {gcs} with RAY_AUTH_MODE=token set, as Ray requires for "
        "an explicit address to a cluster with token authentication)"
    )
    click.echo("Ctrl-C (SIGINT) or SIGTERM stops the pool and this Ray.")
    # Both stop it even when this process started with them ignored: a shell without job
    # control starts background commands with SIGINT ignored, and Python then never raises
    # KeyboardInterrupt (a test run started with `&` left the pool running).
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    try:
        while True:
            time.sleep(1.0)
    except KeyboardInterrupt:
        click.echo("stopping the pool")
    finally:
        if server is not None:
            server.should_exit = True
        from actors.pool import stop_pool

        stop_pool(config.namespace)
        ray.shutdown()


def _serve_admin(namespace: str, port: int) -> Any:
    """Start the admin API in a thread on loopback; None (with a note) if it cannot run."""
    try:
        from api.admin import create_app, serve_in_thread

        token = os.environ.get("WEIGHTPOOL_ADMIN_TOKEN")
        server, url = serve_in_thread(create_app(namespace=namespace, token=token), port=port)
    except (ImportError, OSError, RuntimeError) as err:
        click.echo(f"admin API not started: {err}")
        return None
    hint = "" if token else " (read-only: set WEIGHTPOOL_ADMIN_TOKEN for mutating calls)"
    click.echo(f"admin API on {url}/docs{hint}")
    return server


@click.command()
@click.option("--address", default="auto", show_default=True, help=ADDRESS_HELP)
@click.option("--namespace", default="weightpool", show_default=True, help=NAMESPACE_HELP)
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object instead of tables.")
def status(address: str, namespace: str, as_json: bool) -> None:
    """Tiers with their capacity and use, block states, models, transitions."""
    connect_ray(address)
    report = _pool(namespace).status()
    if as_json:
        click.echo(json.dumps(_status_json(report), default=str))
    else:
        click.echo("\n".join(status_rows(report)))


@click.command()
@click.option("--address", default="auto", show_default=True, help=ADDRESS_HELP)
@click.option("--namespace", default="weightpool", show_default=True, help=NAMESPACE_HELP)
def stop(address: str, namespace: str) -> None:
    """Stop the pool's actors. Memory tiers' copies go with them; the storage tier stays."""
    from actors.pool import stop_pool

    connect_ray(address)
    _pool(namespace)  # a clear error when there is none
    stop_pool(namespace)
    click.echo(f"pool in namespace {namespace!r} stopped; its storage directory is kept")
    sys.stdout.flush()


def load_into_pool(
    checkpoint: Path, model: str, encodings: tuple[Any, ...], address: str, namespace: str
) -> None:
    """``weightpool load --address``: import through the pool's storage tier and register the
    model with the controller, with a progress bar; nothing is registered if it fails."""
    from tqdm import tqdm

    from pool.errors import WeightpoolError

    connect_ray(address)
    pool = _pool(namespace)
    with tqdm(unit="block", desc=model) as bar:

        def progress(done: int, total: int) -> None:
            bar.total = total
            bar.update(done - bar.n)

        try:
            home = pool.load_checkpoint(checkpoint, model, encodings=encodings, progress=progress)
        except WeightpoolError as err:
            raise click.ClickException(f"{err} (nothing was imported)") from None
    click.echo(f"{model} loaded into the pool in namespace {namespace!r}; placed for {home}")
