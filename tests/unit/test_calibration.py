"""Quality calibration on the real all-MiniLM-L6-v2 (pool/calibration.py, `weightpool calibrate`).

The whole model is calibrated once, by `weightpool calibrate --json` on a store made with
`weightpool load`; the tests read that run's result back (CalibrationResult.from_dict) and check
the Python API against it bit for bit on a few blocks.
"""

from __future__ import annotations

import dataclasses
import json
import math

import pytest
import torch
from click.testing import CliRunner

from api.cli import main
from pool.blocks import BlockSpec, TensorSpec
from pool.calibration import (
    CALIBRATION_TEXTS,
    DEFAULT_THRESHOLD,
    CalibrationResult,
    calibrate,
    check_drift,
    choose_floor,
    cosines,
    drift,
    embed,
    held_at,
    load_minilm,
    standard_assignments,
)
from pool.encoding import Precision, precision_allowed
from pool.errors import CheckpointError, SpecError, UnknownBlockError
from pool.importer import SafetensorsSource, plan_blocks
from pool.store import BlockStore

FULL, FP8, INT8, INT4 = Precision.FULL, Precision.FP8, Precision.INT8, Precision.INT4


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One intra-op thread for this module: on the shared 2-core machines two OpenMP threads
    contending with other processes ran a forward pass 2 to 7 times slower than one (measured);
    one thread is steady. Restored after the module."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def minilm(minilm_path):
    model, tokenizer = load_minilm(minilm_path)
    with SafetensorsSource(minilm_path) as source:
        specs = plan_blocks(source, "minilm")
    return model, tokenizer, specs


@pytest.fixture(scope="module")
def loaded_store(tmp_path_factory, minilm_path):
    store = tmp_path_factory.mktemp("calibrate") / "store"
    result = CliRunner().invoke(
        main, ["load", str(minilm_path), "--model", "minilm", "--store", str(store)]
    )
    assert result.exit_code == 0, result.output
    return store


@pytest.fixture(scope="module")
def cli_run(loaded_store):
    """The module's one calibration of the whole model: the command, as a user runs it."""
    run = CliRunner().invoke(main, ["calibrate", "--store", str(loaded_store), "--json"])
    assert run.exit_code == 0, run.output
    return run, json.loads(run.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def calibrated(cli_run) -> CalibrationResult:
    return CalibrationResult.from_dict(cli_run[1])


def _affects_output(spec: BlockSpec) -> bool:
    """Blocks with a quantized tensor on the path to the embeddings (the pooler is not on it:
    mean pooling reads the last hidden state)."""
    return any(t.quantizable for t in spec.tensors) and spec.block_id != "minilm/pooler.dense"


def test_reference_model_matches_sentence_transformers(minilm, minilm_path) -> None:
    sentence_transformers = pytest.importorskip("sentence_transformers")
    model, tokenizer, _ = minilm
    theirs = sentence_transformers.SentenceTransformer(str(minilm_path.parent), device="cpu")
    expected = theirs.encode(list(CALIBRATION_TEXTS), convert_to_tensor=True)
    ours = embed(model, tokenizer, CALIBRATION_TEXTS)
    assert ours.shape == expected.shape == (32, 384)
    assert float((ours - expected).abs().max()) <= 1e-5
    assert torch.allclose(ours.norm(dim=1), torch.ones(32), atol=1e-6)


def test_every_block_is_measured_and_full_precision_is_exactly_zero(calibrated, minilm) -> None:
    result = calibrated
    model, tokenizer, specs = minilm
    assert [b.block_id for b in result.blocks] == [s.block_id for s in specs]
    assert len(result.blocks) == 54 and result.n_texts == 32
    assert result.precisions == (FP8, INT8, INT4) and result.threshold == DEFAULT_THRESHOLD
    for block in result.blocks:
        assert set(block.sensitivity) == {FULL, FP8, INT8, INT4}
        assert block.sensitivity[FULL] == 0.0
    # All-FULL through the real codec drifts exactly 0.
    everything_full = {"all-full": dict.fromkeys(result.floors(), FULL)}
    (check,) = check_drift(model, tokenizer, specs, result, everything_full)
    assert check.measured == 0.0 and check.predicted == 0.0 and math.isnan(check.ratio)
    assert result.timings.forwards > 0 and result.timings.total_s > 0


def test_measurement_is_deterministic_and_matches_a_whole_forward(calibrated, minilm) -> None:
    """Calibrating a few blocks again, in this process, gives the command's bits; so does
    holding one block with held_at and running the whole model (calibrate reruns only the layers
    from the block's on). The model is restored bit for bit."""
    result = calibrated
    model, tokenizer, specs = minilm
    by_id = {s.block_id: s for s in specs}
    chosen = [
        "minilm/embeddings.token_type_embeddings",
        "minilm/encoder.layer.3.intermediate.dense",
        "minilm/encoder.layer.5.attention.self.value",
    ]
    reference = embed(model, tokenizer, CALIBRATION_TEXTS)
    again = calibrate(model, tokenizer, [by_id[b] for b in chosen])
    assert torch.equal(embed(model, tokenizer, CALIBRATION_TEXTS), reference)
    for block_id in chosen:
        assert again.block(block_id) == result.block(block_id)
        for precision in (FP8, INT4):
            with held_at(model, specs, {block_id: precision}):
                managed = embed(model, tokenizer, CALIBRATION_TEXTS)
            whole = drift(managed, reference)
            assert whole == result.block(block_id).sensitivity[precision], (block_id, precision)
            assert 1 - float(cosines(managed, reference).mean()) == pytest.approx(whole, rel=1e-9)
    assert torch.equal(cosines(reference, reference), torch.ones(32, dtype=torch.float64))


def test_int4_drifts_more_than_either_8_bit_precision(calibrated, minilm) -> None:
    result = calibrated
    _, _, specs = minilm
    on_path = {s.block_id for s in specs if _affects_output(s)}
    assert len(on_path) == 39  # 36 linear layers and 3 embedding tables
    for spec in specs:
        s = result.block(spec.block_id).sensitivity
        if spec.block_id in on_path:
            assert s[INT4] > max(s[FP8], s[INT8]) > 0, spec.block_id
        else:  # norms, position ids and the unused pooler: nothing that reaches the output
            assert s[FP8] == s[INT8] == s[INT4] == 0.0, spec.block_id


def test_floors_are_the_lowest_precisions_within_the_threshold(calibrated) -> None:
    result = calibrated
    for block in result.blocks:
        s, floor = block.sensitivity, block.floor
        admitted = [p for p in s if precision_allowed(p, floor)]
        assert all(s[p] <= result.threshold for p in admitted), block.block_id
        if floor is not INT4:
            assert s[INT4] > result.threshold, block.block_id
        if floor is FULL:
            assert max(s[FP8], s[INT8]) > result.threshold, block.block_id
        if floor in (FP8, INT8):
            assert s[floor] == min(s[FP8], s[INT8])
    # Far from the threshold on either side, so the same on any CPU:
    assert result.block("minilm/encoder.layer.5.attention.self.value").floor is FULL
    assert result.block("minilm/encoder.layer.0.attention.self.key").floor is INT4
    assert result.block("minilm/encoder.layer.2.attention.self.query").floor is INT8
    assert result.block("minilm/encoder.layer.3.output.LayerNorm").floor is INT4


def test_choose_floor_rule() -> None:
    s = {FULL: 0.0, FP8: 3e-5, INT8: 1e-5, INT4: 2e-4}
    assert choose_floor(s, 1e-3) is INT4
    assert choose_floor(s, 1e-4) is INT8  # both 8-bit pass; INT8 drifts less and names it
    assert choose_floor({**s, FP8: 5e-6}, 1e-4) is FP8
    assert choose_floor(s, 2e-5) is FULL  # FP8 fails, and an 8-bit floor would admit it
    assert choose_floor(s, 0.0) is FULL
    assert choose_floor({FULL: 0.0, INT4: 0.0}, 0.0) is INT4


def test_predicted_drift_agrees_with_measured_within_a_quarter(cli_run, calibrated) -> None:
    """The command's check_drift pairs: measured / predicted within [0.8, 1.25] everywhere
    (0.95 to 1.07 measured), and every block at its floor inside a cosine of 0.999."""
    result = calibrated
    checks = {c["assignment"]: c for c in cli_run[1]["checks"]}
    assignments = standard_assignments(result)
    assert (
        list(checks)
        == list(assignments)
        == [
            "all-fp8",
            "all-int8",
            "all-int4",
            "floors",
            "random-mix",
        ]
    )
    for name, check in checks.items():
        assert 0.8 <= check["ratio"] <= 1.25, check
        assert check["ratio"] == check["measured"] / check["predicted"]
        assert check["predicted"] == pytest.approx(result.predicted_drift(assignments[name]))
    assert checks["all-int4"]["measured"] > checks["all-fp8"]["measured"]
    assert checks["all-fp8"]["measured"] > checks["all-int8"]["measured"]
    assert checks["floors"]["measured"] < 1e-3
    assert assignments["floors"] == result.floors()
    assert checks["all-int8"]["n_reduced"] == 54 and checks["floors"]["n_reduced"] == sum(
        b.floor is not FULL for b in result.blocks
    )


def test_result_round_trips_through_its_dict(calibrated) -> None:
    result = calibrated
    assert CalibrationResult.from_dict(json.loads(json.dumps(result.to_dict()))) == result
    assert result.texts == CALIBRATION_TEXTS
    with pytest.raises(SpecError, match=r"calibration record is not valid .*'blocks'"):
        CalibrationResult.from_dict({"model": "minilm"})
    broken = result.to_dict()
    broken["blocks"][0]["floor"] = "int3"
    with pytest.raises(SpecError, match="'int3' is not a valid Precision"):
        CalibrationResult.from_dict(broken)


def test_apply_round_trips_through_the_catalog(calibrated, minilm, tmp_path) -> None:
    result = calibrated
    _, _, specs = minilm
    with BlockStore(tmp_path / "store") as store:
        store.register(specs)
        result.apply(store)
    with BlockStore(tmp_path / "store") as store:  # reopened: read back from SQLite
        for spec in store.specs("minilm"):
            block = result.block(spec.block_id)
            assert dict(spec.sensitivity) == dict(block.sensitivity)
            assert spec.floor is block.floor
    with BlockStore(tmp_path / "partial") as store:
        store.register(specs[:10])
        with pytest.raises(UnknownBlockError, match="not in the catalog"):
            result.apply(store)
        assert all(s.sensitivity == {} and s.floor is INT4 for s in store.specs())


def test_bad_input_is_refused_and_the_model_is_unchanged(minilm) -> None:
    model, tokenizer, specs = minilm
    before = embed(model, tokenizer, CALIBRATION_TEXTS[:4])
    for bad in (-1e-4, math.nan, math.inf):
        with pytest.raises(SpecError, match=r"threshold is .*; expected a finite number >= 0"):
            calibrate(model, tokenizer, specs, threshold=bad)
    with pytest.raises(SpecError, match="expected distinct reduced precisions"):
        calibrate(model, tokenizer, specs, precisions=(INT8, FULL))
    with pytest.raises(SpecError, match="texts is empty"):
        calibrate(model, tokenizer, specs, texts=())
    with pytest.raises(SpecError, match="texts is empty"):
        embed(model, tokenizer, [])
    with pytest.raises(CheckpointError, match=r"expected a safetensors file with config\.json"):
        load_minilm("/nonexistent/model.safetensors")
    stranger = BlockSpec(
        "minilm/decoder.fc", (TensorSpec("weight", "decoder.fc.weight", (4, 4), "float32"),), 0
    )
    with pytest.raises(
        CheckpointError, match=r"'decoder\.fc\.weight' is not a parameter or buffer"
    ):
        calibrate(model, tokenizer, [*specs[:5], stranger])
    other = dataclasses.replace(specs[6], block_id="other/encoder.layer.0.attention.output.dense")
    with pytest.raises(SpecError, match=r"specs are of models \['minilm', 'other'\]"):
        calibrate(model, tokenizer, [specs[5], other])
    with (
        pytest.raises(SpecError, match="not among the specs"),
        held_at(model, specs, {"minilm/x": INT4}),
    ):
        pass
    with (
        pytest.raises(RuntimeError, match="boom"),
        held_at(model, specs, {specs[6].block_id: INT4}),
    ):
        assert not torch.equal(embed(model, tokenizer, CALIBRATION_TEXTS[:4]), before)
        raise RuntimeError("boom")
    assert torch.equal(embed(model, tokenizer, CALIBRATION_TEXTS[:4]), before)


def test_cli_calibrates_a_loaded_store(cli_run, loaded_store) -> None:
    run, report = cli_run
    assert report["command"] == "calibrate" and report["stored"] == str(loaded_store)
    assert len(report["texts"]) == 32
    assert report["threshold"] == DEFAULT_THRESHOLD and report["model"] == "minilm"
    assert "| minilm/encoder.layer.5.attention.self.value | " in run.stdout
    assert "| floors | " in run.stdout and "| random-mix | " in run.stdout
    assert "sensitivities and floors of 54 blocks: stored in the catalog of" in run.stdout
    with BlockStore(loaded_store) as store:  # what the command stored is what it printed
        stored = {s.block_id: s for s in store.specs("minilm")}
    assert len(stored) == len(report["blocks"]) == 54
    for row in report["blocks"]:
        spec = stored[row["block_id"]]
        assert {p.value: v for p, v in spec.sensitivity.items()} == row["sensitivity"]
        assert spec.floor.value == row["floor"]


def test_cli_says_what_to_run_when_the_model_is_not_loaded(loaded_store, tmp_path) -> None:
    runner = CliRunner()
    empty = tmp_path / "nothing"
    result = runner.invoke(main, ["calibrate", "--store", str(empty)])
    assert result.exit_code == 1
    assert (
        f"no block store at {empty} (no catalog.sqlite); run first: weightpool load "
        in result.output
    )
    assert f"--model minilm --store {empty}" in result.output
    assert not empty.exists()  # nothing was created
    result = runner.invoke(main, ["calibrate", "--store", str(loaded_store), "--model", "bert"])
    assert result.exit_code == 1
    assert f"model 'bert' is not in the block store at {loaded_store}; run first:" in result.output
    result = runner.invoke(main, ["calibrate", "--threshold", "-1"])
    assert result.exit_code == 2 and "-1.0; expected a finite number >= 0" in result.output
