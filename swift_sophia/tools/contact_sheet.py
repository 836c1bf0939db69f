"""A contact sheet of shot-adaptive frame pruning for one video and one query (like the paper's Figure 5).

    sophia contact-sheet --video clip.mp4 --query "What does the man hold?" --out sheet.png \
        [--model CHECKPOINT] [--alpha 30] [--beta 30] [--num-frames 32]

One row per shot (wrapping when a shot has many frames): the shot's range, its inter-shot score and whether
it was kept; every sampled frame with its frame number, its intra-shot redundancy score, a marker on the
shot's representative (middle) frame; dropped shots greyed out and crossed, frames dropped by intra-shot
pruning framed in orange and struck through. A legend and the settings are printed on top.

With ``--model`` the features are the checkpoint's (``video_frame_features``: vision tower + projector), the
query goes through its embedding table and trained pruner. Without a model there is no text encoder: the
features are raw pixels (8x8 patches of a 64x64 copy of each frame, 64 tokens of 192 values) and a fresh
:class:`~swift_sophia.model.pruning.FramePruner` runs without a query, so the sheet shows the shots and the
intra-shot redundancy pruning, and no inter-shot pruning.
"""
from __future__ import annotations

import argparse
import math
import os
import sys
import textwrap
from typing import Optional, Sequence, Tuple

import numpy as np
import torch

from ..model.pruning import FramePruner, FrameSelection

Shot = Tuple[int, int]

KEEP = (46, 160, 67)
INTRA_DROP = (245, 140, 20)
SHOT_DROP = (200, 30, 30)
REP = (30, 110, 220)
INK = (25, 25, 25)
MUTED = (110, 110, 110)
BG = (250, 250, 248)


def _font(size: int):
    from PIL import ImageFont
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1
        return ImageFont.load_default()


def _fmt(x: float, digits: int = 3) -> str:
    return 'n/a' if x is None or (isinstance(x, float) and math.isnan(x)) else f'{x:+.{digits}f}'


def _thumb(frame: np.ndarray, w: int, h: int):
    from PIL import Image
    img = Image.fromarray(np.ascontiguousarray(frame.astype(np.uint8)), 'RGB')
    return img.resize((w, h), Image.BILINEAR)


def render_contact_sheet(frames: np.ndarray, shots: Sequence[Shot], selection: FrameSelection, query: str,
                         out_path: Optional[str], *, thumb_width: int = 128, columns: int = 8,
                         frame_numbers: Optional[Sequence[int]] = None, title: Optional[str] = None):
    """Draw the sheet and save it to ``out_path`` (PNG) if given; returns the ``PIL.Image`` (its
    ``info['frame_boxes']`` maps every frame to its thumbnail box).

    ``frames`` uint8 ``[F, H, W, 3]`` (the sampled frames), ``shots`` the shots over them, ``selection`` the
    pruner's output for them; ``frame_numbers`` (native frame indices) are printed when given.
    """
    from PIL import Image, ImageDraw, ImageOps
    frames = np.asarray(frames)
    if frames.ndim != 4 or frames.shape[-1] != 3:
        raise ValueError(f'frames must be uint8 [F, H, W, 3], got {frames.shape}')
    nf = frames.shape[0]
    shots = [(int(a), int(b)) for a, b in shots] if shots else [(0, nf)]
    h0, w0 = frames.shape[1:3]
    tw = int(thumb_width)
    th = max(8, int(round(tw * h0 / max(1, w0))))
    f_small, f_text, f_big = _font(11), _font(13), _font(18)
    pad, gap, label_w, caption_h = 14, 6, 190, 30
    keep_set = set(selection.keep.tolist())
    kept_shots = set(selection.kept_shots.tolist())
    intra = set(selection.intra_dropped.tolist())
    reps = selection.representatives.tolist()
    shot_scores = selection.shot_scores.tolist()
    frame_scores = selection.frame_scores.tolist()

    # header
    qlines = textwrap.wrap(f'Query: {query!r}' if query else 'Query: (none: no inter-shot pruning)', 110) or ['']
    settings = (f'F = {nf} frames, {len(shots)} shots | alpha = {selection.alpha:g} %, beta = {selection.beta:g} % '
                f'| kept {len(keep_set)} frames in {len(kept_shots)} shots | pooling = {selection.pooling}')
    header_h = pad + 24 + 18 * len(qlines) + 18 + 8
    legend_h = 44
    rows_per_shot = [max(1, math.ceil((b - a) / columns)) for a, b in shots]
    row_h = th + caption_h + gap
    width = pad * 2 + label_w + columns * (tw + gap)
    height = header_h + legend_h + sum(r * row_h + gap for r in rows_per_shot) + pad
    sheet = Image.new('RGB', (width, height), BG)
    boxes = {}
    d = ImageDraw.Draw(sheet)
    y = pad
    d.text((pad, y), title or 'Sophia shot-adaptive frame pruning', fill=INK, font=f_big)
    y += 24
    for line in qlines:
        d.text((pad, y), line, fill=INK, font=f_text)
        y += 18
    d.text((pad, y), settings, fill=MUTED, font=f_small)
    y = header_h

    # legend
    lx = pad
    items = [(KEEP, 'kept frame'), (INTRA_DROP, 'dropped: redundant in its shot (intra-shot)'),
             (SHOT_DROP, 'shot dropped: low query score (inter-shot)'), (REP, 'R = shot representative')]
    for colour, text in items:
        d.rectangle([lx, y + 4, lx + 16, y + 18], outline=colour, width=3)
        d.text((lx + 22, y + 4), text, fill=INK, font=f_small)
        lx += 30 + int(d.textlength(text, font=f_small))
    d.text((pad, y + 22), 'r = intra-shot redundancy (mean token similarity to the other frames of the shot; the '
           'highest go first); score = pooled query-token cosine of the representative', fill=MUTED, font=f_small)
    y += legend_h

    for s, (a, b) in enumerate(shots):
        kept_shot = s in kept_shots
        top = y
        colour = INK if kept_shot else SHOT_DROP
        d.text((pad, top + 2), f'Shot {s + 1}  [{a}, {b})', fill=colour, font=f_text)
        d.text((pad, top + 20), f'score {_fmt(shot_scores[s]) if s < len(shot_scores) else "n/a"}', fill=colour,
               font=f_small)
        d.text((pad, top + 36), 'kept' if kept_shot else 'DROPPED (inter-shot)', fill=KEEP if kept_shot else SHOT_DROP,
               font=f_small)
        d.text((pad, top + 52), f'{b - a} frame{"s" if b - a != 1 else ""}', fill=MUTED, font=f_small)
        for k, n in enumerate(range(a, b)):
            r, c = divmod(k, columns)
            x0 = pad + label_w + c * (tw + gap)
            y0 = top + r * row_h
            img = _thumb(frames[n], tw, th)
            if not kept_shot:
                img = ImageOps.grayscale(img).convert('RGB')
                img = Image.blend(img, Image.new('RGB', img.size, (255, 255, 255)), 0.45)
            sheet.paste(img, (x0, y0))
            boxes[n] = (x0, y0, x0 + tw, y0 + th)
            if not kept_shot:
                d.line([x0, y0, x0 + tw - 1, y0 + th - 1], fill=SHOT_DROP, width=3)
                d.line([x0, y0 + th - 1, x0 + tw - 1, y0], fill=SHOT_DROP, width=3)
                d.rectangle([x0, y0, x0 + tw - 1, y0 + th - 1], outline=SHOT_DROP, width=2)
            elif n in intra:
                d.line([x0, y0 + th - 1, x0 + tw - 1, y0], fill=INTRA_DROP, width=3)
                d.rectangle([x0, y0, x0 + tw - 1, y0 + th - 1], outline=INTRA_DROP, width=4)
            elif n in keep_set:
                d.rectangle([x0, y0, x0 + tw - 1, y0 + th - 1], outline=KEEP, width=4)
            if s < len(reps) and reps[s] == n:
                d.rectangle([x0 + 4, y0 + 4, x0 + 20, y0 + 20], fill=REP)
                d.text((x0 + 8, y0 + 5), 'R', fill=(255, 255, 255), font=f_small)
            num = f'#{n}' + (f' (frame {frame_numbers[n]})' if frame_numbers is not None else '')
            d.text((x0, y0 + th + 2), num, fill=INK, font=f_small)
            fsc = frame_scores[n] if n < len(frame_scores) else float('nan')
            status = 'kept' if n in keep_set else ('dropped' if n in intra or not kept_shot else '')
            d.text((x0, y0 + th + 15), f'r {_fmt(fsc, 4)} {status}', fill=MUTED, font=f_small)
        y += rows_per_shot[s] * row_h + gap
        d.line([pad, y - gap // 2, width - pad, y - gap // 2], fill=(220, 220, 220), width=1)
    if out_path:
        os.makedirs(os.path.dirname(os.path.abspath(out_path)), exist_ok=True)
        sheet.save(out_path, format='PNG')
    sheet.info['frame_boxes'] = boxes  # thumbnail box (x0, y0, x1, y1) of every frame, for tests and tools
    return sheet


def pixel_features(frames: np.ndarray, size: int = 64, patch: int = 8) -> torch.Tensor:
    """Model-free frame features: a ``size x size`` copy cut into ``patch x patch`` patches, one token per
    patch (its centred RGB values): ``[F, (size / patch) ** 2, 3 * patch ** 2]``."""
    x = torch.from_numpy(np.ascontiguousarray(frames)).permute(0, 3, 1, 2).float()
    x = torch.nn.functional.interpolate(x, size=(size, size), mode='area')
    x = (x - 127.5) / 127.5
    f, c, _, _ = x.shape
    g = size // patch
    tokens = x.reshape(f, c, g, patch, g, patch).permute(0, 2, 4, 1, 3, 5).reshape(f, g * g, c * patch * patch)
    return tokens


def _model_features(model_dir: str, frames: np.ndarray, query: str, device: str):
    from transformers import AutoTokenizer

    from ..model.modeling_sophia import SophiaForConditionalGeneration
    from ..video.frames import frames_to_pixel_values
    model = SophiaForConditionalGeneration.from_pretrained(model_dir).to(device).eval()
    tok = AutoTokenizer.from_pretrained(model_dir)
    inner = getattr(model, 'model', model)
    size = model.config.vision_config.image_size
    size = size[0] if isinstance(size, (list, tuple)) else int(size)
    pruner = getattr(model, 'pruner', None) or getattr(inner, 'pruner')
    vff = getattr(model, 'video_frame_features', None) or getattr(inner, 'video_frame_features')
    dtype = next(model.parameters()).dtype
    with torch.no_grad():
        pv = frames_to_pixel_values(frames, size).to(device=device, dtype=dtype)
        feats = vff(pv)
        ids = tok.encode(query, add_special_tokens=False) if query and query.strip() else []
        q = model.get_input_embeddings()(torch.tensor(ids, device=device)) if ids else None
    alpha = getattr(model.config, 'prune_alpha', None)
    beta = getattr(model.config, 'prune_beta', None)
    return feats, q, pruner, alpha, beta


def main(argv: Optional[Sequence[str]] = None) -> int:
    ap = argparse.ArgumentParser(prog='sophia contact-sheet', description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument('--video', required=True)
    ap.add_argument('--query', default='')
    ap.add_argument('--out', required=True, help='PNG file to write')
    ap.add_argument('--model', default=None, help='a Sophia checkpoint folder (features, embeddings, pruner)')
    ap.add_argument('--alpha', type=float, default=None,
                    help="%% of shots dropped (default: the checkpoint's prune_alpha if non-zero, else 30)")
    ap.add_argument('--beta', type=float, default=None,
                    help="%% of frames dropped per kept shot (default: the checkpoint's prune_beta if non-zero, "
                         "else 30)")
    ap.add_argument('--num-frames', type=int, default=None,
                    help='frames to sample (default: as the template, VIDEO_SEGMENTS / FPS, else 32)')
    ap.add_argument('--device', default='cpu')
    ap.add_argument('--no-cache', action='store_true', help='do not read or write the shot cache')
    ap.add_argument('--thumb-width', type=int, default=128)
    ap.add_argument('--columns', type=int, default=8)
    args = ap.parse_args(argv)

    from ..video.frames import FrameSampling, VideoError, load_video
    from ..video.shots import sampled_shots
    try:
        clip = load_video(args.video, args.num_frames or FrameSampling.from_env(32))
        shots = sampled_shots(clip.source, clip.indices, total_frames=clip.total_frames, cache=not args.no_cache)
    except (VideoError, FileNotFoundError, RuntimeError, ValueError) as e:
        print(f'error: {e}', file=sys.stderr)
        return 2
    frames = clip.frames
    if args.model:
        feats, q, pruner, alpha, beta = _model_features(args.model, frames, args.query, args.device)
        feats = feats.float()
        q = q.float() if q is not None else None
        pruner = pruner.float()
    else:
        feats = pixel_features(frames)
        q = None
        pruner = FramePruner(feats.shape[-1])
        alpha = beta = None
    # default: the checkpoint's setting when it prunes, else the paper's 30 / 30
    alpha = args.alpha if args.alpha is not None else (float(alpha) if alpha else 30.0)
    beta = args.beta if args.beta is not None else (float(beta) if beta else 30.0)
    pruner.eval()
    with torch.no_grad():
        sel = pruner.select(feats, shots, q, alpha=alpha, beta=beta, tau=None)
    title = f'Sophia pruning: {os.path.basename(args.video)}' + ('' if args.model else ' (no model: pixel features)')
    render_contact_sheet(frames, shots, sel, args.query, args.out, thumb_width=args.thumb_width,
                         columns=args.columns, frame_numbers=clip.indices, title=title)
    print(f'{args.out}: {sel.summary()}')
    return 0
