"""Choosing the Gumbel temperature schedule on a toy pruning task (CPU, about a minute).

Each episode is a video of S shots (4 frames each, M tokens of dimension D) whose tokens point along a
random unit "topic" per shot, plus noise. The query tokens are a fixed, unknown rotation of the topic of
one target shot, so the untrained (identity) query MLP cannot find the target: the MLP has to learn the
inverse rotation, and its only signal is the straight-through gradient of the pruning gates. Loss: minus
the gated number of kept target-shot frames (a stand-in for "the answer is in that shot"). We train the
pruner's MLP alone (Adam) with the schedule tau(step) = max(tau_min, tau_start * exp(-rate * step)) for
several rates, and report the inference accuracy (target shot kept by the deterministic selection) on
held-out episodes.

    python benchmarks/eval_gumbel_schedule.py [--steps 1500] [--rates 0 3e-4 1e-3 3e-3 1e-2]
"""
from __future__ import annotations

import argparse
import math
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from swift_sophia.model.pruning import FramePruner, GumbelTemperature  # noqa: E402


def episode(g, rot, d, m, shots, noise=0.6):
    topics = F.normalize(torch.randn(shots, d, generator=g), dim=-1)
    tokens = noise * torch.randn(shots * 4, m, d, generator=g) / math.sqrt(d)
    feats = topics.repeat_interleave(4, 0)[:, None, :] + tokens
    target = int(torch.randint(0, shots, (1,), generator=g))
    q = (topics[target] @ rot)[None].repeat(3, 1) + 0.3 * torch.randn(3, d, generator=g) / math.sqrt(d)
    return feats, q, target


def run(rate, args, seed=0):
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    d, m, s = args.dim, 8, args.shots
    rot = torch.linalg.qr(torch.randn(d, d, generator=torch.Generator().manual_seed(123)))[0]
    shots = [(4 * i, 4 * i + 4) for i in range(s)]
    p = FramePruner(d, tau_start=1.0, tau_min=0.1, anneal_rate=rate)
    opt = torch.optim.Adam(p.query_mlp.parameters(), lr=args.lr)
    val = [episode(torch.Generator().manual_seed(10_000 + i), rot, d, m, s) for i in range(200)]

    def accuracy():
        p.eval()
        hit = 0
        with torch.no_grad():
            for f, q, t in val:
                hit += t in p.select(f, shots, q, alpha=args.alpha, beta=0).kept_shots.tolist()
        p.train()
        return hit / len(val)

    curve = []
    p.train()
    for step in range(args.steps):
        f, q, t = episode(g, rot, d, m, s)
        tau = p.temperature()
        sel = p.select(f, shots, q, alpha=args.alpha, beta=0, tau=tau, generator=g)
        target = sel.shot_of_frame[sel.keep] == t
        loss = -(sel.gate * target.float()).sum() / 4
        opt.zero_grad()
        if loss.requires_grad:
            loss.backward()
            opt.step()
        if (step + 1) % (args.steps // 5) == 0:
            curve.append(accuracy())
    return curve, p.gumbel.value()


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument('--steps', type=int, default=1500)
    ap.add_argument('--rates', type=float, nargs='+', default=[0.0, 3e-4, 1e-3, 3e-3, 1e-2])
    ap.add_argument('--seeds', type=int, default=2)
    ap.add_argument('--dim', type=int, default=32)
    ap.add_argument('--shots', type=int, default=8)
    ap.add_argument('--alpha', type=float, default=75.0, help='keep 2 of 8 shots')
    ap.add_argument('--lr', type=float, default=1e-2)
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    chance = (args.shots - round(args.alpha * args.shots / 100)) / args.shots
    print(f'\n## Gumbel schedule on the toy task ({args.steps} steps, D={args.dim}, {args.shots} shots, '
          f'alpha={args.alpha:g} %, chance {chance:.2f}; mean of {args.seeds} seeds)\n')
    marks = [f'step {(i + 1) * args.steps // 5}' for i in range(5)]
    print('| anneal rate | tau at the end | ' + ' | '.join(f'accuracy {m}' for m in marks) + ' | time |')
    print('|---' * (3 + len(marks)) + '|')
    for rate in args.rates:
        t0 = time.time()
        curves = []
        for seed in range(args.seeds):
            c, tau_end = run(rate, args, seed)
            curves.append(c)
        mean = [sum(c[i] for c in curves) / len(curves) for i in range(len(curves[0]))]
        print(f'| {rate:g} | {GumbelTemperature.schedule(args.steps, 1.0, 0.1, rate):.2f} | '
              + ' | '.join(f'{a:.2f}' for a in mean) + f' | {time.time() - t0:.0f}s |', flush=True)


if __name__ == '__main__':
    main()
