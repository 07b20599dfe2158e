"""The peer policies and the oracle, in the simulator, with the same information.

Each docstring says which published behaviour the policy reproduces and where it simplifies.
Every policy may preload HBM for free before serving starts (``setup``), so that none starts
colder than another; all fetch at full precision except ``int4-static``.
"""

from __future__ import annotations

import itertools
from collections import OrderedDict
from collections.abc import Iterable

import numpy as np

from bench.replay.simulator import FULL, PREFETCH, Simulator

INT4 = 3  # index of INT4 in the replay's encoding table (full, fp8, int8, int4, int4+zstd)


def _max_working_set(sim: Simulator) -> int:
    """Bytes of the largest set of blocks one position of the trace needs at once."""
    worst = 0
    for step in range(len(sim.chosen)):
        for position in range(sim.layout.positions):
            worst = max(worst, int(sim.sizes[sim.needed(step, position), FULL].sum()))
    return worst


class LruBase:
    """Shared LRU bookkeeping: a recency order over resident blocks."""

    name = "lru-base"

    def __init__(self) -> None:
        self.recent: OrderedDict[int, None] = OrderedDict()

    def touch(self, blocks: np.ndarray) -> None:
        for block in blocks.tolist():
            self.recent[block] = None
            self.recent.move_to_end(block)

    def encoding(self, sim: Simulator, block: int) -> int:
        return FULL

    def before_position(self, sim: Simulator, step: int, position: int) -> None:
        return None

    def during_position(self, sim: Simulator, step: int, position: int, needed: np.ndarray) -> None:
        return None

    def after_position(self, sim: Simulator, step: int, position: int, needed: np.ndarray) -> None:
        self.touch(needed)

    def _lru_victims(
        self, sim: Simulator, nbytes: int, protected: set[int], pool: Iterable[int]
    ) -> list[int]:
        chosen, freed = [], 0
        size_of, encoding_of = sim.size_of, sim.encoding_of
        for block in pool:
            if freed >= nbytes:
                break
            if block in protected or not sim.evictable(block):
                continue
            chosen.append(block)
            freed += size_of[block][encoding_of[block]]
        return chosen

    def victims(self, sim: Simulator, nbytes: int, protected: set[int]) -> list[int]:
        # PERF: read in place (nothing changes it until the victims are chosen); a copy of the
        # recency order per fetch was a fifth of int4-static's replay.
        encoding_of = sim.encoding_of
        order = (b for b in self.recent if encoding_of[b] >= 0)
        victims = self._lru_victims(sim, nbytes, protected, order)
        for block in victims:
            self.recent.pop(block, None)
        return victims


class StaticPolicy(LruBase):
    """Accelerate's ``device_map``: the first blocks in layer order are pinned in HBM; every other
    block is fetched when its layer runs and dropped after (a scratch area sized for the largest
    working set is kept free). Simplification: the fetch is on demand, with no overlap beyond the
    simulator's link (Accelerate's CPU offload hooks move weights synchronously)."""

    name = "static"

    def __init__(self) -> None:
        super().__init__()
        self.pinned: set[int] = set()

    def setup(self, sim: Simulator) -> None:
        budget = sim.capacity - _max_working_set(sim)
        for block in np.argsort(sim.layout.position, kind="stable").tolist():
            if sim.used + int(sim.sizes[block, FULL]) > budget:
                break
            sim.preload(block, FULL)
            self.pinned.add(block)

    def after_position(self, sim: Simulator, step: int, position: int, needed: np.ndarray) -> None:
        encoding_of = sim.encoding_of
        for block in needed.tolist():
            if block not in self.pinned and encoding_of[block] >= 0:
                sim.evict(block)

    def victims(self, sim: Simulator, nbytes: int, protected: set[int]) -> list[int]:
        pool = [b for b in np.flatnonzero(sim.encoding >= 0).tolist() if b not in self.pinned]
        return self._lru_victims(sim, nbytes, protected, pool)


class LruPolicy(LruBase):
    """mixtral-offloading (Eliseev and Mazur 2023, arXiv:2312.17238): every non-expert block stays
    in HBM; each MoE layer has an LRU cache of the same number of expert slots; a missing expert is
    loaded on demand into its layer's cache, evicting that layer's least recently used expert.
    Simplifications: no mixed quantization (full precision here; ``int4-static`` covers that)."""

    name = "lru"

    def __init__(self) -> None:
        super().__init__()
        self.layer_lru: dict[int, OrderedDict[int, None]] = {}

    def setup(self, sim: Simulator) -> None:
        kinds = sim.layout.kind
        for block in np.flatnonzero(kinds != "expert").tolist():
            if not sim.preload(block, FULL):
                break
        # The rest, split evenly: preload the first experts of each layer.
        blocks = sim.layout.expert_block
        for layer in range(blocks.shape[0]):
            self.layer_lru[layer] = OrderedDict()
        slots = (
            (sim.capacity - sim.used)
            // max(int(sim.sizes[blocks[0, 0], FULL]), 1)
            // max(blocks.shape[0], 1)
        )
        for layer in range(blocks.shape[0]):
            for block in blocks[layer, : int(slots)].tolist():
                if sim.preload(block, FULL):
                    self.layer_lru[layer][block] = None

    def _layer(self, sim: Simulator, block: int) -> int:
        return sim.layout.moe_layer_of_block[block]

    def _prefetch(
        self, sim: Simulator, layer: int, blocks: np.ndarray, protected: set[int]
    ) -> None:
        """Fetch ``blocks`` into ``layer``'s cache as most recently used (if room can be made)."""
        lru = self.layer_lru[layer]
        for block in blocks.tolist():
            if sim.fetch(self, block, FULL, PREFETCH, protected):
                lru[block] = None
                lru.move_to_end(block)

    def after_position(self, sim: Simulator, step: int, position: int, needed: np.ndarray) -> None:
        moe_layer_of, is_expert = sim.layout.moe_layer_of_block, sim.layout.is_expert
        for block in needed.tolist():
            layer = moe_layer_of[block]
            if layer >= 0 and is_expert[block]:
                lru = self.layer_lru[layer]
                lru[block] = None
                lru.move_to_end(block)

    def victims(self, sim: Simulator, nbytes: int, protected: set[int]) -> list[int]:
        encoding_of = sim.encoding_of
        wanted = next((b for b in protected if encoding_of[b] < 0), None)
        layer = -1 if wanted is None else self._layer(sim, wanted)
        own_lru = self.layer_lru.get(layer)
        own = own_lru if own_lru is not None else ()
        # The layer's own least recently used first, then any other layer's (lazily: a victim is
        # usually found within the first few). PERF: read in place, as LruBase does (nothing
        # changes the orders until the victims are chosen); copies were a tenth of lru's replay.
        others = (b for lru in self.layer_lru.values() if lru is not own_lru for b in lru)
        order = (b for b in itertools.chain(own, others) if encoding_of[b] >= 0)
        victims = self._lru_victims(sim, nbytes, protected, order)
        for block in victims:
            self.layer_lru.get(self._layer(sim, block), OrderedDict()).pop(block, None)
        return victims


class LruSpecPolicy(LruPolicy):
    """mixtral-offloading with speculative expert loading: while layer ``l`` runs, the experts
    layer ``l + 1`` is guessed to need are prefetched into its cache. mixtral-offloading guesses
    by applying the next layer's gate to the current hidden state; the replay has no hidden
    states, so the guess is from router history: the ``top_k`` experts of layer ``l + 1`` that
    most often followed the experts this token chose at layer ``l`` (counts learned online).
    Prediction recall is measured against what layer ``l + 1`` then chose."""

    name = "lru-spec"

    def __init__(self) -> None:
        super().__init__()
        self.guessed_right = 0
        self.used = 0
        self._guess: dict[int, set[int]] = {}
        self.follows: np.ndarray | None = None  # [moe layers - 1, experts, experts] counts

    def during_position(self, sim: Simulator, step: int, position: int, needed: np.ndarray) -> None:
        layout = sim.layout
        moe, moe_next = (
            layout.moe_layer_of_position(position),
            layout.moe_layer_of_position(position + 1),
        )
        if moe < 0 or moe_next < 0:
            return
        if self.follows is None:
            n_layers, n_experts = layout.expert_block.shape
            self.follows = np.zeros((n_layers - 1, n_experts, n_experts))
        scores = self.follows[moe, sim.chosen[step][moe]].sum(axis=0)
        if not scores.any():
            return
        k = layout.model.top_k
        guess_experts = np.argsort(-scores, kind="stable")[:k]
        guess = layout.expert_block[moe_next, guess_experts]
        self._guess[moe_next] = set(guess.tolist())
        self._prefetch(sim, moe_next, guess, set(needed.tolist()) | self._guess[moe_next])

    def after_position(self, sim: Simulator, step: int, position: int, needed: np.ndarray) -> None:
        super().after_position(sim, step, position, needed)
        layout = sim.layout
        moe = layout.moe_layer_of_position(position)
        if moe < 0:
            return
        chosen = sim.chosen[step][moe]
        if moe in self._guess:
            used = set(layout.expert_block[moe, chosen].tolist())
            self.used += len(used)
            self.guessed_right += len(used & self._guess.pop(moe))
        if self.follows is not None and moe >= 1:
            previous = sim.chosen[step][moe - 1]
            # PERF: broadcast indices, as np.ix_ makes them (np.ix_ took 0.9 s of a profiled run)
            self.follows[moe - 1][previous[:, None], chosen[None, :]] += 1

    @property
    def predicted_set_recall(self) -> float | None:
        """The share of the experts a layer chose that its guess held (whether or not the
        prefetch of the guess got room); None before any guess was checked."""
        return self.guessed_right / self.used if self.used else None


class Int4StaticPolicy(LruBase):
    """Everything quantized to INT4 once (as GPTQ/AWQ deployments do), placed in layer order
    while it fits, and a global LRU for what still does not fit."""

    name = "int4-static"

    def encoding(self, sim: Simulator, block: int) -> int:
        return INT4

    def setup(self, sim: Simulator) -> None:
        for block in np.argsort(sim.layout.position, kind="stable").tolist():
            if not sim.preload(block, INT4):
                break
            self.recent[block] = None


class OraclePolicy(LruBase):
    """The future known, at full precision, over the same link: every non-expert block pinned (as
    in every peer that keeps them), Belady eviction among experts (the resident expert used
    farthest in the future goes first: with experts of one size, the fewest possible fetches), and
    aggressive prefetch: the next missing expert is fetched as soon as an expert used after it can
    make room (Cao, Felten, Karlin and Li 1995, "A study of integrated prefetching and caching
    strategies": within a small factor of the optimal elapsed time). It is the reference, not a
    proven bound: the tests check that no placement-only policy beats it on their traces."""

    name = "oracle"

    def __init__(self, lookahead_positions: int = 8) -> None:
        super().__init__()
        self.lookahead = lookahead_positions
        self.uses: list[list[int]] = []
        self.pinned: set[int] = set()
        self.pinned_mask = np.zeros(0, dtype=bool)
        self.next_index = np.zeros(0, dtype=np.int64)  # per block, its next use's index in uses
        self.next_use_at = np.zeros(0, dtype=np.int64)  # per block, when it is next used

    def setup(self, sim: Simulator) -> None:
        positions = sim.layout.positions
        self.uses = [[] for _ in range(len(sim.layout.block_names))]
        for step in range(len(sim.chosen)):
            for position in range(positions):
                when = step * positions + position
                for block in sim.needed(step, position).tolist():
                    self.uses[block].append(when)
        for block in np.flatnonzero(sim.layout.kind != "expert").tolist():
            if sim.preload(block, FULL):
                self.pinned.add(block)
        n = len(self.uses)
        self.pinned_mask = np.zeros(n, dtype=bool)
        self.pinned_mask[list(self.pinned)] = True
        self.next_index = np.zeros(n, dtype=np.int64)
        self.next_use_at = np.array([u[0] if u else 1 << 62 for u in self.uses], dtype=np.int64)
        experts = sim.layout.expert_block.ravel().tolist()
        for block in sorted(experts, key=lambda b: self.uses[b][0] if self.uses[b] else 1 << 62):
            if not self.uses[block] or not sim.preload(block, FULL):
                break

    def _now(self, sim: Simulator) -> int:
        return sim.step * sim.layout.positions + sim.position

    def after_position(self, sim: Simulator, step: int, position: int, needed: np.ndarray) -> None:
        # PERF: next uses advance as time does (one pointer per block), so that victims are
        # chosen with numpy over all blocks rather than a Python sort with a bisect per block.
        for block in needed.tolist():
            self.next_index[block] += 1
            uses = self.uses[block]
            i = int(self.next_index[block])
            self.next_use_at[block] = uses[i] if i < len(uses) else 1 << 62

    def victims(
        self, sim: Simulator, nbytes: int, protected: set[int], before: int | None = None
    ) -> list[int]:
        candidate = (sim.encoding >= 0) & ~self.pinned_mask
        for block in protected:
            candidate[block] = False
        candidate[sim.on_the_wire()] = False
        rows = np.flatnonzero(candidate)
        next_use = self.next_use_at[rows]
        chosen, freed = [], 0
        # PERF: the farthest next use picked one at a time (argmax takes the first of equals, as
        # the stable sort it replaces did); a full sort per call was a fifth of a qwen3 replay.
        while freed < nbytes and len(rows):
            i = int(np.argmax(next_use))
            if next_use[i] < 0 or (before is not None and next_use[i] <= before):
                break  # none left, or all needed no later than the block we make room for
            block = int(rows[i])
            next_use[i] = -1
            chosen.append(block)
            freed += sim.size_of[block][sim.encoding_of[block]]
        return chosen if freed >= nbytes else []

    def before_position(self, sim: Simulator, step: int, position: int) -> None:
        now = self._now(sim)
        positions = sim.layout.positions
        encoding_of, size_of = sim.encoding_of, sim.size_of
        for ahead in range(self.lookahead):
            when = now + ahead
            t, p = divmod(when, positions)
            if t >= len(sim.chosen):
                return
            for block in sim.needed(t, p).tolist():
                if encoding_of[block] >= 0:
                    continue
                size = size_of[block][FULL]
                short = sim.used + size - sim.capacity
                if short > 0:
                    victims = self.victims(sim, short, {block}, before=when)
                    if not victims:
                        return  # no room without hurting a sooner use: wait
                    for victim in victims:
                        sim.evict(victim)
                sim.fetch(self, block, FULL, PREFETCH, {block})


class ActivationAwarePolicy(LruPolicy):
    """MoE-Infinity (Xue et al. 2024, arXiv:2401.14361): every non-expert block pinned; an expert
    activation matrix (EAM, counts per layer and expert) traced for the current request and kept
    in a collection of past requests' EAMs; at each MoE layer the current EAM is matched (cosine)
    to the closest past one, whose activations for the next ``depth`` layers drive prefetching
    (nearest layer first) and cache priority (the expert least likely to be activated next is
    evicted first). Simplifications: a trace has no request boundaries, so a "request" is a
    window of ``window`` tokens; the collection keeps the last ``capacity`` windows."""

    name = "activation-aware"

    def __init__(self, window: int = 32, capacity: int = 32, depth: int = 2) -> None:
        super().__init__()
        self.window, self.capacity, self.depth = window, capacity, depth
        self.current: np.ndarray | None = None
        self.library: list[np.ndarray] = []
        self.matched: np.ndarray | None = None
        self._moe_of: np.ndarray | None = None
        self._is_expert = np.zeros(0, dtype=bool)
        self._library_flat = np.zeros((0, 0))
        self._library_norms = np.zeros(0)
        self._likely_for: np.ndarray | None = None  # the matched EAM _likely was read from
        self._likely = np.zeros(0)  # per block, its activations in that EAM (experts only)

    def _match(self) -> np.ndarray | None:
        if self.current is None or not self.library:
            return None
        flat = self.current.ravel()
        norm = np.linalg.norm(flat)
        if norm == 0:
            return self.library[-1]
        # Counts are small integers, so the dot products are exact and the same as one by one.
        scores = (self._library_flat @ flat) / (norm * self._library_norms)
        return self.library[int(np.argmax(scores))]

    def during_position(self, sim: Simulator, step: int, position: int, needed: np.ndarray) -> None:
        layout = sim.layout
        moe = layout.moe_layer_of_position(position)
        if moe < 0:
            return
        if self.current is None:
            self.current = np.zeros(layout.expert_block.shape)
        self.current[moe, sim.chosen[step][moe]] += 1
        self.matched = self._match()
        if self.matched is None:
            return
        protected = set(needed.tolist())
        k = layout.model.top_k
        for ahead in range(1, self.depth + 1):
            target = layout.moe_layer_of_position(position + ahead)
            if target < 0:
                break
            likely = np.argsort(-self.matched[target], kind="stable")[:k]
            blocks = layout.expert_block[target, likely]
            protected |= set(blocks.tolist())
            self._prefetch(sim, target, blocks, protected)

    def after_position(self, sim: Simulator, step: int, position: int, needed: np.ndarray) -> None:
        super().after_position(sim, step, position, needed)
        if position == sim.layout.positions - 1 and (step + 1) % self.window == 0:
            if self.current is not None:
                self.library.append(self.current)
                self.library = self.library[-self.capacity :]
                self._library_flat = np.stack([e.ravel() for e in self.library])
                self._library_norms = np.array([np.linalg.norm(e) or 1.0 for e in self.library])
            self.current = None

    def victims(self, sim: Simulator, nbytes: int, protected: set[int]) -> list[int]:
        if self.matched is None:
            return super().victims(sim, nbytes, protected)
        layout = sim.layout
        if self._moe_of is None:  # each block's MoE layer, once
            self._moe_of = np.array([layout.moe_layer_of_position(int(p)) for p in layout.position])
            self._is_expert = layout.kind == "expert"
        if self._likely_for is not self.matched:
            # PERF: read once per match for every block (rows that are not experts are never
            # candidates), not per call for the candidates (a quarter of this policy's replay).
            self._likely = self.matched[self._moe_of, layout.expert].astype(float)
            self._likely_for = self.matched
        candidate = (sim.encoding >= 0) & self._is_expert
        candidate[list(protected)] = False
        candidate[sim.on_the_wire()] = False
        experts = np.flatnonzero(candidate)
        likely = self._likely[experts]
        victims, freed = [], 0
        # PERF: the least likely picked one at a time (argmin takes the first of equals, as the
        # stable sort it replaces did); a full sort per call was a quarter of a qwen3 replay.
        while freed < nbytes and len(experts):
            i = int(np.argmin(likely))
            if likely[i] == np.inf:
                break
            likely[i] = np.inf
            block = int(experts[i])
            victims.append(block)
            freed += sim.size_of[block][sim.encoding_of[block]]
        for block in victims:
            self.layer_lru.get(self._layer(sim, block), OrderedDict()).pop(block, None)
        return victims


POLICIES = {
    "static": StaticPolicy,
    "lru": LruPolicy,
    "lru-spec": LruSpecPolicy,
    "activation-aware": ActivationAwarePolicy,
    "int4-static": Int4StaticPolicy,
    "oracle": OraclePolicy,
}
