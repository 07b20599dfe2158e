"""``bench/policy_perf.py``'s pure parts: the demangler, the report parser and aggregation, and
the perf map it writes for numba's JIT code (``perf`` itself is not run: CI has none)."""

from __future__ import annotations

from pathlib import Path

import numba
import pytest
from numba.core import codegen

from bench.policy_perf import JitSymbols, aggregate, demangle, elf_functions, parse_report

VETO_ENTRY = (
    "_ZN6policy13_veto_kernels10veto_entryB4v170B56c8tJTIeFIjxB2IKSgI4CrvSCKg1MMbCQQPKkLTj8gMFYBFOOl"
    "H7AIpoAE5ArrayIbLi1E1C7mutable7alignedExd"
)

REPORT = (
    "# Overhead\tSamples\tPeriod\tShared Object\tSymbol\n"
    "#\n"
    f" 40.00%  \t 4 \t 800000  \t[JIT] tid 7   \t[.] {VETO_ENTRY}\n"
    " 30.00%  \t 3 \t 600000  \t/usr/lib/libc.so.6   \t[.] _int_malloc\n"
    " 10.00%  \t 1 \t 200000  \t[JIT] tid 7   \t[.] 0x00007f0000001000\n"
    " 10.00%  \t 1 \t 200000  \t[kernel.kallsyms]   \t[k] finish_task_switch\n"
)


def test_demangle_names_numba_functions_by_module_and_function() -> None:
    assert demangle(VETO_ENTRY) == "policy._veto_kernels.veto_entry"
    assert demangle("_ZN7cpython6policy15_schedule_chain4tickB4v1E") == (
        "cpython.policy._schedule_chain.tick"
    )
    assert demangle("_int_malloc") == "_int_malloc"
    assert demangle("_ZN") == "_ZN"


def test_parse_report_reads_dso_symbol_and_period_and_skips_comments() -> None:
    assert parse_report(REPORT) == [
        ("[JIT] tid 7", VETO_ENTRY, 800000),
        ("/usr/lib/libc.so.6", "_int_malloc", 600000),
        ("[JIT] tid 7", "0x00007f0000001000", 200000),
        ("[kernel.kallsyms]", "finish_task_switch", 200000),
    ]


def test_aggregate_sums_copies_and_converts_periods_to_ms_a_step() -> None:
    rows = [*parse_report(REPORT), ("[JIT] tid 7", VETO_ENTRY.replace("v170", "v171"), 200000)]
    assert aggregate(rows, steps=2) == [
        {"symbol": "policy._veto_kernels.veto_entry", "ms": 0.5, "share": 0.5},
        {"symbol": "_int_malloc (libc.so.6)", "ms": 0.3, "share": 0.3},
        {"symbol": "[unknown] (JIT)", "ms": 0.1, "share": 0.1},
        {"symbol": "finish_task_switch ([kernel.kallsyms])", "ms": 0.1, "share": 0.1},
    ]


def _add_one(x: int) -> int:
    return x + 1


def test_perf_map_gives_a_fresh_kernel_its_address_and_exact_size(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    original = codegen.CPUCodeLibrary._finalize_final_module
    monkeypatch.setattr(codegen.CPUCodeLibrary, "_finalize_final_module", original)  # restored
    symbols = JitSymbols()
    kernel = numba.njit(_add_one)
    assert kernel(1) == 2
    compiled = kernel.overloads[kernel.signatures[0]]
    name = compiled.fndesc.mangled_name
    address = compiled.library.get_pointer_to_function(name)
    sizes = {n: size for n, _, _, size in elf_functions(compiled.library._get_compiled_object())}

    assert symbols.write_map(tmp_path / "perf.map") >= 1
    entries = [line.split(" ", 2) for line in (tmp_path / "perf.map").read_text().splitlines()]
    assert [(int(s, 16), int(z, 16)) for s, z, n in entries if n == name] == [
        (address, sizes[name])
    ]
    assert demangle(name).endswith("test_policy_perf._add_one")
