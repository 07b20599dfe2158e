"""``weightpool bench``: run the benchmarks of ``bench/`` and write one report.

Each benchmark is a script that prints a markdown table and, as its last line, one JSON object
(README, "Layout"). This command runs the chosen ones in turn, each in its own process with
``--quick --json``, shows progress, and writes ``report.md`` (every benchmark's own output) and
``report.json`` (their JSON lines, with the command, exit status and seconds of each). A
benchmark that fails is reported as failed, with its last lines, and the others still run.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import click

ROOT = Path(__file__).resolve().parents[1]

# name -> arguments after the script (every one also gets --quick --json)
BENCHMARKS: dict[str, tuple[str, ...]] = {
    "codecs": ("bench/codecs.py",),
    "policy_scale": ("bench/policy_scale.py",),
    "trace_replay": (
        "bench/trace_replay.py",
        "--model",
        "mixtral-8x7b",
        "--hw",
        "h100-pcie5",
        "--hbm-fraction",
        "0.25",
    ),
    "lease": ("bench/lease.py",),
    "movement": ("bench/movement.py",),
    "overhead": ("bench/overhead.py",),
}


@dataclass
class BenchResult:
    name: str
    command: list[str]
    returncode: int
    seconds: float
    result: dict[str, object] | None  # the last stdout line, parsed; None if it is not JSON
    output: str


def run_benchmark(name: str, timeout_s: float) -> BenchResult:
    """Run one benchmark in its own process from the repository root."""
    script, *rest = BENCHMARKS[name]
    command = [sys.executable, script, *rest, "--quick", "--json"]
    started = time.monotonic()
    try:
        done = subprocess.run(
            command, cwd=ROOT, capture_output=True, text=True, timeout=timeout_s, check=False
        )
        code, out, err = done.returncode, done.stdout, done.stderr
    except subprocess.TimeoutExpired as timeout:
        code, out, err = -1, str(timeout.stdout or ""), f"timed out after {timeout_s:.0f} s"
    seconds = time.monotonic() - started
    lines = out.strip().splitlines()
    result = None
    if code == 0 and lines:
        try:
            parsed = json.loads(lines[-1])
            result = parsed if isinstance(parsed, dict) else None
        except json.JSONDecodeError:
            result = None
    text = out if code == 0 else out + "\n" + "\n".join(str(err).strip().splitlines()[-15:])
    return BenchResult(name, command[1:], code, seconds, result, text)


def render(results: list[BenchResult]) -> str:
    lines = ["# weightpool benchmarks", ""]
    lines += ["| benchmark | status | seconds |", "|---|---|---:|"]
    for r in results:
        status = "ok" if r.returncode == 0 and r.result is not None else f"FAILED ({r.returncode})"
        lines.append(f"| {r.name} | {status} | {r.seconds:.0f} |")
    for r in results:
        lines += ["", f"## {r.name}", "", f"`python {' '.join(r.command)}`", "", r.output.strip()]
    return "\n".join(lines) + "\n"


@click.command()
@click.option(
    "--only",
    default=",".join(BENCHMARKS),
    show_default=True,
    help="Comma-separated benchmarks to run.",
)
@click.option(
    "--out",
    type=click.Path(file_okay=False, path_type=Path),
    default=Path("weightpool-bench-report"),
    show_default=True,
    help="Where report.md and report.json are written.",
)
@click.option("--timeout-s", type=float, default=900.0, show_default=True, help="Per benchmark.")
def bench(only: str, out: Path, timeout_s: float) -> None:
    """Run the benchmarks (--quick) and write a report; exit 1 if any failed."""
    names = [n.strip() for n in only.split(",") if n.strip()]
    unknown = [n for n in names if n not in BENCHMARKS]
    if unknown or not names:
        raise click.BadParameter(
            f"{unknown or only!r}; expected some of {', '.join(BENCHMARKS)}", param_hint="--only"
        )
    if not (ROOT / "bench").is_dir():
        raise click.ClickException(
            f"the benchmarks are not here ({ROOT / 'bench'} is missing): run from a checkout of "
            "the repository"
        )
    results = []
    for i, name in enumerate(names, 1):
        click.echo(f"[{i}/{len(names)}] {name} ...", nl=False)
        results.append(run_benchmark(name, timeout_s))
        ok = results[-1].returncode == 0 and results[-1].result is not None
        click.echo(f" {'ok' if ok else 'FAILED'} in {results[-1].seconds:.0f} s")
    out.mkdir(parents=True, exist_ok=True)
    (out / "report.md").write_text(render(results))
    (out / "report.json").write_text(json.dumps([asdict(r) for r in results], indent=1))
    click.echo(f"report written to {out}/report.md")
    if any(r.returncode != 0 or r.result is None for r in results):
        sys.exit(1)
