"""The ``weightpool`` command."""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import click
from tqdm import tqdm

from pool.encoding import Encoding
from pool.errors import WeightpoolError


def _encodings(_ctx: click.Context, _param: click.Parameter, value: str) -> tuple[Encoding, ...]:
    try:
        return tuple(Encoding.parse(v) for v in value.split(",") if v.strip())
    except ValueError as err:
        raise click.BadParameter(str(err)) from None


@click.group()
@click.option("-v", "--verbose", is_flag=True, help="Log at debug level.")
def main(verbose: bool) -> None:
    """weightpool: a memory pool for model weights across HBM, host, CXL and storage."""
    logging.basicConfig(level=logging.DEBUG if verbose else logging.WARNING)


@main.command()
@click.option(
    "--out",
    type=click.Path(file_okay=False, path_type=Path),
    default=Path("weightpool-demo-report"),
    show_default=True,
    help="Where the report (report.md, report.json, occupancy.png) is written.",
)
@click.option(
    "--hbm-mib",
    type=click.IntRange(min=16),
    default=96,
    show_default=True,
    help="The emulated HBM device's capacity (the two models need 245 MiB).",
)
@click.option(
    "--storage-only",
    is_flag=True,
    help="Only round-trip MiniLM through the storage tier (no Ray): encodings, sizes, errors.",
)
@click.option(
    "--store",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="With --storage-only: keep the block store here (default: a temporary directory).",
)
def demo(out: Path, hbm_mib: int, storage_only: bool, store: Path | None) -> None:
    """The main job: two real models served through a pool smaller than them, and a report."""
    if storage_only:
        _storage_demo(store)
        return
    from api.main_job import MainJobConfig, render, run_main_job

    def bar(**kwargs: object) -> tqdm:  # type: ignore[type-arg]
        return tqdm(leave=False, **kwargs)  # type: ignore[call-overload]

    try:
        report = run_main_job(out, MainJobConfig(hbm_mib=hbm_mib), say=click.echo, bar=bar)
    except RuntimeError as err:
        raise click.ClickException(str(err)) from None
    click.echo("")
    click.echo("\n".join(render(report)))
    click.echo(f"\nreport written to {out}/report.md (plot: {out}/occupancy.png)")


def _storage_demo(store: Path | None) -> None:
    """Round-trip a real model (all-MiniLM-L6-v2) through the storage tier and report."""
    from api.demo import run_storage_demo
    from api.models import minilm_checkpoint

    try:
        checkpoint = minilm_checkpoint()
    except RuntimeError as err:
        raise click.ClickException(str(err)) from None
    from pool.importer import SafetensorsSource, plan_blocks

    click.echo(f"importing {checkpoint}")
    total = len(plan_blocks(SafetensorsSource(checkpoint), "minilm"))
    with tqdm(total=total, unit="block", desc="import") as bar:
        report = run_storage_demo(checkpoint, store, on_block=lambda _bid: bar.update(1))
    click.echo(
        f"\n{report.model}: {report.n_blocks} blocks, {report.full_nbytes / 2**20:.1f} MiB at full "
        f"precision, imported at 5 encodings in {report.import_s:.2f} s\n"
    )
    click.echo("| encoding | stored MiB | size ratio | rel. error, median tensor | worst tensor |")
    click.echo("|---|---:|---:|---:|---:|")
    for row in report.rows:
        click.echo(
            f"| {row.encoding} | {row.nbytes / 2**20:.2f} | {row.size_ratio:.3f} | "
            f"{row.median_relative_error:.2e} | {row.max_relative_error:.2e} |"
        )
    click.echo(f"\nfull-precision copies bit-exact to the checkpoint: {report.bit_exact}")
    click.echo(f"one flipped byte detected: {report.corruption_detected}")
    click.echo(f"  {report.corruption_message}")
    if not (report.bit_exact and report.corruption_detected):
        sys.exit(1)


@main.command()
@click.argument("checkpoint", type=click.Path(exists=True, path_type=Path))
@click.option("--model", required=True, help="Model name: the first part of every block id.")
@click.option(
    "--store",
    type=click.Path(file_okay=False, path_type=Path),
    default=Path("weightpool-data"),
    show_default=True,
    help="The block store's directory.",
)
@click.option(
    "--encodings",
    default="full",
    show_default=True,
    callback=_encodings,
    help="Comma-separated encodings to store, e.g. full,int8,int4+zstd (full is always stored).",
)
@click.option(
    "--address",
    default=None,
    help="Import into the pool running on this Ray cluster ('auto' or host:port) instead of "
    "into --store directly.",
)
@click.option("--namespace", default="weightpool", show_default=True, help="The pool's namespace.")
def load(
    checkpoint: Path,
    model: str,
    store: Path,
    encodings: tuple[Encoding, ...],
    address: str | None,
    namespace: str,
) -> None:
    """Import a safetensors file or directory into the block store (or a running pool)."""
    if address is not None:
        from api.pool_cmds import load_into_pool

        load_into_pool(checkpoint, model, encodings, address, namespace)
        return
    from pool.importer import SafetensorsSource, plan_blocks
    from pool.store import BlockStore

    try:
        source = SafetensorsSource(checkpoint)
        total = len(plan_blocks(source, model))
        with BlockStore(store) as block_store, tqdm(total=total, unit="block", desc=model) as bar:
            result = block_store.import_checkpoint(
                source, model, encodings, progress=lambda _s: bar.update(1)
            )
    except WeightpoolError as err:
        raise click.ClickException(f"{err} (nothing was imported)") from None
    click.echo(
        f"imported {len(result.specs)} blocks ({result.full_nbytes / 2**20:.1f} MiB at full "
        f"precision) as {len(result.copies)} copies into {store}"
    )


@main.command()
@click.option(
    "--store",
    type=click.Path(file_okay=False, exists=True, path_type=Path),
    default=Path("weightpool-data"),
    show_default=True,
)
def verify(store: Path) -> None:
    """Check every stored copy's checksum; exit 1 if any is corrupt."""
    from pool.store import BlockStore

    with BlockStore(store) as block_store:
        n = len(block_store.copies())
        problems = block_store.verify()
        orphans = block_store.orphans()
    for orphan in orphans:
        click.echo(f"orphan file (no catalog record, never served; safe to delete): {orphan}")
    for problem in problems:
        click.echo(f"CORRUPT {problem.block_id} @ {problem.encoding.name}: {problem.reason}")
    click.echo(f"{n - len(problems)} of {n} copies verified")
    if problems:
        sys.exit(1)


from api.pool_cmds import start, status, stop  # noqa: E402  (commands on a running pool)

main.add_command(start)
main.add_command(status)
main.add_command(stop)

from api.calibrate import calibrate  # noqa: E402  (quality calibration on the real model)

main.add_command(calibrate)

from api.admin import admin as admin_command  # noqa: E402  (the admin API server)

main.add_command(admin_command)

from api.bench_cmd import bench  # noqa: E402  (the benchmarks and their report)

main.add_command(bench)
