"""FramePruner: the selection rules of docs/pruning.md, the Gumbel straight-through path, the schedule."""
import math
import random
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from swift_sophia.model.pruning import (
    FramePruner,
    GumbelTemperature,
    drop_count,
    explicit_similarity,
    representative_frame,
)


def random_shots(rng, nf):
    cuts = sorted(rng.sample(range(1, nf), rng.randint(0, min(6, nf - 1)))) if nf > 1 else []
    edges = [0] + cuts + [nf]
    return list(zip(edges[:-1], edges[1:]))


def test_drop_count_rounding():
    # round half up, at least one candidate stays, 0 % drops nothing
    assert [drop_count(30, n) for n in range(1, 11)] == [0, 1, 1, 1, 2, 2, 2, 2, 3, 3]
    assert drop_count(0, 10) == 0 and drop_count(100, 5) == 4 and drop_count(100, 1) == 0
    assert drop_count(10, 4) == 0 and drop_count(50, 2) == 1 and drop_count(49, 2) == 1 and drop_count(24, 2) == 0


def test_representative_is_middle_frame():
    assert [representative_frame(s) for s in [(0, 1), (0, 2), (0, 3), (4, 8), (4, 9)]] == [0, 0, 1, 5, 6]


def test_similarities_equal_explicit_token_matrices():
    torch.manual_seed(0)
    f = torch.randn(6, 5, 8)
    q = torch.randn(3, 8)
    shots = [(0, 4), (4, 6)]
    p = FramePruner(8).eval()
    sel = p.select(f, shots, q, alpha=0, beta=50)
    for a, b in shots:
        for n in range(a, b):
            ref = sum(explicit_similarity(f[n], f[k]) for k in range(a, b) if k != n) / (b - a - 1)
            assert torch.allclose(sel.frame_scores[n], ref, atol=1e-6)
    qm = p.map_query(q)
    assert torch.equal(qm, q)  # residual MLP, zero-initialised last layer: exactly the identity at init
    for s, (a, b) in enumerate(shots):
        r = (a + b - 1) // 2
        cos = F.normalize(f[r], dim=-1) @ F.normalize(qm, dim=-1).T  # M x N_T
        assert torch.allclose(sel.shot_scores[s], cos.mean(), atol=1e-6)
    pmax = FramePruner(8, pooling='max').eval()
    sel = pmax.select(f, shots, q, alpha=50, beta=0)
    for s, (a, b) in enumerate(shots):
        r = (a + b - 1) // 2
        cos = F.normalize(f[r], dim=-1) @ F.normalize(q, dim=-1).T
        assert torch.allclose(sel.shot_scores[s], cos.max(), atol=1e-6)


def test_chunked_descriptors_match_unchunked():
    torch.manual_seed(1)
    f = torch.randn(9, 7, 16)
    q = torch.randn(4, 16)
    big = FramePruner(16, chunk_elements=1 << 30).eval()
    small = FramePruner(16, chunk_elements=7 * 16).eval()  # one frame per chunk
    small.load_state_dict(big.state_dict())
    for pool in ('mean', 'max'):
        big.pooling = small.pooling = pool
        a = big.select(f, [(0, 3), (3, 9)], q, alpha=50, beta=30)
        b = small.select(f, [(0, 3), (3, 9)], q, alpha=50, beta=30)
        assert torch.allclose(a.shot_scores, b.shot_scores, atol=1e-6)
        assert torch.allclose(a.frame_scores, b.frame_scores, atol=1e-6, equal_nan=True)
        assert torch.equal(a.keep, b.keep)


@pytest.mark.parametrize('training', [False, True])
def test_alpha_beta_zero_is_the_unpruned_model(training):
    torch.manual_seed(2)
    f = torch.randn(10, 4, 8, requires_grad=True)
    p = FramePruner(8).train(training)
    sel = p.select(f, [(0, 3), (3, 10)], torch.randn(5, 8), alpha=0, beta=0, tau=0.5)
    assert sel.keep.tolist() == list(range(10))
    assert torch.equal(sel.gate, torch.ones(10)) and not sel.gate.requires_grad
    out = f[sel.keep] * sel.gate[:, None, None]
    assert torch.equal(out, f)
    assert sel.kept_shots.tolist() == [0, 1] and sel.intra_dropped.numel() == 0


def test_rules_hold_for_random_inputs():
    rng = random.Random(0)
    torch.manual_seed(3)
    p = FramePruner(12).eval()
    for trial in range(60):
        nf = rng.randint(1, 40)
        shots = random_shots(rng, nf)
        alpha, beta = rng.choice([0, 10, 30, 50, 90, 100]), rng.choice([0, 10, 30, 50, 90, 100])
        q = torch.randn(rng.randint(1, 6), 12) if rng.random() < 0.8 else None
        sel = p.select(torch.randn(nf, 3, 12), shots, q, alpha=alpha, beta=beta)
        keep = sel.keep.tolist()
        assert keep == sorted(set(keep)) and len(sel.gate) == len(keep) and torch.all(sel.gate == 1)
        ns = len(shots)
        n_kept_shots = ns - (drop_count(alpha, ns) if q is not None else 0)
        assert len(sel.kept_shots) == n_kept_shots >= 1
        for s in sel.kept_shots.tolist():
            a, b = shots[s]
            inside = [n for n in keep if a <= n < b]
            assert len(inside) == (b - a) - drop_count(beta, b - a) >= 1
        kept_shot_frames = {n for s in sel.kept_shots.tolist() for n in range(*shots[s])}
        assert set(keep) <= kept_shot_frames
        assert set(keep) | set(sel.intra_dropped.tolist()) == kept_shot_frames
        for a, b in shots:
            if b - a == 1:
                assert math.isnan(sel.frame_scores[a])


def test_extreme_pruning_keeps_one_shot_and_one_frame_per_shot():
    torch.manual_seed(4)
    p = FramePruner(8).eval()
    shots = [(0, 5), (5, 6), (6, 12)]
    sel = p.select(torch.randn(12, 4, 8), shots, torch.randn(3, 8), alpha=100, beta=100)
    assert len(sel.kept_shots) == 1 and len(sel.keep) == 1
    sel = p.select(torch.randn(12, 4, 8), shots, torch.randn(3, 8), alpha=0, beta=100)
    assert len(sel.keep) == 3 and sorted(sel.shot_of_frame[sel.keep].tolist()) == [0, 1, 2]


def query_world(d=16, m=4):
    """Three shots; only the representative frame of shot 1 matches the query direction."""
    torch.manual_seed(5)
    basis = torch.linalg.qr(torch.randn(d, d))[0]
    qdir, other = basis[0], basis[1:]
    f = torch.stack([other[i % (d - 1)] + 0.05 * torch.randn(m, d) for i in range(9)])  # [9, m, d]
    shots = [(0, 3), (3, 6), (6, 9)]
    f[representative_frame(shots[1])] = qdir + 0.05 * torch.randn(m, d)
    return f, shots, qdir[None].repeat(2, 1)


def test_inter_shot_keeps_query_relevant_shot_via_representative():
    f, shots, q = query_world()
    p = FramePruner(16).eval()
    sel = p.select(f, shots, q, alpha=67, beta=0)  # drop round(2.01) = 2 of 3 shots
    assert sel.kept_shots.tolist() == [1]
    assert sel.keep.tolist() == [3, 4, 5]
    assert sel.representatives.tolist() == [1, 4, 7]
    assert sel.shot_scores.argmax().item() == 1
    assert sel.dropped_shots.tolist() == [0, 2]


def test_intra_shot_drops_the_most_redundant_frames():
    torch.manual_seed(6)
    base = torch.randn(4, 8)
    distinct = torch.randn(4, 8)
    # frames 0, 1, 3 are near copies; frame 2 is different -> 0, 1, 3 are the most redundant
    f = torch.stack([base + 0.01 * torch.randn(4, 8), base + 0.01 * torch.randn(4, 8), distinct,
                     base + 0.01 * torch.randn(4, 8)])
    p = FramePruner(8).eval()
    sel = p.select(f, [(0, 4)], None, alpha=0, beta=50)  # drop 2 of 4
    assert 2 in sel.keep.tolist() and len(sel.keep) == 2
    assert sel.frame_scores[2] < sel.frame_scores[[0, 1, 3]].min()
    # identical frames: ties, the later frames go first
    same = base[None].repeat(5, 1, 1)
    sel = p.select(same, [(0, 5)], None, alpha=0, beta=40)
    assert sel.keep.tolist() == [0, 1, 2] and sel.intra_dropped.tolist() == [3, 4]


@pytest.mark.parametrize('query', [None, torch.zeros(0, 8)])
def test_no_query_text_keeps_every_shot(query):
    torch.manual_seed(7)
    p = FramePruner(8).eval()
    sel = p.select(torch.randn(10, 4, 8), [(0, 2), (2, 5), (5, 10)], query, alpha=90, beta=30)
    assert sel.kept_shots.tolist() == [0, 1, 2] and not sel.query_used
    assert torch.isnan(sel.shot_scores).all()
    assert len(sel.keep) == 10 - drop_count(30, 2) - drop_count(30, 3) - drop_count(30, 5)


def test_single_frame_and_empty_inputs():
    p = FramePruner(8).eval()
    sel = p.select(torch.randn(1, 4, 8), [(0, 1)], torch.randn(2, 8), alpha=50, beta=50)
    assert sel.keep.tolist() == [0] and sel.gate.tolist() == [1.0]
    sel = p.select(torch.randn(6, 4, 8), None, torch.randn(2, 8), alpha=50, beta=50)  # no shots: one shot
    assert sel.shots == [(0, 6)] and len(sel.keep) == 3
    sel = p.select(torch.randn(0, 4, 8), [], None, alpha=30, beta=30)
    assert sel.keep.numel() == 0
    with pytest.raises(ValueError):
        p.select(torch.randn(6, 4, 8), [(0, 2), (3, 6)], None, alpha=30, beta=30)
    with pytest.raises(ValueError):
        p.select(torch.randn(6, 8), [(0, 6)], None, alpha=30, beta=30)


def test_bf16_features():
    torch.manual_seed(8)
    p = FramePruner(8).to(torch.bfloat16).eval()
    bf = torch.bfloat16
    sel = p.select(torch.randn(8, 4, 8, dtype=bf), [(0, 4), (4, 8)], torch.randn(3, 8, dtype=bf), alpha=50, beta=30)
    assert sel.gate.dtype == torch.bfloat16 and torch.all(sel.gate == 1)
    assert len(sel.kept_shots) == 1


def _loss(f, sel):
    return (f[sel.keep] * sel.gate[:, None, None]).pow(2).sum()


def test_gradient_reaches_query_mlp_in_training_only():
    f, shots, q = query_world()
    p = FramePruner(16)
    p.train()
    sel = p.select(f, shots, q, alpha=34, beta=30, tau=0.5)
    assert sel.stochastic and torch.equal(sel.gate, torch.ones(len(sel.keep)))  # value exactly 1.0
    _loss(f, sel).backward()
    last = p.query_mlp[2]
    assert last.weight.grad is not None and last.weight.grad.abs().sum() > 0
    assert last.bias.grad.abs().sum() > 0
    # once the last layer is non-zero the first layer receives gradient as well
    p.zero_grad()
    with torch.no_grad():
        last.weight.normal_(0, 0.1)
    _loss(f, p.select(f, shots, q, alpha=34, beta=30, tau=0.5)).backward()
    assert p.query_mlp[0].weight.grad.abs().sum() > 0
    # inference: deterministic, no gradient path
    p.zero_grad(set_to_none=True)
    p.eval()
    sel = p.select(f, shots, q, alpha=34, beta=30, tau=0.5)
    assert not sel.gate.requires_grad and not sel.stochastic
    assert all(x.grad is None for x in p.parameters())
    # training mode without a temperature: deterministic as well
    p.train()
    sel = p.select(f, shots, q, alpha=34, beta=30, tau=None)
    assert not sel.gate.requires_grad


def test_gates_share_the_reading_among_the_kept_shots():
    """The straight-through gates relax how the sequence's reading is shared among the kept shots: a loss that
    asks for more of every kept shot alike (as a model without the shot it needs asks for more of what it has)
    moves no score, and a loss that asks for one kept shot raises its score above the other kept shots'."""
    f, shots, q = query_world()
    p = FramePruner(16)
    with torch.no_grad():
        p.query_mlp[2].weight.normal_(0, 0.1)
    p.train()
    torch.manual_seed(0)
    sel = p.select(f, shots, q, alpha=34, beta=0, tau=1.0)
    kept = sel.kept_shots.tolist()
    assert len(kept) == 2
    first = torch.stack([sel.gate[sel.shot_of_frame[sel.keep] == s][0] for s in kept])  # one gate per kept shot
    (-first.sum()).backward()
    assert all(x.grad is None or x.grad.abs().max() < 1e-7 for x in p.parameters())

    for favoured in kept:
        p.zero_grad(set_to_none=True)
        torch.manual_seed(0)
        sel = p.select(f, shots, q, alpha=34, beta=0, tau=1.0)
        gate = sel.gate[sel.shot_of_frame[sel.keep] == favoured][0]
        (-gate).backward()  # the loss falls as the favoured shot is read more
        with torch.no_grad():
            for x in p.parameters():
                x -= 0.1 * x.grad
        after = p.eval().select(f, shots, q, alpha=34, beta=0).shot_scores
        other = next(s for s in kept if s != favoured)
        assert after[favoured] - after[other] > sel.shot_scores[favoured] - sel.shot_scores[other]
        p.train()


def test_training_selection_structure_and_low_temperature_limit():
    f, shots, q = query_world()
    p = FramePruner(16)
    ref = p.eval().select(f, shots, q, alpha=34, beta=30)
    p.train()
    g = torch.Generator().manual_seed(0)
    counts = torch.zeros(3)
    for _ in range(50):
        sel = p.select(f, shots, q, alpha=34, beta=30, tau=1.0, generator=g)
        assert len(sel.kept_shots) == len(ref.kept_shots) == 2  # same top-k structure as inference
        counts[sel.kept_shots] += 1
    assert counts.min() < 50  # exploration at tau = 1 ...
    for _ in range(20):  # ... and the deterministic choice as tau -> 0 (score gaps >> tau * Gumbel noise)
        sel = p.select(f, shots, q, alpha=67, beta=30, tau=1e-4, generator=g)
        assert sel.kept_shots.tolist() == [1]


def test_gumbel_schedule_and_its_saved_step():
    t = GumbelTemperature(tau_start=1.0, tau_min=0.1, anneal_rate=1e-3)
    assert t.value() == 1.0
    t.advance(1000)
    assert math.isclose(t.value(), math.exp(-1.0))
    t.set_step(10 ** 6)
    assert t.value() == 0.1
    assert 'step' in t.state_dict() and int(t.state_dict()['step']) == 10 ** 6
    p = FramePruner(8)
    p.gumbel.set_step(123)
    q = FramePruner(8)
    q.load_state_dict(p.state_dict())
    assert int(q.gumbel.step) == 123
    cfg = SimpleNamespace(gumbel_tau_start=2.0, gumbel_tau_min=0.5, gumbel_anneal_rate=0.01)
    q.train()
    tau0 = q.temperature(cfg)
    assert math.isclose(tau0, max(0.5, 2.0 * math.exp(-0.01 * 123)))
    assert int(q.gumbel.step) == 124  # a training call counts one step
    q.eval()
    q.temperature(cfg)
    assert int(q.gumbel.step) == 124  # inference does not


def test_long_video_memory_stays_linear():
    # 128 frames x 256 tokens x 256 dims: F x F x M x M would be 1.1e9 floats; the pruner needs O(F D)
    torch.manual_seed(9)
    f = torch.randn(128, 256, 256)
    shots = [(i, i + 8) for i in range(0, 128, 8)]
    p = FramePruner(256).eval()
    sel = p.select(f, shots, torch.randn(12, 256), alpha=30, beta=30)
    assert len(sel.kept_shots) == 16 - drop_count(30, 16)
    assert len(sel.keep) == len(sel.kept_shots) * (8 - drop_count(30, 8))


def test_touch_depends_on_every_parameter():
    p = FramePruner(8)
    p.touch().backward()
    assert all(x.grad is not None for x in p.parameters())
