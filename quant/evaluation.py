"""Accuracy (and loss, and divergence from the float model) under many width configurations,
reusing what does not change.

The simulated network is the BN-folded model (quant/fold.py) with each weight layer's weights
fake-quantized (computed once per layer and width, then copied in) and each tensor fake-quantized
where it is written (its Slot; quant/place.py), so every reader, the residual add and pooling
included, reads the quantized tensor. This is exactly what the cost model charges.

The model declares itself as a chain of segments (models/structure.py). A configuration that
differs from the current base only in groups of segment k (a weight layer or a tensor written
there) computes exactly what the base computes in front of k, so the base's segment inputs are
kept and a candidate runs from segment k on. Stage 2 (one group at a time against the float base)
and the greedy search (one move at a time against the current configuration) both evaluate mostly
suffixes this way. The greedy also keeps its candidates' segment inputs, computed on their way (within
a second bound), so the candidate it accepts becomes the base without running again.

With a statistics correction (quant/correct.py: bias correction or BN re-estimation), each configuration's
corrections are computed on calibration images before it is evaluated. A layer's correction depends only on
what is in front of it, so a candidate keeps the base's corrections in front of its first changed segment and
recomputes them from there on, from the calibration images' cached segment inputs.
"""
from __future__ import annotations

from collections import OrderedDict
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from quant.calibrate import quantizers_from
from quant.correct import Correction, apply_, check_mode, correcting_pass, output_stats
from quant.cost import KernelTable
from quant.fold import fold_bn
from quant.place import check_ranges, set_tensor_quantizer, slots
from quant.quantizer import learned_weight, quantize_weight
from quant.stats import top1_credit, top1_tied
from quant.widths import ACT_BITS, FLOAT_BITS, WEIGHT_BITS, A, W, config_key

# Default bound on the cached activations (bytes). ResNet-20 on 5,000 images needs about 2 GB;
# ResNet-110 about 10 GB, so it caches every few segments and recomputes in between.
DEFAULT_CACHE_BYTES = 4 << 30


@dataclass
class Outcome:
    """One configuration evaluated on n images."""
    correct: torch.Tensor   # float64 [n], on the CPU: each image's credit, 1 right, 0 wrong, 1/k in a k-way
                            # top-1 tie that holds the label (quant.stats.top1_credit)
    loss: float             # mean cross-entropy against the labels
    kl: float               # mean KL(float model || this configuration), nats per image
    tied: int = 0           # images whose top-1 is a tie

    @property
    def n(self) -> int:
        return len(self.correct)

    @property
    def n_correct(self) -> float:
        return float(self.correct.sum())

    @property
    def tie_rate(self) -> float:
        return self.tied / max(self.n, 1)

    @property
    def accuracy(self) -> float:
        return 100.0 * self.n_correct / max(self.n, 1)


@contextmanager
def starting_path():
    """Evaluation as it was before the speed work of issue 28, for benchmarks/search_speed.py: torch's
    fake-quantize op in the quantizer, and each accepted configuration recomputed by ``set_base``. Same
    answers, slower."""
    from quant.quantizer import Quantizer
    kernel, promote = Quantizer.kernel, CachedEvaluator.promote
    Quantizer.kernel, CachedEvaluator.promote = "torch", False
    try:
        yield
    finally:
        Quantizer.kernel, CachedEvaluator.promote = kernel, promote


def cached_segments(sizes: list[int], limit: int) -> list[bool]:
    """Which segment inputs to keep: all of them (but the first, the image itself, rebuilt from
    uint8 for free) if they fit into `limit` bytes, else every m-th, the smallest m that fits."""
    keep = [False] + [True] * (len(sizes) - 1)
    for m in range(1, len(sizes) + 1):
        keep = [k > 0 and k % m == 0 for k in range(len(sizes))]
        if sum(s for s, k in zip(sizes, keep) if k) <= limit:
            return keep
    return [False] * len(sizes)


class CachedEvaluator:
    """Accuracy, loss and KL to the float model of `model` under width configurations.

    `table` is the model's KernelTable (quant/cost.py) under the target simulated; `ranges` the
    calibrated tensor ranges (quant/calibrate.py) of every width that may be asked for. Weights are
    quantized per channel (or per tensor) after folding, with the MSE (or max-abs) clip, on the grid of
    `weight_range` (quant/quantizer.py); a (layer, bits) pair in `levels` takes its learned levels on that
    grid instead of round-to-nearest (quant/adaround.py). The inputs of
    segments under the base configuration are cached for the whole split, within `cache_bytes`;
    segments that do not fit are recomputed from the nearest cached one (identical results).
    With `pending_bytes` > 0 the segment inputs of the candidates evaluated since the base last changed are
    kept as well, the newest within that bound (``promote``): `set_base` of one of them moves its inputs into
    the cache instead of computing them again, the same tensors. For a caller that moves the base to a
    candidate (the greedy search); stage 2 never does, and keeps none.
    """

    promote = True   # class default; ``starting_path()`` turns it off to measure what it saves

    def __init__(self, model, table: KernelTable, x_u8, labels, normalize, ranges=None, per_channel: bool = True,
                 clip: str = "mse", batch_size: int = 1000, base_config=None,
                 cache_bytes: int = DEFAULT_CACHE_BYTES, cache_activations: bool = True, weight_range: int = 8,
                 levels: dict | None = None, pending_bytes: int = 0, correction: tuple | None = None):
        self.model = fold_bn(model)
        self.table, self.target, self.space = table, table.target, table.space
        self._groups = set(self.space.groups)
        self.x_u8, self.labels, self.normalize = x_u8, labels, normalize
        self.batch_size = batch_size
        self.per_channel, self.clip, self.weight_range = per_channel, clip, weight_range
        self.levels = dict(levels or {})       # {(layer, bits): learned int levels} (quant/adaround.py)
        self.ranges = dict(ranges or {})
        self._tq = {k: q.to(x_u8.device).eval() for k, q in quantizers_from(self.ranges).items()}
        self._wq: dict[tuple[str, int], torch.Tensor] = {}
        self.layers = {n: self.model.get_submodule(n) for n in self.space.layers}
        self.float_w = {n: m.weight.detach().clone() for n, m in self.layers.items()}
        self.slots = slots(self.model, self.target)
        self.segments = self.model.segments(self.target)
        self.segment_of = table.segment_of
        self._init_correction(model, correction)
        sizes = self._segment_input_bytes() if cache_activations else [0] * len(self.segments)
        self._sizes = sizes
        self.keep = cached_segments(sizes, cache_bytes) if cache_activations else [False] * len(self.segments)
        self.cached_bytes = sum(s for s, k in zip(sizes, self.keep) if k)
        self.cache: list[list[torch.Tensor] | None] = [None] * len(self.segments)
        self.pending_bytes = pending_bytes
        self._pending: OrderedDict[tuple, tuple] = OrderedDict()   # candidates' inputs (and corrections)
        self.promoted = 0
        self.applied = None
        self.float_logp = None
        self.evaluations = 0
        self.base = self.full({})
        self.float_outcome = self._run(self.base, 0, store=True)   # also keeps the float log-probs
        self.base_outcome = self.float_outcome
        if base_config:
            self.set_base(base_config)

    @torch.no_grad()
    def _segment_input_bytes(self) -> list[int]:
        shapes = []
        h = self.normalize(self.x_u8[:1])
        for seg in self.segments:
            shapes.append(h[0].numel() * h.element_size())
            h = seg.fn(h)
        return [s * self.n for s in shapes]

    @property
    def n(self) -> int:
        return len(self.labels)

    def full(self, config) -> dict[tuple[str, str], int]:
        """{group: bits} for every group, from a full or partial {group: bits} (absent: float) or a
        configuration in file form."""
        config = config or {}
        if all(isinstance(k, tuple) for k in config):
            # a full one skips Space.full's checks, but not the width check: an unchecked width would fail
            # half-way through _apply and leave the network out of step with self.applied
            if config.keys() == self._groups and all(type(b) is int and b in (WEIGHT_BITS if k == W else ACT_BITS)
                                                     for (k, _), b in config.items()):
                return config
            return self.space.full(config)
        return self.space.parse(config, FLOAT_BITS, source="configuration")

    def _first_changed_segment(self, a: dict, b: dict) -> int:
        changed = [self.segment_of[g] for g in a if a[g] != b[g]]
        return min(changed) if changed else len(self.segments)

    def weight(self, name: str, bits: int) -> torch.Tensor:
        """Layer `name`'s folded weight at `bits` (the float one at 32), quantized once."""
        if bits == FLOAT_BITS:
            return self.float_w[name]
        if (name, bits) not in self._wq:
            if (name, bits) in self.levels:
                self._wq[name, bits] = learned_weight(self.float_w[name], bits, self.levels[name, bits],
                                                      self.per_channel, self.clip, self.weight_range)
            else:
                self._wq[name, bits] = quantize_weight(self.float_w[name], bits, self.per_channel, self.clip,
                                                         self.weight_range)
        return self._wq[name, bits]

    def tensor_quantizer(self, name: str, bits: int):
        """The quantizer tensor `name` takes at `bits` (its calibrated range)."""
        return self._tq[name, bits]

    @torch.no_grad()
    def set_tensor_scale(self, name: str, bits: int, scale: float):
        """Tensor `name`'s range at `bits` becomes `scale` from the next evaluation on (for a caller that searches
        it, quant/loss_aware.py). The kept segment inputs are the base configuration's, which must hold the
        tensor float or at another width."""
        if self.base.get((A, name)) == bits:
            raise ValueError(f"tensor {name} is at {bits} bits in the base configuration, whose kept inputs would go stale")
        self._tq[name, bits].scale.fill_(scale)
        self.ranges[name] = {**self.ranges[name], "scales": {**self.ranges[name]["scales"], str(bits): float(scale)}}

    @contextmanager
    def float_network(self):
        """The folded network with every group float, for a caller that runs it itself (quant/fisher.py). What
        the caller attaches to it is the caller's to remove; the next evaluation applies its configuration
        afresh."""
        self._apply(self.full({}))
        self._uncorrect()
        try:
            yield self.model
        finally:
            self.applied = None

    @torch.no_grad()
    def _apply(self, config: dict):
        check_ranges(config, self.ranges)   # before anything changes: a refused configuration leaves no trace
        prev = self.applied or {}
        for (kind, name), bits in config.items():
            if prev.get((kind, name)) == bits:
                continue
            if kind == W:
                self.layers[name].weight.copy_(self.weight(name, bits))
            else:
                set_tensor_quantizer(self.slots[name], None if bits == FLOAT_BITS else self._tq[name, bits])
        self.applied = config

    def _init_correction(self, model, correction):
        """`correction`: None, or (mode, uint8 calibration images) with mode "bias" or "bn" (quant/correct.py);
        the corrected layers are the convs that had a BN."""
        self.correction = None if correction is None or correction[0] == "none" else correction[0]
        self.base_corr: dict[str, Correction] = {}
        self.calib_cache: list[torch.Tensor | None] = [None] * len(self.segments)
        if self.correction is None:
            return
        check_mode(self.correction)
        if self.correction == "bn" and not self.per_channel:
            raise ValueError("BN re-estimation rescales each output channel: it needs per-channel weight scales")
        self.corr_layers = [c for c, _ in model.conv_bn_pairs() if c in self.layers]
        self.float_b = {n: self.layers[n].bias.detach().clone() for n in self.corr_layers}
        self.calib = self.normalize(correction[1])
        self.float_stats = output_stats(self.model, self.corr_layers, lambda: self._chain(self.calib, 0))

    def _chain(self, h, start: int, inputs: dict | None = None):
        """Segments `start`.. on `h`; the inputs of the kept segments after `start` go into `inputs`."""
        for k in range(start, len(self.segments)):
            if inputs is not None and k > start and self.keep[k]:
                inputs[k] = h
            h = self.segments[k].fn(h)
        return h

    @torch.no_grad()
    def _uncorrect(self):
        """Every corrected layer back to its uncorrected weight (at the applied width) and float bias."""
        if self.correction is not None:
            for n in self.corr_layers:
                self.layers[n].weight.copy_(self.weight(n, self.applied[W, n]))
                self.layers[n].bias.copy_(self.float_b[n])

    def _correct(self, config: dict, start: int) -> tuple[dict, dict]:
        """Fold `config`'s corrections into the layers: the base's in front of segment `start`, computed afresh
        from there on (one pass over the calibration images). Returns them, with the calibration images'
        inputs to the kept segments after `start`."""
        prefix = {n: c for n, c in self.base_corr.items() if self.segment_of[W, n] < start}
        self._uncorrect()
        apply_(self.model, prefix)
        inputs = {}
        h = self.calib if start == 0 else self.calib_cache[start]
        suffix = [n for n in self.corr_layers if self.segment_of[W, n] >= start]
        found = correcting_pass(self.model, suffix, self.float_stats, self.correction,
                                lambda: self._chain(h, start, inputs))
        apply_(self.model, found)
        return {**prefix, **found}, inputs

    @torch.inference_mode()
    def _run(self, config: dict, start: int, store: bool, stop=None) -> Outcome:
        """Evaluate `config`, running segments from `start` (or the nearest cached one before it).

        With store=True the kept segment inputs computed on the way replace the cache; otherwise they are
        kept for `set_base` (``promote``) while they fit. `stop(credits so far)`, asked after each batch but
        the last, ends the evaluation early: the outcome then covers the first images only (and is kept for
        nothing)."""
        self._apply(config)
        while start > 0 and not self.keep[start]:
            start -= 1
        corrected = self._correct(config, start) if self.correction else None
        correct, losses, kls = [], [], []   # per image, summed at the end: no result depends on the batch size
        tied = 0
        first = self.float_logp is None
        logps = []
        inputs = {k: [] for k in range(start + 1, len(self.segments)) if self.keep[k]}
        keep_inputs = store or (self.promote and self.pending_bytes > 0 and self._fits(inputs))
        for b, s in enumerate(range(0, self.n, self.batch_size)):
            h = self.normalize(self.x_u8[s:s + self.batch_size]) if start == 0 else self.cache[start][b]
            for k in range(start, len(self.segments)):
                if keep_inputs and k in inputs:
                    inputs[k].append(h)
                h = self.segments[k].fn(h)
            y = self.labels[s:s + self.batch_size]
            logp = F.log_softmax(h.float(), dim=1)
            correct.append(top1_credit(h, y).cpu())
            tied += int(top1_tied(h).sum())
            losses.append(F.nll_loss(logp, y, reduction="none").double().cpu())
            if first:
                logps.append(logp)
            else:
                ref = self.float_logp[b]
                kls.append((ref.exp() * (ref - logp)).sum(1).double().cpu())
            if stop is not None and s + self.batch_size < self.n and stop(torch.cat(correct)):
                keep_inputs = False
                break
        if first:
            self.float_logp = logps
        self.evaluations += 1
        seen = sum(len(c) for c in correct)
        out = Outcome(torch.cat(correct), float(torch.cat(losses).sum()) / seen,
                      float(torch.cat(kls).sum()) / seen if kls else 0.0, tied)
        if store:
            for k, hs in inputs.items():
                self.cache[k] = hs
            self._set_base_corrections(corrected)
        elif keep_inputs and inputs:
            self._keep_pending(config, inputs, out, corrected)
        return out

    def _set_base_corrections(self, corrected):
        if corrected is not None:
            self.base_corr = corrected[0]
            for k, h in corrected[1].items():
                self.calib_cache[k] = h

    def _bytes(self, inputs: dict) -> int:
        """Bytes of a candidate's inputs to these segments (the sizes ``keep`` was chosen by)."""
        return sum(self._sizes[k] for k in inputs)

    def _fits(self, inputs: dict) -> bool:
        return self._bytes(inputs) <= self.pending_bytes

    def _keep_pending(self, config: dict, inputs: dict, out: Outcome, corrected=None):
        self._pending[config_key(config)] = (inputs, out, self._bytes(inputs), corrected)
        while sum(p[2] for p in self._pending.values()) > self.pending_bytes:
            self._pending.popitem(last=False)    # the oldest candidate goes first

    def set_base(self, config, outcome: Outcome | None = None):
        """Make `config` the base: recompute the cached activations behind its first change, or take them
        from its evaluation as a candidate (``promote``). `outcome`, if known, saves that pass when nothing
        is cached."""
        config = self.full(config)
        start = self._first_changed_segment(self.base, config)
        pending = self._pending.pop(config_key(config), None)
        if start < len(self.segments):
            if pending is not None:
                inputs, self.base_outcome, _, corrected = pending
                for k, hs in inputs.items():
                    self.cache[k] = hs
                self._set_base_corrections(corrected)
                self.promoted += 1
            elif any(self.keep):
                self.base_outcome = self._run(config, start, store=True)
            else:
                self.base_outcome = outcome if outcome is not None else self._run(config, 0, store=False)
        self._pending.clear()     # computed behind the old base: not valid for another base's candidates
        self.base = config

    def evaluate(self, config, stop=None) -> Outcome:
        """`config` on the images; `stop(credits of the images so far)`, if given, may end it after a batch (the
        outcome then covers fewer than ``n`` images: a sequential test, as the search's early stop uses)."""
        config = self.full(config)
        start = self._first_changed_segment(self.base, config)
        if start == len(self.segments):
            return self.base_outcome
        return self._run(config, start if any(self.keep) else 0, store=False, stop=stop)

    def correct(self, config) -> float:
        return self.evaluate(config).n_correct

    def accuracy(self, config) -> float:
        return self.evaluate(config).accuracy

