"""Shot-adaptive frame pruning (docs/pruning.md).

:class:`FramePruner` takes the projected features of the F sampled frames of one video, its shots (from
:func:`swift_sophia.video.shots.sampled_shots`) and the embeddings of the query text, and returns which frames
the LLM gets (:class:`FrameSelection`).

Rules (the points the paper leaves open are fixed here):

* Token similarity: ``sim(f_n, f_n') = mean_{m, m'} cos(f_n[m], f_n'[m'])``. Because the mean of a cosine
  matrix is the dot product of the means of the L2-normalised rows, ``sim(f_n, f_n') = g_n . g_n'`` with
  ``g_n = mean_m normalize(f_n[m])``; the pruner computes ``g`` (frame-chunked) instead of ``M x M``
  matrices, with the same result (tested against the explicit matrices) and O(F D) memory.
* Inter-shot (query-guided): representative of shot ``[b_i, b_{i+1})`` is frame
  ``(b_i + b_{i+1} - 1) // 2``. The query tokens go through the learnable MLP; the score is the pooled
  ``M x N_T`` cosine matrix between the representative's tokens and the mapped query tokens. Pooling
  ``'mean'`` (default; equals ``g_rep . mean_t normalize(q_t)``) or ``'max'`` (the best single
  token pair; computed from the explicit matrices, chunked by shot).
* Counts: ``drop = floor(p * n / 100 + 0.5)`` (round half up) of the ``n`` candidates, capped at ``n - 1``
  (at least one shot, and at least one frame per kept shot, stay). ``p = 0`` drops nothing.
* Intra-shot (redundancy): in every kept shot with ``n >= 2`` frames, ``score(k) = mean_{k' != k} sim(k, k')``;
  the ``drop`` highest scores go. Ties: the later frame goes first. A one-frame shot keeps its frame.
* Frame budget (``max_frames`` K, config ``prune_max_frames``): applied after alpha and beta, when more than K
  frames are left. The kept shots are taken in order of their query score (highest first; ties: the earlier
  shot) until they hold at least K frames; the rest of the shots go. Then the most redundant frames of the taken
  shots go (highest intra-shot score first, ties: the later frame), never a shot's last frame, until exactly K
  remain. Without a query the budget keeps K frames evenly spaced over the remaining ones
  (``candidates[floor((i + 1/2) T / K)]``). In training the shot order comes from the same Gumbel-perturbed
  logits as alpha's top-k, and the gates carry the same straight-through gradient.
* No query (``None`` or zero tokens): no inter-shot pruning, every shot is kept (intra-shot pruning still
  runs). ``alpha = beta = 0`` returns every frame with a gate of exactly 1 and no gradient path.
* Training (``self.training`` and ``tau`` given): Gumbel top-k with a straight-through estimator. With
  ``logits = logit_scale * score / tau + Gumbel noise`` (cosine scores live in [-1, 1]; ``logit_scale``
  = 10 by default), the kept shots are the top ``S - drop`` logits (the same top-k structure as
  inference: a sample without replacement from ``softmax(logit_scale * score / tau)``), and
  a kept shot's ``gate = 1 + soft - soft.detach()`` with ``soft`` the softmax of the kept shots' logits:
  exactly 1.0 for every kept frame, while its gradient flows into the shot scores and through them into the
  query MLP (and the frame features). The model gives the gates the gradient of the attention values of
  the kept frames' tokens (``value_gates.py``): a shot's gradient is how much the loss wants the sequence to
  read from it; the softmax over the kept shots makes the gates share that reading, so a loss that wants more
  of every kept shot alike moves no score (docs/pruning.md measures both choices).
  Annealing ``tau`` both sharpens the relaxation and shrinks the exploration noise relative to
  the score gaps, so training converges to the inference selection (with the noise scaled by ``1 / tau``
  as in ``F.gumbel_softmax``, the hard sample would not depend on ``tau`` at all and, on cosine scores,
  would stay close to uniformly random). Intra-shot selection has no parameters and stays deterministic.
  Inference (eval mode, or ``tau=None``): deterministic top-k, gates are plain ones.

The query MLP is ``Linear(D, D) -> GELU -> Linear(D, D)`` used residually, ``q + MLP(q)``, with the last
layer zero-initialised: the mapping is exactly the identity at initialisation in any dtype (an untrained
pruner compares visual tokens with the raw text embeddings, which live in the same space after the
projector).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

Shot = Tuple[int, int]

DEFAULT_TAU_START = 1.0
DEFAULT_TAU_MIN = 0.1
DEFAULT_ANNEAL_RATE = 1e-3
DEFAULT_LOGIT_SCALE = 10.0


def drop_count(percent: float, n: int) -> int:
    """How many of ``n`` candidates ``percent`` % drops: round half up, capped at ``n - 1``, >= 0."""
    if n <= 1 or percent <= 0:
        return 0
    k = int(math.floor(float(percent) * n / 100.0 + 0.5 + 1e-9))
    return max(0, min(n - 1, k))


def representative_frame(shot: Shot) -> int:
    a, b = shot
    return (a + b - 1) // 2


def _check_shots(shots: Optional[Sequence[Shot]], num_frames: int) -> List[Shot]:
    if not shots:
        return [(0, num_frames)] if num_frames > 0 else []
    shots = [(int(a), int(b)) for a, b in shots]
    if shots[0][0] != 0 or shots[-1][1] != num_frames or any(a >= b for a, b in shots) \
            or any(shots[i][1] != shots[i + 1][0] for i in range(len(shots) - 1)):
        raise ValueError(f'shots {shots} do not tile 0..{num_frames} with non-empty ranges')
    return shots


@dataclass
class FrameSelection:
    """The outcome of :meth:`FramePruner.select` for one video of F frames and S shots."""
    keep: torch.LongTensor  # sorted indices of the kept frames
    gate: torch.Tensor  # [len(keep)], value 1.0; carries the straight-through gradient in training
    shots: List[Shot]  # the shots used
    shot_scores: torch.Tensor  # [S] inter-shot scores (NaN when there is no query)
    kept_shots: torch.LongTensor  # sorted indices of the kept shots
    representatives: torch.LongTensor  # [S] representative frame of every shot
    frame_scores: torch.Tensor  # [F] intra-shot redundancy (NaN for frames of one-frame shots)
    intra_dropped: torch.LongTensor  # frames of kept shots dropped by intra-shot pruning
    shot_of_frame: torch.LongTensor  # [F]
    alpha: float = 0.0
    beta: float = 0.0
    tau: Optional[float] = None
    pooling: str = 'mean'
    query_used: bool = False
    stochastic: bool = False  # Gumbel noise was used (training)
    max_frames: Optional[int] = None  # the frame budget, when one was set
    extra: dict = field(default_factory=dict)

    @property
    def num_frames(self) -> int:
        return int(self.shot_of_frame.numel())

    @property
    def dropped_shots(self) -> torch.LongTensor:
        mask = torch.ones(len(self.shots), dtype=torch.bool)
        mask[self.kept_shots.cpu()] = False
        return torch.nonzero(mask).flatten()

    @property
    def keep_mask(self) -> torch.BoolTensor:
        mask = torch.zeros(self.num_frames, dtype=torch.bool)
        mask[self.keep.cpu()] = True
        return mask

    def summary(self) -> str:
        return (f'{len(self.keep)}/{self.num_frames} frames kept; shots kept {self.kept_shots.tolist()} of '
                f'{len(self.shots)}; intra-shot dropped {self.intra_dropped.tolist()}')


class GumbelTemperature(nn.Module):
    """``tau(step) = max(tau_min, tau_start * exp(-anneal_rate * step))``.

    ``step`` is a persistent buffer (saved in the checkpoint with the model, so a resumed run continues the
    schedule). :meth:`forward` / :meth:`value` read the current value; :meth:`advance` counts one step.
    """

    def __init__(self, tau_start: float = DEFAULT_TAU_START, tau_min: float = DEFAULT_TAU_MIN,
                 anneal_rate: float = DEFAULT_ANNEAL_RATE):
        super().__init__()
        self.tau_start = float(tau_start)
        self.tau_min = float(tau_min)
        self.anneal_rate = float(anneal_rate)
        self.register_buffer('step', torch.zeros((), dtype=torch.long), persistent=True)

    def extra_repr(self) -> str:
        return f'tau_start={self.tau_start}, tau_min={self.tau_min}, anneal_rate={self.anneal_rate}'

    @staticmethod
    def schedule(step: int, tau_start: float, tau_min: float, anneal_rate: float) -> float:
        return max(float(tau_min), float(tau_start) * math.exp(-float(anneal_rate) * int(step)))

    def value(self, step: Optional[int] = None) -> float:
        s = int(self.step) if step is None else int(step)
        return self.schedule(s, self.tau_start, self.tau_min, self.anneal_rate)

    def forward(self) -> float:
        return self.value()

    @torch.no_grad()
    def advance(self, n: int = 1) -> None:
        self.step += int(n)

    @torch.no_grad()
    def set_step(self, step: int) -> None:
        self.step.fill_(int(step))

    def configure(self, tau_start: Optional[float] = None, tau_min: Optional[float] = None,
                  anneal_rate: Optional[float] = None) -> None:
        if tau_start is not None:
            self.tau_start = float(tau_start)
        if tau_min is not None:
            self.tau_min = float(tau_min)
        if anneal_rate is not None:
            self.anneal_rate = float(anneal_rate)


class QueryLinear(nn.Linear):
    """A layer of the pruner's query MLP: an ``nn.Linear`` of its own type, so that a transformers model can tell the
    pruner's weights by their module's type (``SophiaPreTrainedModel._init_weights``: transformers initialises the
    weights a checkpoint lacks through the modules that own them, these layers and the Gumbel schedule, never through
    the pruner itself)."""


class FramePruner(nn.Module):
    """Learnable query MLP + the inter-/intra-shot selection rules (module docstring)."""

    def __init__(self, hidden_size: int, *, pooling: str = 'mean', residual: bool = True,
                 tau_start: float = DEFAULT_TAU_START, tau_min: float = DEFAULT_TAU_MIN,
                 anneal_rate: float = DEFAULT_ANNEAL_RATE, logit_scale: float = DEFAULT_LOGIT_SCALE,
                 chunk_elements: int = 1 << 24):
        super().__init__()
        self.logit_scale = float(logit_scale)
        if pooling not in ('mean', 'max'):
            raise ValueError(f"pooling must be 'mean' or 'max', got {pooling!r}")
        self.hidden_size = int(hidden_size)
        self.pooling = pooling
        self.residual = residual
        self.chunk_elements = int(chunk_elements)
        self.query_mlp = nn.Sequential(QueryLinear(hidden_size, hidden_size), nn.GELU(),
                                       QueryLinear(hidden_size, hidden_size))
        self.gumbel = GumbelTemperature(tau_start, tau_min, anneal_rate)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """The documented initialisation. A transformers model's ``_init_weights`` re-initialises every
        ``nn.Linear`` it visits (children before parents): it calls this for the layers of :class:`QueryLinear`."""
        first, last = self.query_mlp[0], self.query_mlp[2]
        if self.residual:
            nn.init.kaiming_uniform_(first.weight, a=math.sqrt(5))
            nn.init.zeros_(first.bias)
            nn.init.zeros_(last.weight)
            nn.init.zeros_(last.bias)
        else:  # plain MLP, near identity: GELU(x + c) - c ~ x for |x| << c (fp32 only)
            c = 6.0
            with torch.no_grad():
                first.weight.copy_(torch.eye(self.hidden_size))
                first.bias.fill_(c)
                last.weight.copy_(torch.eye(self.hidden_size))
                last.bias.fill_(-c)

    # ---------------------------------------------------------------------------------- helpers for the model
    def map_query(self, query_embeds: torch.Tensor) -> torch.Tensor:
        """The mapped query tokens ``[N_T, D]`` (``q + MLP(q)`` when residual)."""
        q = query_embeds.to(self.query_mlp[0].weight.dtype)
        out = self.query_mlp(q)
        return q + out if self.residual else out

    def temperature(self, config: Any = None, *, advance: Optional[bool] = None) -> float:
        """Current Gumbel temperature. Reads ``gumbel_tau_start``, ``gumbel_tau_min`` and
        ``gumbel_anneal_rate`` from ``config`` when it has them. In training (``advance`` defaults to
        ``self.training``) every call counts one step of the schedule: the model calls it once per pruned
        video, so the step counts pruned videos seen in training."""
        if config is not None:
            self.gumbel.configure(getattr(config, 'gumbel_tau_start', None),
                                  getattr(config, 'gumbel_tau_min', None),
                                  getattr(config, 'gumbel_anneal_rate', None))
            if getattr(config, 'gumbel_logit_scale', None) is not None:
                self.logit_scale = float(config.gumbel_logit_scale)
        tau = self.gumbel.value()
        if self.training if advance is None else advance:
            self.gumbel.advance()
        return tau

    def touch(self) -> torch.Tensor:
        """A scalar that depends on every parameter (for ZeRO-3 batches that prune nothing); multiply by 0."""
        return sum(p.sum() for p in self.parameters()) * 0.0

    def frame_descriptors(self, frame_feats: torch.Tensor) -> torch.Tensor:
        """``g_n = mean_m normalize(f_n[m])`` in fp32, ``[F, D]``, computed a few frames at a time."""
        f, m, d = frame_feats.shape
        step = max(1, self.chunk_elements // max(1, m * d))
        parts = [F.normalize(frame_feats[i:i + step].float(), dim=-1).mean(dim=1) for i in range(0, f, step)]
        return torch.cat(parts) if parts else frame_feats.new_zeros((0, d), dtype=torch.float32)

    def shot_scores(self, frame_feats: torch.Tensor, g: torch.Tensor, reps: torch.Tensor,
                    query: torch.Tensor, query_mapped: bool = False) -> torch.Tensor:
        """Inter-shot scores ``[S]`` (pooled ``M x N_T`` cosine matrices of representative frames); ``query``
        goes through the query MLP unless ``query_mapped``."""
        qn = F.normalize((query if query_mapped else self.map_query(query)).float(), dim=-1)  # [N_T, D]
        if self.pooling == 'mean':
            return g[reps] @ qn.mean(dim=0)
        m, d = frame_feats.shape[1:]
        step = max(1, self.chunk_elements // max(1, m * max(d, qn.shape[0])))
        out = []
        for i in range(0, len(reps), step):
            rows = frame_feats[reps[i:i + step].to(frame_feats.device)].to(qn.device)
            tok = F.normalize(rows.float(), dim=-1)  # [s, M, D]
            out.append((tok @ qn.T).amax(dim=(1, 2)))
        return torch.cat(out)

    # ------------------------------------------------------------------------------------------------ select
    def select(self, frame_feats: torch.Tensor, shots: Optional[Sequence[Shot]],
               query_embeds: Optional[torch.Tensor], *, alpha: float, beta: float,
               tau: Optional[float] = None, generator: Optional[torch.Generator] = None,
               query_mapped: bool = False, max_frames: Optional[int] = None,
               descriptors: Optional[torch.Tensor] = None) -> FrameSelection:
        """Choose the frames of one video. ``frame_feats`` ``[F, M, D]``, ``shots`` tiling ``0..F`` (None or
        empty: one shot), ``query_embeds`` ``[N_T, D]`` or None (already through the query MLP when
        ``query_mapped``: the model maps all videos' queries in one call), ``alpha``/``beta`` in percent, ``tau``
        the Gumbel temperature (used only in training mode), ``max_frames`` the frame budget (None or 0: none).
        ``descriptors``: the frames' ``g`` (:meth:`frame_descriptors`), already computed where the features are
        (e.g. on the GPU while ``frame_feats`` waits in host memory); the selection is then on their device."""
        if frame_feats.ndim != 3:
            raise ValueError(f'frame_feats must be [F, M, D], got {tuple(frame_feats.shape)}')
        nf = frame_feats.shape[0]
        device = frame_feats.device if descriptors is None else descriptors.device
        shots = _check_shots(shots, nf)
        ns = len(shots)
        shot_of_frame = torch.empty(nf, dtype=torch.long)
        for i, (a, b) in enumerate(shots):
            shot_of_frame[a:b] = i
        reps = torch.tensor([representative_frame(s) for s in shots], dtype=torch.long)
        alpha = float(alpha)
        beta = float(beta)
        has_query = query_embeds is not None and query_embeds.ndim == 2 and query_embeds.shape[0] > 0
        empty = torch.zeros(0, dtype=torch.long, device=device)
        budget = int(max_frames) if max_frames else None

        if nf == 0:
            return FrameSelection(empty, frame_feats.new_ones(0), shots, torch.zeros(0), empty, reps, torch.zeros(0),
                                  empty, shot_of_frame.to(device), alpha, beta, tau, self.pooling, has_query)

        if alpha <= 0 and beta <= 0 and (budget is None or nf <= budget):  # the unpruned model: no gradient path
            with torch.no_grad():
                g = self.frame_descriptors(frame_feats) if descriptors is None else descriptors
                sc = self.shot_scores(frame_feats, g, reps.to(device), query_embeds, query_mapped) if has_query \
                    else torch.full((ns,), float('nan'))
                fs = self._intra_scores(g, shots)
            ones = torch.ones(nf, dtype=frame_feats.dtype, device=device)
            return FrameSelection(torch.arange(nf, device=device), ones, shots, sc.detach().cpu(),
                                  torch.arange(ns, device=device), reps, fs.cpu(), empty,
                                  shot_of_frame.to(device), alpha, beta, tau, self.pooling, has_query)

        stochastic = self.training and tau is not None
        n_drop = drop_count(alpha, ns) if has_query else 0
        ranked = has_query and (n_drop > 0 or budget is not None)  # some shot may go by its query score
        need_grad = stochastic and ranked and torch.is_grad_enabled()
        with torch.set_grad_enabled(need_grad):
            g = self.frame_descriptors(frame_feats) if descriptors is None else descriptors
            scores = self.shot_scores(frame_feats, g, reps.to(device), query_embeds, query_mapped) if has_query \
                else torch.full((ns,), float('nan'), device=device)
        with torch.no_grad():
            frame_scores = self._intra_scores(g.detach(), shots)

        # the shots' order: their scores, or in training the Gumbel-perturbed logits
        rank = logits = None
        if ranked and stochastic:
            u = torch.rand(scores.shape, device=generator.device if generator is not None else 'cpu',
                           generator=generator, dtype=torch.float32).to(scores.device)
            gumbel = -torch.log((-torch.log(u.clamp(1e-10, 1.0 - 1e-7))).clamp_min(1e-10))
            logits = scores.float() * (self.logit_scale / max(float(tau), 1e-6)) + gumbel
            rank = logits.detach().cpu()
        elif ranked:
            rank = scores.detach().float().cpu()

        # inter-shot selection
        kept_shots = torch.arange(ns) if n_drop == 0 else _top_k_stable(rank, ns - n_drop)

        # intra-shot selection, in the kept shots
        keep_mask = torch.zeros(nf, dtype=torch.bool)
        dropped = []
        fs_cpu = frame_scores.cpu()
        for s in kept_shots.tolist():
            a, b = shots[s]
            k = drop_count(beta, b - a)
            keep_mask[a:b] = True
            if k:
                order = sorted(range(a, b), key=lambda n: (-float(fs_cpu[n]), -n))  # most redundant, later first
                for n in order[:k]:
                    keep_mask[n] = False
                    dropped.append(n)

        # the frame budget
        by_budget = budget is not None and int(keep_mask.sum()) > budget
        if by_budget and rank is None:
            keep_mask = _evenly_spaced(keep_mask, budget)
            kept_shots = torch.unique(shot_of_frame[keep_mask])
        elif by_budget:
            keep_mask, kept_shots, thinned = _fit_budget(keep_mask, shots, kept_shots, rank, fs_cpu, budget)
            dropped += thinned
        keep = torch.nonzero(keep_mask).flatten()
        if logits is not None and (n_drop > 0 or by_budget):  # straight-through gates of the kept shots
            kept = kept_shots.to(logits.device)
            soft = torch.softmax(logits[kept], dim=0)  # over the kept shots: how the sequence's reading is shared
            shot_gate = torch.zeros_like(logits).index_put((kept,), 1.0 + (soft - soft.detach()))
            gate = shot_gate[shot_of_frame[keep].to(shot_gate.device)]  # float32: it only carries a gradient
        else:
            gate = frame_feats.new_ones(len(keep))
        return FrameSelection(
            keep=keep.to(device), gate=gate.to(device), shots=shots, shot_scores=scores.detach().float().cpu(),
            kept_shots=kept_shots.to(device), representatives=reps, frame_scores=fs_cpu,
            intra_dropped=torch.tensor(sorted(dropped), dtype=torch.long, device=device),
            shot_of_frame=shot_of_frame.to(device), alpha=alpha, beta=beta, tau=tau if stochastic else None,
            pooling=self.pooling, query_used=has_query, stochastic=logits is not None and (n_drop > 0 or by_budget),
            max_frames=budget)

    @staticmethod
    def _intra_scores(g: torch.Tensor, shots: Sequence[Shot]) -> torch.Tensor:
        """``score(n) = mean_{n' != n in shot} g_n . g_n'``; NaN in one-frame shots. ``[F]`` fp32."""
        out = torch.full((g.shape[0],), float('nan'), dtype=torch.float32, device=g.device)
        for a, b in shots:
            n = b - a
            if n < 2:
                continue
            gs = g[a:b].float()
            sim = gs @ gs.T
            out[a:b] = (sim.sum(dim=1) - sim.diagonal()) / (n - 1)
        return out


def _fit_budget(keep_mask: torch.BoolTensor, shots: Sequence[Shot], kept_shots: torch.LongTensor, rank: torch.Tensor,
                frame_scores: torch.Tensor, budget: int):
    """The budget rule with a query (module docstring): whole shots by rank until they hold ``budget`` frames,
    then the most redundant frames of those shots, never a shot's last. Returns (mask, kept shots, thinned)."""
    taken, total = [], 0
    for s in sorted(kept_shots.tolist(), key=lambda i: (-float(torch.nan_to_num(rank[i], nan=-float('inf'))), i)):
        if total >= budget:
            break
        taken.append(s)
        total += int(keep_mask[shots[s][0]:shots[s][1]].sum())
    mask = torch.zeros_like(keep_mask)
    left = {}
    for s in taken:
        a, b = shots[s]
        mask[a:b] = keep_mask[a:b]
        left[s] = int(keep_mask[a:b].sum())
    thinned = []
    frames = [n for s in taken for n in range(*shots[s]) if mask[n]]
    shot_of = {n: s for s in taken for n in range(*shots[s])}
    for n in sorted(frames, key=lambda n: (-float(torch.nan_to_num(frame_scores[n], nan=-float('inf'))), -n)):
        if total <= budget:
            break
        if left[shot_of[n]] > 1:
            mask[n] = False
            left[shot_of[n]] -= 1
            total -= 1
            thinned.append(n)
    return mask, torch.tensor(sorted(taken), dtype=torch.long), thinned


def _evenly_spaced(keep_mask: torch.BoolTensor, budget: int) -> torch.BoolTensor:
    """``budget`` of the kept frames, evenly spaced over them (the budget's rule without a query)."""
    candidates = torch.nonzero(keep_mask).flatten()
    picks = candidates[((torch.arange(budget) * 2 + 1) * candidates.numel()) // (2 * budget)]
    mask = torch.zeros_like(keep_mask)
    mask[picks] = True
    return mask


def _top_k_stable(values: torch.Tensor, k: int) -> torch.LongTensor:
    """Indices of the ``k`` largest values, sorted; ties go to the lower index; NaN counts as lowest."""
    v = torch.nan_to_num(values.float(), nan=-float('inf'))
    order = sorted(range(len(v)), key=lambda i: (-float(v[i]), i))
    return torch.tensor(sorted(order[:k]), dtype=torch.long)


def explicit_similarity(fa: torch.Tensor, fb: torch.Tensor) -> torch.Tensor:
    """``mean`` of the ``M x M`` token cosine matrix between two frames (reference for tests)."""
    return (F.normalize(fa.float(), dim=-1) @ F.normalize(fb.float(), dim=-1).T).mean()
