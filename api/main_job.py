"""The main job (``weightpool demo``): two real models served through a pool smaller than them.

On an embedded local Ray it starts a pool whose one emulated HBM device holds less than the two
models together, serves the admin API on loopback, calibrates all-MiniLM-L6-v2 (the accuracy
veto's evidence), loads it and an MoE model (OLMoE architecture from transformers, built from a
small config with seeded random weights: there is no network to fetch a pretrained one), runs a
bounded workload through :func:`actors.integration.manage` with the controller live, and ends
with a report: tier occupancy over time (a PNG), lease hit rate, stall, transitions by kind,
vetoes by rule (read back from the admin API's ``/metrics``), and output quality against the
unmanaged models.
"""

from __future__ import annotations

import json
import secrets
import shutil
import tempfile
import time
import urllib.request
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from pool.encoding import Encoding

MIB = 1 << 20
NAMESPACE = "weightpool-demo"
DEMO_ENCODINGS = tuple(Encoding.parse(e) for e in ("full", "int8", "int4"))


@dataclass(frozen=True)
class MainJobConfig:
    """What the main job runs; the defaults finish in well under 3 minutes on 2 cores."""

    hbm_mib: int = 96  # the one emulated device; the two models need 245 MiB at full precision
    host_mib: int = 512
    embed_requests: int = 16  # batches of 8 texts through MiniLM, per phase that uses it
    moe_requests: int = 8  # generations (2 sequences, 8-token prompt, 8 tokens decoded)
    quality_budget: float = 1e-3  # drift; a cosine of 0.999 to the unmanaged model is 1e-3
    seed: int = 0


@dataclass
class PhaseFigures:
    name: str
    start_s: float
    seconds: float
    requests: int
    median_request_ms: float


@dataclass
class MainJobReport:
    hbm_bytes: int
    model_bytes: dict[str, int]
    phases: list[PhaseFigures]
    cache_hits: float  # reads served by the client's in-process lease cache
    cache_misses: float  # reads that needed a remote acquire
    acquires_resident: float  # remote acquires that found a resident HBM copy
    acquires_waited: float  # remote acquires that waited for a demand promotion
    stall_s: float
    transitions: dict[str, float]
    vetoes: dict[str, float]
    moved_bytes: dict[str, float]
    quality_cost: float | None
    quality_budget: float
    embed_cosine_min: float
    embed_cosine_mean: float
    moe_logits_cosine_min: float
    moe_top1_agreement: float
    calibration_s: float
    floors: dict[str, dict[str, int]]  # model -> floor precision -> blocks
    admin_url: str
    plot: str | None
    wall_s: float
    final_states: dict[str, int] = field(default_factory=dict)
    unmanaged_request_ms: dict[str, float] = field(default_factory=dict)

    @property
    def reads(self) -> float:
        """Block reads by the managed models (every read is served from the lease cache)."""
        return self.cache_hits + self.cache_misses

    @property
    def acquired(self) -> float:
        """Blocks leased by a remote acquire (a managed model leases a layer as it starts)."""
        return self.acquires_resident + self.acquires_waited

    @property
    def hit_rate(self) -> float:
        """Reads that needed no remote acquire first: leases kept from an earlier use."""
        return max(0.0, 1.0 - self.acquired / self.reads) if self.reads else 0.0


def _scrape(url: str) -> dict[str, dict[tuple[tuple[str, str], ...], float]]:
    """The admin API's /metrics: sample name -> labels -> value."""
    from api.metrics import parse_metrics

    with urllib.request.urlopen(url, timeout=30) as response:
        return parse_metrics(response.read().decode())


def _by_label(metrics: dict[str, Any], name: str, label: str) -> dict[str, float]:
    return {dict(k)[label]: v for k, v in metrics.get(name, {}).items() if v}


def _total(metrics: dict[str, Any], name: str) -> float:
    return float(sum(metrics.get(name, {}).values()))


def build_moe(seed: int) -> torch.nn.Module:
    """An OLMoE-architecture model (6 layers, 16 experts, top-2; 158 MiB at float32) with seeded
    random weights, in eval mode."""
    from transformers import OlmoeConfig, OlmoeForCausalLM

    config = OlmoeConfig(
        vocab_size=4096,
        hidden_size=256,
        intermediate_size=512,
        num_hidden_layers=6,
        num_attention_heads=8,
        num_key_value_heads=8,
        num_experts=16,
        num_experts_per_tok=2,
        max_position_embeddings=512,
        eos_token_id=0,
        pad_token_id=0,
        bos_token_id=1,
    )
    torch.manual_seed(seed)
    model = OlmoeForCausalLM(config)
    model.eval().requires_grad_(False)
    return model


VOCAB = 4096
DECODE_TOKENS = 8


def _generate(
    model: torch.nn.Module, prompt: torch.Tensor, tokens: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Prefill ``prompt`` then decode ``DECODE_TOKENS`` steps with a KV cache, feeding
    ``tokens`` (teacher forcing) or, when None, the greedy choice. Returns the tokens fed
    ``[batch, steps]`` and the logits of every step ``[batch, steps, vocab]``."""
    from transformers import DynamicCache

    cache = DynamicCache()
    chosen, logits = [], []
    with torch.inference_mode():
        step_logits = model(prompt, cache=cache, use_cache=True).logits[:, -1]
        for step in range(DECODE_TOKENS):
            logits.append(step_logits)
            token = step_logits.argmax(-1) if tokens is None else tokens[:, step]
            chosen.append(token)
            out = model(token[:, None], cache=cache, use_cache=True)
            step_logits = out.logits[:, -1]
    return torch.stack(chosen, 1), torch.stack(logits, 1)


def _median_ms(samples: list[float]) -> float:
    ordered = sorted(samples)
    return 1000 * ordered[len(ordered) // 2] if ordered else 0.0


def run_main_job(
    out_dir: Path,
    config: MainJobConfig = MainJobConfig(),
    say: Callable[[str], None] = print,
    bar: Callable[..., Any] | None = None,
) -> MainJobReport:
    """Run the main job, write ``report.md``, ``report.json`` and ``occupancy.png`` into
    ``out_dir``, and return the report. Starts (and shuts down) an embedded Ray unless one is
    connected already. ``bar(total=..., desc=...)`` makes a progress bar (tqdm's signature);
    by default there is none."""
    import ray

    from actors.config import PoolConfig
    from actors.pool import start_pool, stop_pool
    from api.admin import create_app, serve_in_thread
    from api.occupancy import OccupancySampler, plot_occupancy
    from policy.config import PolicyConfig

    started = time.monotonic()
    out_dir.mkdir(parents=True, exist_ok=True)
    # One intra-op thread: the driver shares this machine's cores with Ray's processes (the
    # controller's loop, tier actors, raylet), and torch's OpenMP threads, spinning at every
    # barrier against them, made a 2-core run's MoE requests 19x slower (7.4 s against 0.39 s,
    # measured); the matrices here are small, so one thread loses nothing.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    own_ray = not ray.is_initialized()
    if own_ray:
        say("starting an embedded local Ray")
        ray.init(
            address="local",  # a new Ray of our own, never one found running on this machine
            log_to_driver=False,
            logging_level="ERROR",
            object_store_memory=768 * MIB,
        )
    store = Path(tempfile.mkdtemp(prefix="weightpool-demo-"))
    pool_config = PoolConfig(
        namespace=NAMESPACE,
        storage_dir=str(store),
        hbm_bytes_per_device=config.hbm_mib * MIB,
        emulated_devices_per_node=1,
        host_bytes=config.host_mib * MIB,
        encodings=tuple(e.name for e in DEMO_ENCODINGS),
        policy=PolicyConfig(tick_s=0.05, quality_budget=config.quality_budget),
    )
    stop_pool(NAMESPACE)  # a pool left behind by an interrupted run
    server = None
    try:
        pool = start_pool(pool_config)
        app = create_app(namespace=NAMESPACE, token=secrets.token_urlsafe(16))
        server, admin_url = serve_in_thread(app)
        say(
            f"pool up: {len(pool.tiers)} tiers, one emulated HBM device of {config.hbm_mib} MiB; "
            f"admin API at {admin_url}/docs"
        )
        with OccupancySampler(pool.controller, period_s=0.25) as sampler:
            workload = _Workload(pool, config, say, bar or _NoBar, sampler.start_s)
            report = workload.run(admin_url)
        report.plot = str(
            plot_occupancy(
                sampler.series,
                out_dir / "occupancy.png",
                f"weightpool demo: {config.hbm_mib} MiB of emulated HBM for MiniLM + an MoE model",
                sorted(workload.marks),
            )
        )
    finally:
        if server is not None:
            server.should_exit = True
        stop_pool(NAMESPACE)
        if own_ray:
            ray.shutdown()
        shutil.rmtree(store, ignore_errors=True)
        torch.set_num_threads(threads)
    report.wall_s = time.monotonic() - started
    (out_dir / "report.json").write_text(json.dumps(asdict(report), indent=1))
    (out_dir / "report.md").write_text("\n".join(render(report)) + "\n")
    return report


class _NoBar:
    """The progress bar when none is asked for (tqdm's interface, doing nothing)."""

    def __init__(self, **_: Any):
        pass

    def update(self, n: int = 1) -> None:
        pass

    def __enter__(self) -> _NoBar:
        return self

    def __exit__(self, *exc: object) -> None:
        pass


class _Workload:
    """Calibrate, load, run the phases, collect the figures (one instance per run)."""

    def __init__(
        self,
        pool: Any,
        config: MainJobConfig,
        say: Callable[[str], None],
        bar: Callable[..., Any],
        t0: float,
    ):
        self.pool, self.config, self.say, self.bar, self.t0 = pool, config, say, bar, t0
        self.phases: list[PhaseFigures] = []
        self.marks: list[tuple[float, str]] = []  # (seconds since the pool started, what began)
        self.embed_cosines: list[float] = []
        self.moe_cosines: list[float] = []
        self.moe_top1: list[float] = []

    def run(self, admin_url: str) -> MainJobReport:
        from actors.client import PoolClient
        from actors.integration import manage
        from api.models import minilm_checkpoint
        from pool.calibration import OutputForward, calibrate
        from pool.importer import SafetensorsSource, StateDictSource, plan_blocks
        from pool.reference_model import CALIBRATION_TEXTS, load_minilm

        checkpoint = minilm_checkpoint()
        reference, tokenizer = load_minilm(checkpoint)
        specs = plan_blocks(SafetensorsSource(checkpoint), "minilm")
        self.marks.append((time.monotonic() - self.t0, "calibrate"))
        with self.bar(total=len(specs), desc="calibrate MiniLM", unit="block") as progress:
            calibration = calibrate(
                reference, tokenizer, specs, progress=lambda _s: progress.update(1)
            )
        moe_reference = build_moe(self.config.seed)
        moe_specs = plan_blocks(StateDictSource(moe_reference), "moe")
        generator = torch.Generator().manual_seed(self.config.seed)
        probe = torch.randint(2, VOCAB, (8, 8), generator=generator)
        outputs = OutputForward(lambda m=moe_reference: m(probe).logits[:, -1])
        with self.bar(total=len(moe_specs), desc="calibrate MoE", unit="block") as progress:
            moe_calibration = calibrate(
                moe_reference,
                tokenizer,
                moe_specs,
                progress=lambda _s: progress.update(1),
                outputs=outputs,
            )
        self.texts = [CALIBRATION_TEXTS[i : i + 8] for i in range(0, len(CALIBRATION_TEXTS), 8)]
        self.embed_reference = [self._embed(reference, tokenizer, b) for b in self.texts]
        embed_plain_s = []
        for batch in self.texts * 3:  # the unmanaged model's latency on the same requests
            started = time.monotonic()
            self._embed(reference, tokenizer, batch)
            embed_plain_s.append(time.monotonic() - started)
        self.tokenizer = tokenizer

        # Requests to the MoE model: 2 sequences, an 8-token prompt, then DECODE_TOKENS tokens
        # one at a time with a KV cache; the unmanaged model's greedy continuation is the
        # reference, fed to the managed model too (teacher forcing) so logits compare step by step.
        self.prompts = [torch.randint(2, VOCAB, (2, 8), generator=generator) for _ in range(4)]
        self.moe_reference = [_generate(moe_reference, p) for p in self.prompts]
        moe_plain_s = []
        for prompt in self.prompts * 3:
            started = time.monotonic()
            _generate(moe_reference, prompt)
            moe_plain_s.append(time.monotonic() - started)
        self.plain_ms = {"MiniLM": _median_ms(embed_plain_s), "MoE": _median_ms(moe_plain_s)}
        moe_state = {k: v.clone() for k, v in moe_reference.state_dict().items()}
        model_bytes = {
            "minilm": sum(s.full_nbytes for s in specs),
            "moe": sum(v.numel() * v.element_size() for v in moe_state.values()),
        }
        self.say("loading MiniLM and the MoE model (both calibrated) into the pool")
        self.marks.append((time.monotonic() - self.t0, "load"))
        self.pool.load_checkpoint(
            checkpoint, "minilm", encodings=DEMO_ENCODINGS, calibration=calibration
        )
        self.pool.load_state_dict(
            moe_state, "moe", encodings=DEMO_ENCODINGS, calibration=moe_calibration
        )
        self.calibrations = (calibration, moe_calibration)
        del moe_reference, moe_state

        with PoolClient(namespace=NAMESPACE) as client:
            minilm = manage(load_minilm(checkpoint)[0], client, "minilm")
            moe = manage(build_moe(self.config.seed), client, "moe")
            n_embed, n_moe = self.config.embed_requests, self.config.moe_requests
            self._phase("MiniLM alone", n_embed, lambda i: self._embed_step(minilm.model, i))
            self._phase("MoE alone", n_moe, lambda i: self._moe_step(moe.model, i))
            self._phase(
                "both, interleaved",
                n_embed + n_moe,
                lambda i: (
                    self._embed_step(minilm.model, i // 2)
                    if i % 2 == 0
                    else self._moe_step(moe.model, i // 2)
                ),
            )
        return self._report(admin_url, model_bytes)

    def _embed(self, model: Any, tokenizer: Any, texts: Any) -> torch.Tensor:
        from pool.reference_model import embed

        return embed(model, tokenizer, texts, batch_size=len(texts))

    def _embed_step(self, model: Any, i: int) -> None:
        from pool.reference_model import cosines

        k = i % len(self.texts)
        got = self._embed(model, self.tokenizer, self.texts[k])
        self.embed_cosines.extend(cosines(got, self.embed_reference[k]).tolist())

    def _moe_step(self, model: Any, i: int) -> None:
        k = i % len(self.prompts)
        tokens, want = self.moe_reference[k]
        got = _generate(model, self.prompts[k], tokens)[1]
        cos = torch.nn.functional.cosine_similarity(got.double(), want.double(), dim=-1)
        self.moe_cosines.extend(cos.flatten().tolist())
        self.moe_top1.extend((got.argmax(-1) == want.argmax(-1)).double().flatten().tolist())

    def _phase(self, name: str, n: int, step: Callable[[int], None]) -> None:
        start = time.monotonic()
        latencies = []
        with self.bar(total=n, desc=name, unit="req") as progress:
            for i in range(n):
                t = time.monotonic()
                step(i)
                latencies.append(time.monotonic() - t)
                progress.update(1)
        seconds = time.monotonic() - start
        self.phases.append(PhaseFigures(name, start - self.t0, seconds, n, _median_ms(latencies)))
        self.marks.append((start - self.t0, name))

    def _report(self, admin_url: str, model_bytes: dict[str, int]) -> MainJobReport:
        import ray

        from pool.encoding import PRECISION_BITS

        time.sleep(0.2)  # the client's last telemetry batch
        metrics = _scrape(admin_url + "/metrics")
        status = ray.get(self.pool.controller.status.remote())
        floors: dict[str, dict[str, int]] = {}
        for result in self.calibrations:
            counts = floors.setdefault(result.model, {})
            for precision in sorted(result.floors().values(), key=PRECISION_BITS.get):
                counts[precision.value] = counts.get(precision.value, 0) + 1
        return MainJobReport(
            hbm_bytes=self.config.hbm_mib * MIB,
            model_bytes=model_bytes,
            phases=self.phases,
            cache_hits=_by_label(metrics, "weightpool_lease_hits_total", "path").get(
                "client_cache", 0.0
            ),
            cache_misses=_by_label(metrics, "weightpool_lease_misses_total", "path").get(
                "client_cache", 0.0
            ),
            acquires_resident=_by_label(metrics, "weightpool_lease_hits_total", "path").get(
                "acquire", 0.0
            ),
            acquires_waited=_by_label(metrics, "weightpool_lease_misses_total", "path").get(
                "acquire", 0.0
            ),
            stall_s=_total(metrics, "weightpool_stall_seconds_total"),
            transitions=_by_label(metrics, "weightpool_transitions_total", "to_state"),
            vetoes=_by_label(metrics, "weightpool_vetoes_total", "rule"),
            moved_bytes={
                f"{dict(k)['src']}->{dict(k)['dst']}": v
                for k, v in metrics.get("weightpool_moved_bytes_total", {}).items()
                if v
            },
            quality_cost=status.get("quality_cost"),
            quality_budget=status["quality_budget"],
            embed_cosine_min=min(self.embed_cosines),
            embed_cosine_mean=sum(self.embed_cosines) / len(self.embed_cosines),
            moe_logits_cosine_min=min(self.moe_cosines),
            moe_top1_agreement=sum(self.moe_top1) / len(self.moe_top1),
            calibration_s=sum(r.timings.total_s for r in self.calibrations),
            floors=floors,
            admin_url=admin_url,
            plot=None,
            wall_s=0.0,
            final_states=dict(status["states"]),
            unmanaged_request_ms=self.plain_ms,
        )


def render(report: MainJobReport) -> list[str]:
    """The report as markdown lines."""
    models = " + ".join(f"{m} {b / MIB:.0f} MiB" for m, b in report.model_bytes.items())
    lines = [
        "# weightpool demo report",
        "",
        f"Emulated HBM: {report.hbm_bytes / MIB:.0f} MiB for {models} at full precision "
        f"({sum(report.model_bytes.values()) / report.hbm_bytes:.2f}x the HBM). "
        f"Wall time {report.wall_s:.0f} s.",
        "",
        "| phase | requests | seconds | median request ms |",
        "|---|---:|---:|---:|",
    ]
    for p in report.phases:
        lines.append(f"| {p.name} | {p.requests} | {p.seconds:.1f} | {p.median_request_ms:.1f} |")
    plain = report.unmanaged_request_ms
    if plain:
        lines += [
            "",
            "The unmanaged models on the same requests (same process, one thread), median ms: "
            + ", ".join(f"{m} {ms:.1f}" for m, ms in plain.items())
            + ".",
        ]
    lines += [
        "",
        f"- lease hit rate {report.hit_rate:.3f}: {report.reads:.0f} block reads, "
        f"{report.acquired:.0f} blocks leased by a remote acquire first "
        f"({report.acquires_resident:.0f} resident in HBM, {report.acquires_waited:.0f} waited "
        "for a demand promotion)",
        f"- stall: {report.stall_s:.2f} s of forwards waiting in remote acquires (mapping and "
        "decoding the copies included)",
        "- transitions by state reached: "
        + (", ".join(f"{k} {v:.0f}" for k, v in sorted(report.transitions.items())) or "none"),
        "- vetoes by rule: "
        + (", ".join(f"{k} {v:.0f}" for k, v in sorted(report.vetoes.items())) or "none"),
        "- bytes moved: "
        + (
            ", ".join(f"{k} {v / MIB:.0f} MiB" for k, v in sorted(report.moved_bytes.items()))
            or "none"
        ),
        "- block states at the end: "
        + ", ".join(f"{k} {v}" for k, v in sorted(report.final_states.items())),
        f"- calibration of both models: {report.calibration_s:.1f} s; precision floors: "
        + "; ".join(
            f"{model}: " + ", ".join(f"{p} {n}" for p, n in counts.items())
            for model, counts in report.floors.items()
        ),
        "",
        "Output quality against the unmanaged models:",
        "",
        f"- MiniLM sentence embeddings, cosine: min {report.embed_cosine_min:.6f}, "
        f"mean {report.embed_cosine_mean:.6f}",
        f"- MoE next-token logits, cosine: min {report.moe_logits_cosine_min:.6f}; "
        f"same top-1 token: {report.moe_top1_agreement:.3f}",
    ]
    if report.quality_cost is not None:
        lines.append(
            f"- predicted quality cost of the last placement: {report.quality_cost:.4g} "
            f"(budget {report.quality_budget:.4g})"
        )
    if report.plot:
        lines += ["", f"![tier occupancy over time]({Path(report.plot).name})"]
    return lines
