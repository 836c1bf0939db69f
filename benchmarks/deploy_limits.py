"""`swift deploy` at and past its limits: a request over REQUEST_MAX_FRAMES, requests that run out of memory
(plain, streamed, and batched with a short one while another runs), short requests between them. Prints a table
request -> HTTP status, seconds, message, whether each is what the server should answer (short: 200, over the
limit: 400, too large: 503, or 200 if it fitted after all), whether the server survived, and the server's
out-of-memory log lines (on CUDA: memory allocated / reserved after freeing).

    python benchmarks/deploy_limits.py                  # CPU, sophia-tiny with a wide decoder MLP, ~2 min

    sophia build-random --shape internvl2.5-8b /tmp/sophia-8b --device cuda        # GPU, the 8B shape
    python benchmarks/deploy_limits.py --model /tmp/sophia-8b --short-frames 128 --oom-frames 4000 \\
        --max-frames 4050 --timeout 300                                                 # ~4 min on an H200

Every frame of each generated video is taken (VIDEO_SEGMENTS=100000 on the server), so a video of F frames is a
request of F frames. On a GPU the --oom-frames video should not fit (at the 8B shape, all frames kept, 2,048
frames took 98.7 GiB of an H200 beyond the weights and 4,096 did not fit; docs/benchmarks.md; 4,000 frames are
1.02M tokens, within the shape's 2^20 positions); two of them batched together do not fit in any case. On a CPU
nothing runs out of memory by itself: the server's address space is capped (RLIMIT_AS, like `ulimit -v`)
--cpu-headroom-mb above what it holds after the first requests, so that the large request's allocation really
fails; the default checkpoint is sophia-tiny with a decoder MLP 32,768 wide, so that this allocation is in the
model (hundreds of MB for a prompt of a few thousand tokens), as on a GPU, and far above the cap.
"""
from __future__ import annotations

import argparse
import os
import re
import resource
import shutil
import sys
import tempfile
import threading
import time

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
sys.path.insert(0, os.path.join(REPO, "tests"))  # deploy_process: `swift deploy` as a subprocess (test support)

from deploy_process import DeployProcess  # noqa: E402
from swift_sophia.ms_swift.plugin_path import plugin_path  # noqa: E402
from swift_sophia.video.synthetic_clips import write_mp4  # noqa: E402

QUESTION = {"type": "text", "text": "What color is the background?"}
SHORT, OVER, TOO_LARGE = (200,), (400,), (503, 200)  # the statuses each request may get


def make_video(folder: str, frames: int, size: int) -> str:
    """A generated clip of `frames` frames, `size` pixels square; one written earlier in `folder` is reused."""
    path = os.path.join(folder, f"clip-{frames}f-{size}px.mp4")
    if os.path.exists(path):
        return path
    pixels = np.zeros((frames, size, size, 3), np.uint8)
    pixels[..., 0] = (np.arange(frames) * 7 % 256)[:, None, None]
    pixels[..., 1] = np.linspace(0, 255, size, dtype=np.uint8)[None, None, :]
    write_mp4(path, pixels, fps=25)
    return path


def vm_size(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        return int(re.search(r"VmSize:\s+(\d+) kB", f.read()).group(1)) << 10


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", help="checkpoint to serve (default: sophia-tiny with a 32,768-wide decoder MLP, "
                                   "built in the work folder)")
    p.add_argument("--short-frames", type=int, default=16)
    p.add_argument("--oom-frames", type=int, default=600, help="frames of the request that does not fit")
    p.add_argument("--max-frames", type=int, default=1000, help="the server's REQUEST_MAX_FRAMES; the over-limit "
                                                                 "request has one frame more")
    p.add_argument("--video-size", type=int, default=64, help="side of the generated videos in pixels (the "
                                                               "template decodes to the model's input size)")
    p.add_argument("--cpu-headroom-mb", type=int, default=300, help="CPU only: address space the server may take "
                                                                    "beyond what it holds when the cap is set")
    p.add_argument("--timeout", type=float, default=600, help="seconds for the server to start, and per request")
    p.add_argument("--env", action="append", default=[], metavar="KEY=VALUE", help="more server environment")
    p.add_argument("--deploy-arg", action="append", default=[], help="more `swift deploy` arguments")
    p.add_argument("--keep", help="folder for the videos and the server log (default: a temporary one); videos "
                                  "already there are reused")
    args = p.parse_args()

    import openai
    import torch

    on_gpu = torch.cuda.is_available()
    work = args.keep or tempfile.mkdtemp(prefix="deploy-limits-")
    os.makedirs(work, exist_ok=True)
    model = args.model
    if model is None:
        from swift_sophia.tools.tiny import build_tiny

        model = build_tiny(os.path.join(work, "sophia-tiny-wide"), text_overrides={"intermediate_size": 32768})
    frames = {"short": args.short_frames, "over": args.max_frames + 1, "oom": args.oom_frames}
    videos = {name: make_video(work, n, args.video_size) for name, n in frames.items()}

    env = dict(os.environ, VIDEO_SEGMENTS="100000", REQUEST_MAX_FRAMES=str(args.max_frames), PYTHONUNBUFFERED="1",
               HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    if not on_gpu:
        env["MALLOC_ARENA_MAX"] = "2"  # glibc's per-thread arenas count as address space (see --cpu-headroom-mb)
    env.update(kv.split("=", 1) for kv in args.env)
    log_path = os.path.join(work, "deploy.log")
    swift = shutil.which("swift", path=os.path.dirname(sys.executable))
    swift = [swift] if swift else [sys.executable, "-m", "swift.cli.main"]  # ms-swift installed without scripts
    cmd = [*swift, "deploy", "--model", model, "--model_type", "sophia", "--external_plugins", plugin_path(),
           "--infer_backend", "transformers", "--served_model_name", "sophia", "--max_new_tokens", "4",
           "--max_batch_size", "2", "--torch_dtype", "float32" if not on_gpu else "bfloat16", *args.deploy_arg]
    deploy = DeployProcess(cmd, log_path, env=env)
    print(" ".join(deploy.cmd), f"\nlog: {log_path}", flush=True)
    client = openai.OpenAI(base_url=deploy.url + "/v1", api_key="none", max_retries=0, timeout=args.timeout)
    rows = []

    def ask(label, video, expected, stream=False):
        start = time.time()
        try:
            reply = client.chat.completions.create(
                model="sophia", max_tokens=4, temperature=0, stream=stream,
                messages=[{"role": "user", "content": [{"type": "video", "video": videos[video]}, QUESTION]}])
            text = "".join(c.choices[0].delta.content or "" for c in reply if c.choices) if stream else \
                reply.choices[0].message.content
            status, message = 200, f"answer: {text!r}"
        except openai.APIStatusError as exc:
            body = exc.body if isinstance(exc.body, dict) else {}
            status, message = exc.status_code, str(body.get("message", exc.body))
        except openai.APIError as exc:  # no HTTP answer at all (timeout, connection closed)
            status, message = type(exc).__name__, str(exc)
        rows.append((label, frames[video], status, time.time() - start, expected, message))

    try:
        try:
            deploy.wait_until_serving(args.timeout, poll_s=2)
        except RuntimeError as exc:
            raise SystemExit(f"the server did not come up: {exc}")
        ask("short (warm-up)", "short", SHORT)
        ask("short", "short", SHORT)
        if not on_gpu and args.cpu_headroom_mb > 0:
            pid = deploy.server_pid
            limit = vm_size(pid) + (args.cpu_headroom_mb << 20)
            resource.prlimit(pid, resource.RLIMIT_AS, (limit, resource.prlimit(pid, resource.RLIMIT_AS)[1]))
            print(f"CPU: server address space capped at {limit / 2 ** 30:.2f} GiB "
                  f"({args.cpu_headroom_mb} MB above its size)", flush=True)
        ask("over REQUEST_MAX_FRAMES", "over", OVER)
        ask("short", "short", SHORT)
        ask("too large", "oom", TOO_LARGE)
        ask("short", "short", SHORT)
        ask("too large, streamed", "oom", TOO_LARGE, stream=True)
        ask("short", "short", SHORT)
        # while one large request runs, a second one and a short one queue up and are batched together
        threads = [threading.Thread(target=ask, args=("too large (in flight 1)", "oom", TOO_LARGE))]
        threads[0].start()
        time.sleep(1.0)
        threads += [threading.Thread(target=ask, args=(label, video, codes)) for label, video, codes in
                    (("too large (in flight 2)", "oom", TOO_LARGE), ("short (in flight 3)", "short", SHORT))]
        for t in threads[1:]:
            t.start()
        for t in threads:
            t.join()
        ask("short (after)", "short", SHORT)
        alive = deploy.proc.poll() is None
    finally:
        deploy.stop(grace_s=60)

    device = torch.cuda.get_device_name() if on_gpu else "CPU"
    print(f"\n{model} on {device}: REQUEST_MAX_FRAMES={args.max_frames}\n")
    print("| request | frames | status | seconds | expected | message |")
    print("|---|---|---|---|---|---|")
    ok = alive
    for label, n, status, seconds, expected, message in rows:
        ok &= status in expected
        mark = "yes" if status in expected else f"NO ({' or '.join(map(str, expected))})"
        print(f"| {label} | {n} | {status} | {seconds:.1f} | {mark} | {message[:160].replace('|', '/')} |")
    print(f"\nserver alive after every request: {'yes' if alive else 'NO'}")
    lines = [line.strip() for line in open(log_path) if "[sophia]" in line and "out of memory" in line]
    print("server log on out-of-memory:\n" + ("\n".join(f"  {line[:300]}" for line in lines) or "  (none: nothing "
                                                "ran out of memory; try more --oom-frames)"))
    print("\nall as expected" if ok else "\nNOT as expected (see the table)")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
