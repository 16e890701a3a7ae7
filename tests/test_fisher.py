"""quant/fisher.py: the Fisher estimate of each single-group change's KL to the float model; the evaluator's
early stop (quant.evaluation, quant.stats.EarlyStop); results that do not depend on the evaluation batch.

On the random ResNet-20 of tests/test_evaluation.py (64 images of 16x16): the estimate must rank candidates
as the measured KL does and match it where the perturbation is small (8 bits), where second order is exact
up to higher-order terms.
"""
import numpy as np
import pytest
import torch

from quant.correct import corrections, output_stats
from quant.fisher import fisher_kl, weight_corrections
from quant.fold import fold_bn
from quant.place import quantize_
from quant.stats import Budget, EarlyStop, paired_drop
from quant.widths import A, W
from test_evaluation import NORMALIZE, build_setup, identical, make_evaluator, random_data


def candidates(space, bits=(8, 4)):
    return [((W, n), b) for n in space.layers for b in bits] + [((A, t), b) for t in space.tensors for b in bits]


def ranks(x):
    return np.argsort(np.argsort(x))


@pytest.fixture(scope="module")
def measured():
    s = build_setup("B")
    ev = make_evaluator(s)
    cands = candidates(s["space"])
    return s, cands, {c: ev.evaluate(s["space"].full({c[0]: c[1]})).kl for c in cands}


def test_fisher_tracks_the_measured_kl(measured):
    """Spearman correlation with the measured KL above 0.95 over every weight layer and tensor at 8 and 4 bits;
    at 8 bits, where the perturbation is small, the median ratio estimate / measured is within 20% of 1."""
    s, cands, kl = measured
    f = fisher_kl(make_evaluator(s), cands, samples=8, seed=0)
    a, b = np.array([f[c] for c in cands]), np.array([kl[c] for c in cands])
    assert (a >= 0).all() and np.corrcoef(ranks(a), ranks(b))[0, 1] > 0.95
    eight = [i for i, c in enumerate(cands) if c[1] == 8 and b[i] > 0]
    assert 0.8 < float(np.median(a[eight] / b[eight])) < 1.2


def test_fisher_is_seeded_and_leaves_the_evaluator_as_it_was(measured):
    """Same seed, same estimates; another seed, other labels drawn and other estimates. Afterwards the evaluator
    evaluates exactly as a fresh one does (slots, weights and autograd flags restored), and the model's
    parameters require gradients as they did before."""
    s, cands, _ = measured
    ev = make_evaluator(s)
    flags = [p.requires_grad for p in ev.model.parameters()]
    some = cands[::7]
    one, again, other = (fisher_kl(ev, some, seed=k) for k in (0, 0, 1))
    assert one == again and one != other
    assert [p.requires_grad for p in ev.model.parameters()] == flags
    fresh = make_evaluator(s)
    for c in some:
        cfg = s["space"].full({c[0]: c[1]})
        assert identical(ev.evaluate(cfg), fresh.evaluate(cfg))
    with pytest.raises(ValueError, match="samples"):
        fisher_kl(ev, some, samples=0)


@pytest.mark.parametrize("mode", ("bias", "bn"))
def test_weight_corrections_are_the_ones_the_correction_fits(mode):
    """For one layer at 4 bits, everything else float, the correction the Fisher estimate applies is the one
    quant.correct fits for the placed model: its own layer's map (r, mu_q, mu_f) to float32 rounding."""
    s = build_setup("B")
    calib = random_data(seed=6, n=40)[0]
    ev = make_evaluator(s, correction=(mode, calib))
    layers = [c for c, _ in s["model"].conv_bn_pairs()]
    xc = NORMALIZE(calib)
    fstats = output_stats(fold_bn(s["model"]), layers, xc)
    picked = [layers[0], layers[7], layers[-1]]
    ours = weight_corrections(ev, [(n, 4) for n in picked] + [(picked[0], 32)])
    assert sorted(ours) == sorted((n, 4) for n in picked)
    for n in picked:
        qm = quantize_(fold_bn(s["model"]), s["space"].full({(W, n): 4}), s["ranges"], "generic", clip="maxabs")
        ref = corrections(qm, fstats, xc, mode)[n]
        for a, b in ((ours[n, 4].r, ref.r), (ours[n, 4].mu_q, ref.mu_q), (ours[n, 4].mu_f, ref.mu_f)):
            assert torch.allclose(a, b, rtol=1e-4, atol=1e-5), n
    assert weight_corrections(make_evaluator(s), [(picked[0], 4)]) == {}


def test_fisher_under_the_correction_tracks_the_corrected_kl():
    """With BN re-estimation on, the estimate of a weight layer's change is the corrected layer's: it ranks the
    candidates as the corrected measurement does (Spearman > 0.97, and closer than the uncorrected estimate's),
    and its median ratio to the corrected KL is within 25% of 1, where the uncorrected estimate's is about 2."""
    s = build_setup("B")
    calib = random_data(seed=6, n=40)[0]
    ev = make_evaluator(s, correction=("bn", calib))
    cands = [((W, n), b) for n in s["space"].layers for b in (8, 4)]
    kl = np.array([ev.evaluate(s["space"].full({c[0]: c[1]})).kl for c in cands])
    f = fisher_kl(ev, cands, samples=8, seed=0)
    plain = fisher_kl(make_evaluator(s), cands, samples=8, seed=0)
    a, p = np.array([f[c] for c in cands]), np.array([plain[c] for c in cands])
    rho, rho_plain = (np.corrcoef(ranks(v), ranks(kl))[0, 1] for v in (a, p))
    assert (a >= 0).all() and rho > 0.97 and rho > rho_plain
    assert 0.8 < float(np.median(a / kl)) < 1.25 and float(np.median(p / kl)) > 1.5


def test_float_candidates_have_no_entry_and_zero_work(measured):
    s, cands, _ = measured
    assert fisher_kl(make_evaluator(s), [((W, s["space"].layers[0]), 32)]) == {}


@pytest.mark.parametrize("batch", [8, 16, 64])
def test_outcomes_do_not_depend_on_the_batch_size(measured, batch):
    """Credits, loss and KL summed per image: the same bits at every batch size (the kernels give each image the
    same logits here)."""
    s, cands, _ = measured
    ref, ev = make_evaluator(s, batch_size=32), make_evaluator(s, batch_size=batch)
    for c in cands[::5]:
        cfg = s["space"].full({c[0]: c[1]})
        assert identical(ev.evaluate(cfg), ref.evaluate(cfg))


def test_early_stop_ends_an_evaluation_after_a_batch(measured):
    """A stop that fires after the second batch gives the first 32 images' credits, exactly those of the full
    evaluation; nothing of it is kept for promotion, and the next evaluations are unchanged. A stop that never
    fires changes nothing."""
    s, cands, _ = measured
    ev, ref = make_evaluator(s, pending_bytes=1 << 30), make_evaluator(s)
    cfg = s["space"].uniform(4, 4)
    seen = []
    out = ev.evaluate(cfg, stop=lambda c: seen.append(len(c)) or len(c) >= 32)
    full = ref.evaluate(cfg)
    assert seen == [16, 32] and out.n == 32 and torch.equal(out.correct, full.correct[:32])
    assert not ev._pending
    assert identical(ev.evaluate(cfg), full) and identical(ev.evaluate(cfg, stop=lambda c: False), full)


def test_early_stop_rule():
    """EarlyStop stops only past min_images and only when drop - z * SE exceeds the budget; what it stops never
    holds the budget at any margin."""
    n = 2000
    ref = torch.ones(n, dtype=torch.float64)
    rule = EarlyStop(max_drop=1.0, z=3.0, min_images=500)
    stop = rule.stopper(ref)
    bad = torch.ones(n, dtype=torch.float64)
    bad[::10] = 0.0                                   # 10 points down
    assert not stop(bad[:499]) and stop(bad[:500])
    near = torch.ones(n, dtype=torch.float64)
    near[::60] = 0.0                                  # 1.7 points down: over budget, not clearly at 500 images
    assert not stop(near[:500])
    pd = paired_drop(ref[:500], bad[:500])
    assert pd.drop - 3.0 * pd.se > 1.0
    for z in (0.0, 1.0, 2.5, 4.0):
        assert not Budget(1.0, z).holds(pd.drop, pd.se)
    assert not stop(ref[:1000])                       # no drop, no stop
