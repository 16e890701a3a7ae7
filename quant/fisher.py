"""The Fisher estimate of each single-group change's KL to the float model, from one backward pass.

Stage 2 measures a candidate (one weight layer, or one tensor, at one width; everything else float) by
running the network on it: one forward pass of the changed suffix per candidate. To second order the
divergence it measures has a closed form. For a perturbation delta of the float network's parameters or
activations,

    KL(p_float || p_perturbed) ~= 1/2 * E_x E_{y ~ p_float(.|x)} [ (grad log p(y|x) . delta(x))^2 ],

the Fisher information's quadratic form (Amari; the same expansion HAWQ-style methods take with the
Hessian). Here, per image and without any diagonal approximation:

* a tensor t at b bits: delta(x) = Q_b(t(x)) - t(x), the quantization error of the tensor where it is
  written, and the gradient is taken with respect to that tensor;
* a weight layer at b bits: delta(x) = f(x; w_b) - f(x; w), the change of the layer's output when its
  weights are quantized (w_b as evaluation quantizes them, learned levels included), and the gradient
  is taken with respect to that output. The layer must be linear in its weight (convolutions, linear
  layers), so the bias cancels.
* under a statistics correction (the evaluator's ``correction``, quant/correct.py), a weight layer that the
  correction maps back is perturbed by what it computes once corrected: delta(x) = c(f(x; w_b)) - f(x; w),
  with c the per-channel map y' = (y - mu_q) r + mu_f the evaluator would fit for that candidate alone, on
  the same calibration images, from the layer's float inputs (``weight_corrections``). Measured with the
  correction, the quantized weights' shift of each channel's mean (and spread) is removed, and an estimate
  that kept it would overstate a weight's cost against a tensor's. The corrections of the layers after it,
  which the measurement also refits, are not modelled, nor those behind a quantized tensor: the estimate
  stays first order in what it perturbs.

The label y is drawn from the float model's own prediction (the true Fisher, not the empirical one that
would use the dataset's labels), `samples` draws per image from a seeded generator, so the estimate is
deterministic. One forward pass and `samples` backward passes (to activations only) replace a forward
pass per candidate; each candidate then costs one elementwise quantization (tensors) or one layer's
forward (weights). It is an estimate: it ranks candidates, and the search still measures every
configuration it decides on.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.func import functional_call

from quant.correct import Correction, channel_stats
from quant.widths import A, FLOAT_BITS, W


class _Probe(torch.nn.Module):
    """Put into a tensor's Slot: records the tensor as it is written (and leaves it unchanged)."""

    def __init__(self, name, seen):
        super().__init__()
        self.name, self.seen = name, seen

    def forward(self, x):
        self.seen[self.name] = x
        return x.clone()      # a later in-place op (ReLU(inplace=True)) must not overwrite the recorded tensor


def fisher_kl(ev, candidates, samples: int = 1, seed: int = 0, progress=None) -> dict:
    """{(group, bits): the Fisher estimate of KL(float || that group at bits), nats per image} for every
    candidate, on `ev`'s images (a quant.evaluation.CachedEvaluator: its folded network, weights at each
    width, tensor quantizers and batches). `progress(batch)` is called after each batch."""
    if samples < 1:
        raise ValueError(f"samples must be >= 1, got {samples}")
    cands = [(g, b) for g, b in candidates if b != FLOAT_BITS]
    if not cands:
        return {}
    layers = sorted({g[1] for g, _ in cands if g[0] == W})
    tensors = sorted({g[1] for g, _ in cands if g[0] == A})
    pairs = [(n, b) for (k, n), b in cands if k == W]
    corr = weight_corrections(ev, pairs)
    # per weight pair: its correction where the evaluator corrects the layer, else the weights' change
    deltas_w = {(n, b): (None, corr[n, b]) if (n, b) in corr else (ev.weight(n, b) - ev.float_w[n], None)
                for n, b in pairs}
    total = {c: torch.zeros((), dtype=torch.float64) for c in cands}
    gen = torch.Generator(device=ev.x_u8.device).manual_seed(seed)
    seen, outs = {}, {}
    with ev.float_network() as net:
        hooks = [ev.layers[n].register_forward_hook(_record(n, outs)) for n in layers]
        params = [p for p in net.parameters() if p.requires_grad]
        for p in params:
            p.requires_grad_(False)               # gradients to activations only
        try:
            for t in tensors:
                ev.slots[t].quant = _Probe(t, seen)
            for b, s in enumerate(range(0, ev.n, ev.batch_size)):
                _batch(ev, ev.x_u8[s:s + ev.batch_size], cands, deltas_w, seen, outs, total, samples, gen)
                if progress is not None:
                    progress(b)
        finally:
            for h in hooks:
                h.remove()
            for t in tensors:
                ev.slots[t].quant = None             # float, as float_network() gave them
            for p in params:
                p.requires_grad_(True)
    return {c: 0.5 * float(v) / (ev.n * samples) for c, v in total.items()}


@torch.no_grad()
def weight_corrections(ev, pairs) -> dict[tuple[str, int], Correction]:
    """{(layer, bits): the correction the evaluator fits for that one layer at `bits`, everything else float}, for
    the pairs whose layer the evaluator corrects ({} without a correction): one float pass over its calibration
    images, each layer's output statistics at each width taken from its float input, as the correcting pass
    takes them (quant/correct.py)."""
    if getattr(ev, "correction", None) is None:
        return {}
    wanted = {}
    for n, b in pairs:
        if n in ev.corr_layers and b != FLOAT_BITS:
            wanted.setdefault(n, []).append(b)
    found, busy = {}, []

    def hook(name):
        def fn(mod, inputs, _):
            if busy:            # the layer's own calls below
                return
            busy.append(name)
            mu_f, sd_f = ev.float_stats[name]
            for b in wanted[name]:
                mu_q, sd_q = channel_stats(functional_call(mod, {"weight": ev.weight(name, b)}, inputs))
                found[name, b] = Correction(sd_f / sd_q if ev.correction == "bn" else torch.ones_like(mu_q), mu_q, mu_f)
            busy.clear()
        return fn
    with ev.float_network():
        handles = [ev.layers[n].register_forward_hook(hook(n)) for n in wanted]
        try:
            x = ev.calib
            for seg in ev.segments:
                x = seg.fn(x)
        finally:
            for handle in handles:
                handle.remove()
    return found


def _record(name, outs):
    """A forward hook that records a layer's input and output on the pass with gradients (not on the deltas'
    own no-gradient calls), passing a copy on, so that an in-place op after it leaves the recorded output alone."""
    def hook(module, inputs, output):
        if torch.is_grad_enabled():
            outs[name] = (inputs[0], output)
            return output.clone()
    return hook


def _batch(ev, x_u8, cands, deltas_w, seen, outs, total, samples, gen):
    seen.clear()
    outs.clear()
    with torch.enable_grad():
        h = ev.normalize(x_u8).requires_grad_(True)
        for seg in ev.segments:
            h = seg.fn(h)
        logp = F.log_softmax(h.float(), dim=1)
        wrt = {(A, t): v for t, v in seen.items()} | {(W, n): o for n, (_, o) in outs.items()}
        keys = list(wrt)
        for i in range(samples):
            y = torch.multinomial(logp.detach().exp(), 1, generator=gen).squeeze(1)
            grads = torch.autograd.grad(logp.gather(1, y[:, None]).sum(), [wrt[k] for k in keys],
                                        retain_graph=i < samples - 1, allow_unused=True)
            grad = dict(zip(keys, grads))
            with torch.no_grad():
                for (group, bits) in cands:
                    g = grad[group]
                    if g is None:          # the tensor does not reach the output: no change to the KL
                        continue
                    d = (g * _delta(ev, group, bits, deltas_w, seen, outs)).flatten(1).sum(1).double()
                    total[group, bits] += d.square().sum()


@torch.no_grad()
def _delta(ev, group, bits, deltas_w, seen, outs):
    kind, name = group
    if kind == A:
        t = seen[name].detach()
        return ev.tensor_quantizer(name, bits)(t) - t
    x, y = outs[name]
    layer = ev.layers[name]
    delta, c = deltas_w[name, bits]
    if c is not None:     # what the corrected layer computes, against the float output
        given = {"weight": c.weight(ev.weight(name, bits)), "bias": c.bias(getattr(layer, "bias", None))}
        return functional_call(layer, given, (x.detach(),)) - y.detach()
    given = {"weight": delta}
    if getattr(layer, "bias", None) is not None:
        given["bias"] = torch.zeros_like(layer.bias)
    return functional_call(layer, given, (x.detach(),))
