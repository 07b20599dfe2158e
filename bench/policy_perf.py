"""Where the control step's time goes inside its compiled calls: every kernel, sampled by ``perf``.

The step calls each phase's numba kernels from one compiled chain (``policy/_*_chain.py``), so
``policy_profile.py`` and ``policy_kernels.py`` see one call a phase. This samples the step with
Linux ``perf`` (``cpu-clock``, no hardware counters needed; ``perf_event_paranoid`` 2 is enough
for one's own processes) and prints, per size, the time a step spends in each compiled kernel
(``module.function``) and in native and Python symbols (``name (library)``), a markdown table
each, and as its last line one JSON object.

How. The parent runs ``perf record -D -1 --control fifo:CTL,ACK -- python policy_perf.py
--child``: sampling starts off, and the child, stepping the benchmark's pool
(``bench.policy_scale.stepped_pool``, as ``policy_profile``), writes ``enable`` / ``disable``
to CTL around each timed ``step()``, so only the timed steps are sampled (not the pool, the
telemetry, the fake executor, the warm-up). JIT code has no symbols: the child writes
``/tmp/perf-PID.map`` for ``perf report`` from the ELF symbol table of each numba library's
machine code (name, offset, exact size), caught by wrapping
``CPUCodeLibrary._finalize_final_module`` (the object is ``_compiled_object``: set before that
call when loaded from numba's cache, after it when compiled fresh). So the kernels load from
``policy/__pycache__`` as usual, no recompiling (run ``python -m policy.warmup`` first on a
fresh checkout, or the child compiles them, 60 to 120 s). Only names, offsets and sizes are
kept, never the libraries (holding them keeps their LLVM modules alive). A section's load
address is the engine's ``get_function_address`` of a name no other library defines, less its
offset. Period (CPU ns) a symbol, summed over copies, / steps = its ms a step.

Caveats (numba 0.68, perf 6.1, this 2-core VM).

- Loaded from the cache, a library's ``_final_module`` is empty; its names are in
  ``_shared_module`` (the bitcode kept for linking) and the engine resolves them, but to one
  address a name. Only the chains' objects are loaded, each with its own linked copy
  (``linkonce_odr``) of every kernel it calls; helpers two chains call (``_select``, ``_fill``)
  have a copy in each, and the engine names one. The symbol tables name every copy, so samples
  land on the copy that ran, and the rows sum a name's copies. No JIT sample is left unnamed.
- Code LLVM inlined is its caller's: ``score_rows`` has no symbol and is in
  ``_score_chain.score_and_choose``'s row, ``_powers`` in ``predict_chain``'s,
  ``stopped_state`` in ``veto_rules``'s. The other chain functions' own rows (``tick``,
  ``observe_chain``, ``veto_rules``) are a few microseconds: their callees are not inlined.
- Sampling slows the step: each sample costs this VM some 20 to 40 us (timer interrupt,
  caches refilled), so at 16,384 blocks the median was 1.50 ms unsampled, 1.53 with the fifo
  edges but 1 Hz, 1.64 at 1 kHz, 1.82 at 5 kHz, 2.59 at 20 kHz; at a million 131 and 128 ms
  unsampled, 156 and 148 ms at 5 kHz (two runs).
  The rows are of the slowed step (its shares hold if the slowdown falls evenly); ``--baseline``
  runs the child again without perf and prints both medians. The rows' sum (``sampled``) is
  close to the sampled steps' mean (it adds the enable/disable edges, a few kernel symbols).
- A row of under about 1 % rests on a few dozen samples: noise. Use more ``--steps``.
- Python 3.11 has no perf trampoline: Python code shows as the interpreter's C functions
  (``_PyEval_EvalFrameDefault``, ...), not as Python functions (``policy_profile`` times those).

    python bench/policy_perf.py --sizes 16384 --steps 300 --baseline
    python bench/policy_perf.py --sizes 1000000 --steps 8 --baseline
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import struct
import subprocess
import sys
import tempfile
import time
from collections import Counter, defaultdict
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

if TYPE_CHECKING:
    from policy.config import PolicyConfig
    from policy.plan import Plan
    from policy.snapshot import Snapshot
    from policy.state import PolicyState

    StepResult = tuple[Plan, PolicyState]

ElfFunction = tuple[str, int, int, int]  # name, section index, offset, size in bytes


def demangle(symbol: str) -> str:
    """``_ZN6policy13_veto_kernels10veto_entryB4v170B56...E5Array...`` as
    ``policy._veto_kernels.veto_entry``; any other symbol unchanged. Numba's escapes
    (``_3clocals_3e`` for ``<locals>``) are kept as they are."""
    if not symbol.startswith("_ZN"):
        return symbol
    parts, i = [], 3
    while i < len(symbol) and symbol[i].isdigit():
        j = i
        while symbol[j].isdigit():
            j += 1
        length = int(symbol[i:j])
        parts.append(symbol[j : j + length])
        i = j + length
    return ".".join(parts) if parts else symbol


def elf_functions(obj: bytes) -> list[ElfFunction]:
    """The defined function symbols of an ELF64 little-endian object's symbol table."""
    shoff = struct.unpack_from("<Q", obj, 0x28)[0]
    entsize, count = struct.unpack_from("<HH", obj, 0x3A)
    sections = [struct.unpack_from("<IIQQQQIIQQ", obj, shoff + k * entsize) for k in range(count)]
    functions = []
    for _, kind, _, _, offset, size, link, _, _, _ in sections:
        if kind != 2:  # SHT_SYMTAB
            continue
        strings = sections[link][4]
        for entry in range(offset, offset + size, 24):
            name, info, _, section, value, length = struct.unpack_from("<IBBHQQ", obj, entry)
            if info & 0xF == 2 and section != 0:  # STT_FUNC, defined
                end = obj.index(b"\0", strings + name)
                functions.append((obj[strings + name : end].decode(), section, value, length))
    return functions


def parse_report(text: str) -> list[tuple[str, str, int]]:
    """(dso, symbol, period in ns) rows of ``perf report -n --show-total-period --sort dso,sym``
    with a tab as field separator; header and comment lines skipped."""
    rows = []
    for line in text.splitlines():
        fields = [f.strip() for f in line.split("\t")]
        if line.startswith("#") or len(fields) < 5 or not fields[2].isdigit():
            continue
        symbol = fields[4].split("] ", 1)[-1]
        rows.append((fields[3], symbol, int(fields[2])))
    return rows


def aggregate(rows: Iterable[tuple[str, str, int]], steps: int) -> list[dict[str, object]]:
    """Period (ns of CPU) summed by demangled symbol, as ms a step, largest first. Compiled
    ``policy`` code is named ``module.function``; other code ``symbol (dso)``; addresses perf
    could not name ``[unknown] (dso)``."""
    totals: Counter[str] = Counter()
    for dso, symbol, period in rows:
        name = demangle(symbol)
        if name.startswith("0x"):
            name = "[unknown]"
        if not name.startswith(("policy.", "cpython.policy.")):
            where = "JIT" if dso.startswith("[JIT]") else Path(dso).name
            name = f"{name} ({where})"
        totals[name] += period
    grand = sum(totals.values()) or 1
    return [
        {"symbol": name, "ms": round(ns / steps / 1e6, 4), "share": round(ns / grand, 4)}
        for name, ns in totals.most_common()
    ]


class JitSymbols:
    """Records every numba library's function symbols as it is finalized; writes a perf map.

    Install before the first kernel is compiled or loaded. Keeps names, offsets and sizes only:
    holding the libraries would keep their LLVM modules alive."""

    def __init__(self) -> None:
        from numba.core import codegen

        self.objects: list[list[ElfFunction]] = []
        self.runtime: list[str] = []  # numba's own ``nrt`` library: no object code kept
        self.engine: Any = None
        original = codegen.CPUCodeLibrary._finalize_final_module

        def finalize(library: Any) -> None:
            cached = getattr(library, "_compiled_object", None)  # the finalize consumes it
            original(library)  # type: ignore[no-untyped-call]
            obj = cached or getattr(library, "_compiled_object", None)
            self.engine = library._codegen._engine
            if obj:
                self.objects.append(elf_functions(obj))
            else:
                functions = library._final_module.functions
                self.runtime.extend(fn.name for fn in functions if not fn.is_declaration)

        codegen.CPUCodeLibrary._finalize_final_module = finalize  # type: ignore[method-assign]

    def write_map(self, path: Path) -> int:
        """Write ``start size name`` lines for every copy of every function; returns how many.

        A section's load address is the engine's address of a name no other object defines,
        less its offset (the engine gives one copy's address for a name several define)."""
        copies = Counter(name for functions in self.objects for name, *_ in functions)
        lines = []
        for functions in self.objects:
            bases: defaultdict[int, Counter[int]] = defaultdict(Counter)
            for name, section, offset, _ in functions:
                address = self.engine.get_function_address(name) if copies[name] == 1 else 0
                if address:
                    bases[section][address - offset] += 1
            for name, section, offset, size in functions:
                if bases[section] and size:
                    start = bases[section].most_common(1)[0][0] + offset
                    lines.append(f"{start:x} {size:x} {name}\n")
        # The runtime's functions have no sizes: up to the next one's start (4 KiB at most).
        runtime = sorted({self.engine.get_function_address(n): n for n in self.runtime}.items())
        for k, (start, name) in enumerate(runtime):
            size = runtime[k + 1][0] - start if k + 1 < len(runtime) else 256
            if start:
                lines.append(f"{start:x} {min(size, 4096):x} {name}\n")
        path.write_text("".join(sorted(lines)))
        return len(lines)


def child(blocks: int, steps: int, warmup: int, control: str, out: str) -> None:
    """Step the pool; time each timed step alone and, given perf's ``CTL,ACK`` fifos, sample
    it alone. Writes the step times (and the perf map, with fifos) for the parent."""
    symbols = JitSymbols()
    import policy.step as step_module
    from bench.policy_scale import stepped_pool
    from policy.config import PolicyConfig

    fifos = control.split(",") if control else []
    ctl = os.open(fifos[0], os.O_WRONLY) if fifos else -1
    ack = os.open(fifos[1], os.O_RDONLY) if fifos else -1

    def command(word: bytes) -> None:
        if ctl >= 0:
            os.write(ctl, word)
            reply = os.read(ack, 16)
            if not reply.startswith(b"ack"):
                raise RuntimeError(f"perf answered {reply!r} to {word!r}, expected b'ack'")

    step_ms: list[float] = []

    def timed(snapshot: Snapshot, state: PolicyState, config: PolicyConfig) -> StepResult:
        sampled = len(step_ms) >= warmup
        if sampled:
            command(b"enable\n")
        start = time.perf_counter()
        result = step_module.step(snapshot, state, config)
        step_ms.append((time.perf_counter() - start) * 1e3)
        if sampled:
            command(b"disable\n")
        return result

    for _ in stepped_pool(blocks, warmup + steps, PolicyConfig(), timed):
        pass
    mapped = symbols.write_map(Path(f"/tmp/perf-{os.getpid()}.map")) if fifos else 0
    timed_ms = sorted(step_ms[warmup:])
    median = timed_ms[len(timed_ms) // 2]
    result = {"median": median, "mean": sum(timed_ms) / steps, "pid": os.getpid(), "mapped": mapped}
    Path(out).write_text(json.dumps(result))


def run_child(args: argparse.Namespace, blocks: int, work: Path, perf: str | None) -> Any:
    """The child's step times; with ``perf``, sampled, and its symbol rows under ``symbols``."""
    out = work / "child.json"
    command = [sys.executable, __file__, "--child", "--sizes", str(blocks), "--out", str(out)]
    command += ["--steps", str(args.steps), "--warmup", str(args.warmup)]
    data = work / "perf.data"
    if perf:
        ctl, ack = work / "ctl", work / "ack"
        for fifo in (ctl, ack):
            fifo.unlink(missing_ok=True)
            os.mkfifo(fifo)
        command += ["--control", f"{ctl},{ack}"]
        record = [perf, "record", "-q", "-e", "cpu-clock", "-F", str(args.freq), "-D", "-1"]
        command = [*record, "--control", f"fifo:{ctl},{ack}", "-o", str(data), "--", *command]
    if subprocess.run(command, check=False, cwd=ROOT).returncode != 0:
        sys.exit(f"policy_perf: the run failed (its output is above): {' '.join(command)}")
    result = json.loads(out.read_text())
    if perf:
        report = [perf, "report", "-i", str(data), "--stdio", "--sort", "dso,sym", "-n"]
        report += ["--show-total-period", "--no-children", "-t", "\t"]
        text = subprocess.run(report, check=True, capture_output=True, text=True).stdout
        Path(f"/tmp/perf-{result['pid']}.map").unlink(missing_ok=True)
        result["symbols"] = aggregate(parse_report(text), args.steps)
    return result


def check_perf() -> str:
    """The ``perf`` executable, after one trial recording; exits with a message if unusable."""
    perf = shutil.which("perf")
    if perf is None:
        sys.exit("policy_perf: no `perf` on PATH (Debian: apt-get install linux-perf)")
    with tempfile.TemporaryDirectory() as work:
        trial = [perf, "record", "-q", "-e", "cpu-clock", "-o", f"{work}/t.data", "--", "true"]
        done = subprocess.run(trial, check=False, capture_output=True, text=True)
    if done.returncode != 0:
        sys.exit(
            f"policy_perf: `perf record -e cpu-clock` failed here (exit {done.returncode}): "
            f"{done.stderr.strip()[-400:]}\nIt needs kernel.perf_event_paranoid at 2 or less "
            "and, in a container, perf_event_open allowed."
        )
    return perf


def measure(args: argparse.Namespace, blocks: int, perf: str) -> dict[str, Any]:
    """One size: sampled (and with ``--baseline`` unsampled) run; prints its table."""
    with tempfile.TemporaryDirectory(prefix="policy_perf") as work:
        sampled = run_child(args, blocks, Path(work), perf)
        plain = run_child(args, blocks, Path(work), None) if args.baseline else None
    symbols = sampled["symbols"]
    result = {
        "blocks": blocks,
        "steps": args.steps,
        "freq_hz": args.freq,
        "step_ms_median": round(sampled["median"], 3),
        "step_ms_mean": round(sampled["mean"], 3),
        "sampled_ms": round(sum(row["ms"] for row in symbols), 3),
        "unsampled_step_ms_median": round(plain["median"], 3) if plain else None,
        "mapped_symbols": sampled["mapped"],
        "symbols": symbols[: args.top],
    }
    print(f"\n{blocks} blocks, {args.steps} steps: step {result['step_ms_median']} ms (median,")
    print(
        f"sampling on; mean {result['step_ms_mean']}; sampled {result['sampled_ms']} a step", end=""
    )
    if plain:
        print(f"; without perf: median {result['unsampled_step_ms_median']}", end="")
    print(")\n\n| symbol | ms a step | share |\n|---|---:|---:|")
    for row in symbols[: args.top]:
        print(f"| {row['symbol']} | {row['ms']} | {row['share']:.1%} |")
    return result


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--sizes", default="16384,1000000")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--top", type=int, default=25, help="rows shown per size")
    parser.add_argument("--freq", type=int, default=5000, help="samples a second")
    parser.add_argument("--baseline", action="store_true", help="also time the step unsampled")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--control", default="", help=argparse.SUPPRESS)
    parser.add_argument("--out", default="", help=argparse.SUPPRESS)
    args = parser.parse_args()
    for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[var] = "1"  # numpy on one thread, as policy_scale; before it is imported
    if args.child:
        child(int(args.sizes), args.steps, args.warmup, args.control, args.out)
        return
    perf = check_perf()
    results = [measure(args, int(size), perf) for size in args.sizes.split(",")]
    print(json.dumps({"bench": "policy_perf", "results": results}))


if __name__ == "__main__":
    main()
