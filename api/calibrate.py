"""``weightpool calibrate``: measure the real model's block sensitivities and store them.

The heavy work is :mod:`pool.calibration`; this module checks the store first (so that a missing
model is reported before anything is loaded), shows progress, prints the tables and writes the
results into the catalog. Torch and transformers are imported only when the command runs.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from pool.encoding import Precision
from pool.errors import WeightpoolError

if TYPE_CHECKING:
    from pool.blocks import BlockSpec
    from pool.calibration import CalibrationResult, DriftCheck


def _threshold(_ctx: click.Context, _param: click.Parameter, value: float | None) -> float | None:
    if value is not None and not (math.isfinite(value) and value >= 0):
        raise click.BadParameter(f"{value!r}; expected a finite number >= 0")
    return value


def _stored_specs(store: Path, model: str, planned: list[BlockSpec], checkpoint: Path) -> None:
    """Refuse a store that lacks the model, or holds other blocks under its name."""
    from pool.store import BlockStore

    load = f"weightpool load {checkpoint} --model {model} --store {store}"
    if not (store / "catalog.sqlite").is_file():
        raise click.ClickException(
            f"no block store at {store} (no catalog.sqlite); run first: {load}"
        )
    with BlockStore(store) as block_store:
        stored = {s.block_id: s for s in block_store.specs(model)}
    if not stored:
        raise click.ClickException(
            f"model {model!r} is not in the block store at {store}; run first: {load}"
        )
    for spec in planned:
        found = stored.pop(spec.block_id, None)
        if found is None or found.tensors != spec.tensors:
            what = "is missing" if found is None else "has other tensors"
            raise click.ClickException(
                f"block {spec.block_id!r} {what} in the store at {store}; expected model "
                f"{model!r} to be all-MiniLM-L6-v2 as imported by: {load}"
            )
    if stored:
        raise click.ClickException(
            f"model {model!r} in the store at {store} has blocks all-MiniLM-L6-v2 lacks, e.g. "
            f"{sorted(stored)[0]!r}; expected the model imported by: {load}"
        )


def _report(
    result: CalibrationResult, checks: tuple[DriftCheck, ...], stored: Path | None
) -> dict[str, Any]:
    return {
        "command": "calibrate",
        **result.to_dict(),
        "checks": [
            {
                "assignment": c.name,
                "n_reduced": c.n_reduced,
                "predicted": c.predicted,
                "measured": c.measured,
                "ratio": None if math.isnan(c.ratio) else c.ratio,
            }
            for c in checks
        ],
        "stored": None if stored is None else str(stored),
    }


def _print_tables(result: CalibrationResult, checks: tuple[DriftCheck, ...]) -> None:
    head = " | ".join(p.value for p in result.precisions)
    click.echo(f"\n| block | {head} | floor |")
    click.echo("|---|" + "---:|" * len(result.precisions) + "---|")
    for b in result.blocks:
        cells = " | ".join(f"{b.sensitivity[p]:.2e}" for p in result.precisions)
        click.echo(f"| {b.block_id} | {cells} | {b.floor.value} |")
    counts = {p.value: sum(b.floor is p for b in result.blocks) for p in Precision}
    timings = result.timings
    click.echo(
        f"\n{len(result.blocks)} blocks over {result.n_texts} texts in {timings.total_s:.2f} s "
        f"({timings.forwards} forward passes, median {timings.forward_ms_median:.1f} ms); "
        f"floors at threshold {result.threshold:g}: "
        + ", ".join(f"{name} {n}" for name, n in counts.items() if n)
    )
    click.echo("\n| assignment | blocks reduced | predicted drift | measured drift | ratio |")
    click.echo("|---|---:|---:|---:|---:|")
    for c in checks:
        click.echo(
            f"| {c.name} | {c.n_reduced} | {c.predicted:.3e} | {c.measured:.3e} | {c.ratio:.3f} |"
        )


@click.command("calibrate")
@click.option(
    "--store",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="Store sensitivities and floors in this block store's catalog (the model must have been "
    "imported with `weightpool load`). Without it, calibrate and print only.",
)
@click.option(
    "--model",
    default="minilm",
    show_default=True,
    help="The model's name in the store (block ids '<model>/...'); its weights are "
    "all-MiniLM-L6-v2's.",
)
@click.option(
    "--threshold",
    type=float,
    default=None,
    callback=_threshold,
    help="A block's floor admits only precisions at which it alone drifts at most this "
    "(mean 1 - cosine). Default: pool.calibration.DEFAULT_THRESHOLD, 1e-4.",
)
@click.option(
    "--threads",
    type=click.IntRange(min=1),
    default=None,
    help="torch's intra-op threads (default: torch's own choice). On a machine shared with other "
    "jobs, 1 avoids threads spinning against each other.",
)
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object as the last line.")
def calibrate(
    store: Path | None, model: str, threshold: float | None, threads: int | None, as_json: bool
) -> None:
    """Measure each block's output drift per precision on all-MiniLM-L6-v2 and set its floor."""
    import torch
    from tqdm import tqdm

    from api.models import minilm_checkpoint
    from pool import calibration
    from pool.importer import SafetensorsSource, plan_blocks
    from pool.store import BlockStore

    if threads is not None:
        torch.set_num_threads(threads)
    try:
        checkpoint = minilm_checkpoint()
        with SafetensorsSource(checkpoint) as source:
            specs = plan_blocks(source, model)
        if store is not None:
            _stored_specs(store, model, specs, checkpoint)
        loaded, tokenizer = calibration.load_minilm(checkpoint)
        with tqdm(total=len(specs), unit="block", desc="calibrate") as bar:
            result = calibration.calibrate(
                loaded,
                tokenizer,
                specs,
                threshold=calibration.DEFAULT_THRESHOLD if threshold is None else threshold,
                progress=lambda _spec: bar.update(1),
            )
        checks = calibration.check_drift(loaded, tokenizer, specs, result)
        if store is not None:
            with BlockStore(store) as block_store:
                result.apply(block_store)
    except (WeightpoolError, RuntimeError) as err:
        raise click.ClickException(str(err)) from None
    _print_tables(result, checks)
    where = f"stored in the catalog of {store}" if store else "not stored (no --store given)"
    click.echo(f"\nsensitivities and floors of {len(result.blocks)} blocks: {where}")
    if as_json:
        click.echo(json.dumps(_report(result, checks, store)))
