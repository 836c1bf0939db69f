"""`swift deploy` on bad requests, requests over the server's limits and out-of-memory errors: the real server, asked
with the official `openai` client.

One server for the module, on sophia-tiny with a decoder MLP 32,768 wide (`wide_model`): a prompt of a few thousand
tokens then needs a real allocation of hundreds of MB in the MLP, while a short request needs a few MB. The
out-of-memory test caps the server process's address space (RLIMIT_AS, as `ulimit -v` does) a little above what
it uses: the large request's allocation really fails, inside the model, as a GPU's does when a video does not fit.
It reads local files from the media folder only (SOPHIA_ALLOWED_MEDIA_PATH) and has small size limits; a second,
short-lived server listens on 0.0.0.0 with the defaults.
"""
import base64
import http.client
import http.server
import json
import os
import re
import resource
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from deploy_process import DeployProcess
from swift_cli import SWIFT, env
from swift_sophia.ms_swift.plugin_path import plugin_path

openai = pytest.importorskip("openai")

pytestmark = pytest.mark.slow

MAX_FRAMES, MAX_LENGTH = 1000, 3000  # the server's REQUEST_MAX_FRAMES and --max_length
MAX_REQUEST_MB, MAX_VIDEO_MB, MAX_FRAME_PIXELS = 2, 1, 64 * 64  # its SOPHIA_MAX_REQUEST_MB, ... limits
OOM_FRAMES = 600  # 600 frames x 4 tokens: one 592 MB tensor in the MLP, within both limits
HEADROOM = 300 << 20  # address space the server may take beyond what it holds when the limit is set
QUESTION = {"type": "text", "text": "What color is the background?"}


def _clip(path, frames, size=32):
    from swift_sophia.video.synthetic_clips import write_mp4

    pixels = np.zeros((frames, size, size, 3), np.uint8)
    pixels[..., 0] = (np.arange(frames) * 7 % 256)[:, None, None]
    write_mp4(str(path), pixels, fps=25)
    return str(path)


def _data_url(data):
    return "data:video/mp4;base64," + base64.b64encode(data).decode()


@pytest.fixture(scope="module")
def media(tmp_path_factory):
    """The media folder (the module server's SOPHIA_ALLOWED_MEDIA_PATH) and a video outside it."""
    d = tmp_path_factory.mktemp("media")
    (d / "empty.mp4").write_bytes(b"")
    (d / "garbage.mp4").write_text("not a video")
    (d / "big.bin").write_bytes(os.urandom(int(1.1 * MAX_VIDEO_MB * 2 ** 20)))  # over the limit of one video
    (d / "folder").mkdir()
    outside = Path(_clip(tmp_path_factory.mktemp("outside") / "outside.mp4", 16))
    (d / "link.mp4").symlink_to(outside)
    too_big = _data_url((d / "big.bin").read_bytes())
    return {"good": _clip(d / "good.mp4", 16), "other": _clip(d / "other.mp4", 12), "busy": _clip(d / "busy.mp4", 200),
            "over_frames": _clip(d / "over_frames.mp4", MAX_FRAMES + 100),
            "over_tokens": _clip(d / "over_tokens.mp4", MAX_LENGTH // 4 + 50),
            "oom": _clip(d / "oom.mp4", OOM_FRAMES), "large_frames": _clip(d / "large_frames.mp4", 4, size=96),
            "missing": str(d / "missing.mp4"), "empty": str(d / "empty.mp4"), "garbage": str(d / "garbage.mp4"),
            "dir": str(d), "folder": str(d / "folder"), "too_big": too_big, "too_big_chars": str(len(too_big)),
            "outside": str(outside), "outside_missing": str(outside.parent / "missing.mp4"),
            "link_outside": str(d / "link.mp4"), "dots_outside": str(d / ".." / outside.parent.name / outside.name)}


@pytest.fixture(scope="module")
def wide_model(tmp_path_factory):
    from swift_sophia.tools.tiny import build_tiny

    return build_tiny(str(tmp_path_factory.mktemp("sophia-wide")), text_overrides={"intermediate_size": 32768})


@pytest.fixture(scope="module")
def media_url(media):
    """http://127.0.0.1:PORT/ serving the media folder."""
    handler = lambda *a: http.server.SimpleHTTPRequestHandler(*a, directory=media["dir"])  # noqa: E731
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()


class Server:
    def __init__(self, deploy):
        self.deploy = deploy
        self.client = openai.OpenAI(base_url=deploy.url + "/v1", api_key="none", max_retries=0, timeout=60)

    @property
    def pid(self):
        return self.deploy.server_pid

    def log(self):
        return self.deploy.log()

    def ask(self, *content, messages=None, stream=False, **kwargs):
        """(HTTP status, the answer or the error's message); `content`: the parts of one user message."""
        messages = [{"role": "user", "content": list(content)}] if messages is None else messages
        try:
            reply = self.client.chat.completions.create(model="sophia", messages=messages, max_tokens=2,
                                                        temperature=0, stream=stream, **kwargs)
            text = "".join(c.choices[0].delta.content or "" for c in reply if c.choices) if stream else \
                reply.choices[0].message.content
            return 200, text
        except openai.APIStatusError as exc:
            body = exc.body if isinstance(exc.body, dict) else {}
            return exc.status_code, str(body.get("message", exc.body))

    def complete(self, prompt, videos):
        """/v1/completions with top-level videos: (HTTP status, the answer or the error's message)."""
        try:
            reply = self.client.completions.create(model="sophia", prompt=prompt, max_tokens=2, temperature=0,
                                                   extra_body={"videos": videos})
            return 200, reply.choices[0].text
        except openai.APIStatusError as exc:
            return exc.status_code, str((exc.body if isinstance(exc.body, dict) else {}).get("message", exc.body))

    def answers(self, video):
        status, text = self.ask({"type": "video", "video": video}, QUESTION)
        assert status == 200 and text, (status, text, self.log()[-3000:])


@pytest.fixture(scope="module")
def server(wide_model, media, tmp_path_factory):
    log_path = tmp_path_factory.mktemp("deploy") / "deploy.log"
    extra = {"VIDEO_SEGMENTS": "100000",  # every frame of every test video
             "REQUEST_MAX_FRAMES": str(MAX_FRAMES),
             "SWIFT_ALLOW_INTERNAL_URL": "1",  # the media server is on 127.0.0.1
             "SOPHIA_ALLOWED_MEDIA_PATH": media["dir"], "SOPHIA_MAX_REQUEST_MB": str(MAX_REQUEST_MB),
             "SWIFT_MAX_DOWNLOAD_SIZE_MB": str(MAX_VIDEO_MB), "SOPHIA_MAX_FRAME_PIXELS": str(MAX_FRAME_PIXELS),
             "MALLOC_ARENA_MAX": "2",  # glibc's per-thread arenas are address space too: keep them out of HEADROOM
             "SOPHIA_STREAM_FEATURES": "1"}  # the path a GPU server takes: features computed while a video decodes
    with DeployProcess([SWIFT, "deploy", "--model", wide_model, "--model_type", "sophia",
                        "--external_plugins", plugin_path(), "--infer_backend", "transformers",
                        "--torch_dtype", "float32", "--served_model_name", "sophia", "--max_new_tokens", "2",
                        "--max_length", str(MAX_LENGTH), "--max_batch_size", "2"],
                       log_path, env=env(**extra)) as deploy:
        deploy.wait_until_serving(timeout=300)
        yield Server(deploy)


def _video(path):
    return {"type": "video", "video": path}


BAD = {  # case: (parts of the user message, what the 400's message must say); "{name}" is filled from `media`
    "missing path": ([_video("{missing}")], ["video 0 of the request: video file not found: {missing}"]),
    "missing path as video_url": ([{"type": "video_url", "video_url": {"url": "{missing}"}}],
                                  ["video file not found: {missing}"]),
    "zero-byte file": ([_video("{empty}")], ["video 0 of the request: video {empty} is empty (0 bytes)"]),
    "not a video": ([_video("{garbage}")], ["cannot decode video {garbage}: not a readable video file ("]),
    "empty data URL": ([{"type": "video_url", "video_url": {"url": "data:video/mp4;base64,"}}],
                       ["video <data URL, 22 chars> is empty (its data URL holds no data)"]),
    "URL of a non-video": ([{"type": "video_url", "video_url": {"url": "{url}/garbage.mp4"}}],
                           ["cannot decode video {url}/garbage.mp4: not a readable video file ("]),
    "no messages": (None, ["the request has no messages"]),
    "tag without a video": ([{"type": "text", "text": "<video>What color is the background?"}],
                            ["the request has 1 <video> tag(s) but no video"]),
    "two tags, one video": ([_video("{good}"), {"type": "text", "text": "<video>What color?"}],
                            ["the request has 2 <video> tag(s) but 1 video(s) [{good}]"]),
    "a directory": ([_video("{folder}")], ["video 0 of the request: video {folder} is a directory, not a video file"]),
    "frames over the pixel limit": ([_video("{large_frames}")], [
        "video 0 of the request: video {large_frames} has frames of 96x96 pixels (9,216), more than the 4,096 this "
        "server decodes (SOPHIA_MAX_FRAME_PIXELS): send the video at a lower resolution"]),
    "data URL over the video size limit": ([{"type": "video_url", "video_url": {"url": "{too_big}"}}], [
        "video 0 of the request: video <data URL, {too_big_chars} chars> holds 1.1 MB, more than the 1 MB this server "
        "takes for one video (SWIFT_MAX_DOWNLOAD_SIZE_MB)"]),
    "URL over the video size limit": ([{"type": "video_url", "video_url": {"url": "{url}/big.bin"}}], [
        "Refusing to fetch '{url}/big.bin': the response is larger than 1MB"]),  # ms-swift's check
}


def _fill(value, names):
    if isinstance(value, str):
        return re.sub(r"\{(\w+)\}", lambda m: names[m.group(1)], value)
    if isinstance(value, (list, tuple)):
        return type(value)(_fill(v, names) for v in value)
    if isinstance(value, dict):
        return {k: _fill(v, names) for k, v in value.items()}
    return value


def test_clients_asking_about_one_video_share_its_features(server, media):
    """Three clients ask about one video at once, then one more question: every answer comes, and the last question
    is answered from the video's cached features (the server logs the reuse) without decoding the video again."""
    from concurrent.futures import ThreadPoolExecutor

    video, reused = media["other"], f"video {media['other']}: features of its 12 frames reused (feature cache)"
    before = server.log().count(reused)
    questions = ["What color is the background?", "Is it bright?", "What changes?"]
    with ThreadPoolExecutor(3) as pool:
        results = list(pool.map(lambda q: server.ask(_video(video), {"type": "text", "text": q}), questions))
    assert all(status == 200 and text for status, text in results), results
    after_concurrent = server.log().count(reused)
    server.answers(video)
    assert server.log().count(reused) == after_concurrent + 1 > before, server.log()[-3000:]
    assert "while the video decodes (streamed features" in server.log()


@pytest.mark.parametrize("case", list(BAD))
def test_bad_request_gets_a_400_naming_the_video_and_the_reason(server, media, media_url, case):
    content, expected = _fill(BAD[case], dict(media, url=media_url))
    assert "{" not in str(expected)
    status, message = server.ask(messages=[]) if content is None else server.ask(*content, QUESTION)
    assert status == 400, (status, message)
    for text in expected:
        assert text in message, message
    assert "swift-media" not in message  # not the server's downloaded copy
    server.answers(media["good"])  # the server keeps serving


def _outside(name):
    return (f"{name} names a file outside the folders this server reads videos and images from "
            f"(SOPHIA_ALLOWED_MEDIA_PATH): give an absolute path inside one of them, or the video or image as an "
            f"http(s) URL or a data URL (data:video/mp4;base64,...).")


def test_local_files_outside_the_allowed_folders_get_the_same_400_whether_or_not_they_exist(server, media):
    """Symlinks and `..` are resolved first; a relative path and base64 that is not a data URL are paths outside
    too (readers tell base64 from a path by asking the disk)."""
    raw_base64 = base64.b64encode(open(media["good"], "rb").read()).decode()
    for path in ("outside", "outside_missing", "link_outside", "dots_outside"):
        for part in (_video(media[path]), {"type": "video_url", "video_url": {"url": media[path]}},
                     {"type": "image", "image": media[path]}):
            assert server.ask(part, QUESTION) == (400, _outside(media[path])), part
        assert server.complete("<video>What color?", [media[path]]) == (400, _outside(media[path]))
    assert server.ask(_video("good.mp4"), QUESTION) == (400, _outside("good.mp4"))
    assert server.ask(_video(raw_base64), QUESTION) == (400, _outside(f"<base64 video, {len(raw_base64)} chars>"))
    server.answers(media["good"])
    server.answers(_data_url(open(media["outside"], "rb").read()))
    assert server.complete("<video>What color?", [media["good"]])[0] == 200


def test_a_request_over_the_size_limit_gets_a_413_before_it_is_parsed(server, media):
    data = os.urandom(int(0.8 * MAX_REQUEST_MB * 2 ** 20))  # 4/3 as much base64
    status, message = server.ask({"type": "video_url", "video_url": {"url": _data_url(data)}}, QUESTION)
    assert status == 413, (status, message)
    assert re.fullmatch(rf"the request's body is 2\.\d MB, more than the {MAX_REQUEST_MB} MB this server takes in "
                        rf"one request \(SOPHIA_MAX_REQUEST_MB\): give long videos as http\(s\) URLs rather than "
                        rf"inline as data URLs, or send a shorter video", message), message
    # a body sent in chunks, without its length
    body = json.dumps({"model": "sophia", "messages": [{"role": "user", "content": [_video(media["good"])]}],
                       "pad": "x" * (MAX_REQUEST_MB << 20)}).encode()
    connection = http.client.HTTPConnection("127.0.0.1", server.deploy.port, timeout=60)
    connection.request("POST", "/v1/chat/completions", body=(body[i:i + 65536] for i in range(0, len(body), 65536)),
                       headers={"Content-Type": "application/json"}, encode_chunked=True)
    reply = connection.getresponse()
    assert reply.status == 413 and json.loads(reply.read())["message"].startswith(
        f"the request's body is more than the {MAX_REQUEST_MB} MB this server takes in one request")
    connection.close()
    server.answers(media["good"])


def test_a_server_listening_beyond_loopback_reads_no_local_files(tiny_model_dir, media, tmp_path):
    """Without SOPHIA_ALLOWED_MEDIA_PATH, local files are refused on 0.0.0.0 (allowed on 127.0.0.1, where every
    other server of the tests listens); URLs and data URLs are served."""
    with DeployProcess([SWIFT, "deploy", "--model", tiny_model_dir, "--model_type", "sophia",
                        "--external_plugins", plugin_path(), "--infer_backend", "transformers",
                        "--served_model_name", "sophia", "--max_new_tokens", "2"],
                       tmp_path / "deploy.log", env=env(), host="0.0.0.0") as deploy:
        deploy.wait_until_serving(timeout=300)
        open_server = Server(deploy)
        for path in (media["good"], media["missing"]):
            for part in (_video(path), {"type": "image", "image": path}):
                assert open_server.ask(part, QUESTION) == (400, (
                    f"{path} names a file on the server, and this server reads no files from its disk for a request: "
                    f"give videos and images as http(s) URLs or as data URLs (data:video/mp4;base64,...). The "
                    f"server's operator can allow the files inside chosen folders with "
                    f"SOPHIA_ALLOWED_MEDIA_PATH=/folder1:/folder2."))
        open_server.answers(_data_url(open(media["good"], "rb").read()))


def test_local_files_are_allowed_by_the_address_the_server_listens_on_unless_folders_are_given(monkeypatch,
                                                                                               tmp_path):
    from swift_sophia.ms_swift.request_check import LocalMedia, listens_on_loopback_only

    hosts = ("127.0.0.1", "::1", "localhost", "0.0.0.0", "::", "192.0.2.1")
    assert [listens_on_loopback_only(h) for h in hosts] == [True] * 3 + [False] * 3
    monkeypatch.delenv("SOPHIA_ALLOWED_MEDIA_PATH", raising=False)
    assert LocalMedia.for_server("127.0.0.1").folders is None and LocalMedia.for_server("0.0.0.0").folders == ()
    monkeypatch.setenv("SOPHIA_ALLOWED_MEDIA_PATH", "")  # set, but no folder: none
    assert LocalMedia.for_server("127.0.0.1").folders == ()
    (tmp_path / "real").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "real")
    monkeypatch.setenv("SOPHIA_ALLOWED_MEDIA_PATH", f"{tmp_path}/link:{tmp_path}/real/../other:")
    real = Path(os.path.realpath(tmp_path))
    assert LocalMedia.for_server("0.0.0.0").folders == (str(real / "real"), str(real / "other"))


def test_too_many_frames_are_refused_with_the_limit_named(server, media):
    status, message = server.ask(_video(media["over_frames"]), QUESTION)
    assert status == 400
    assert message.startswith(f"the request's videos give {MAX_FRAMES + 100} frames (video 0 {media['over_frames']}: "
                              f"{MAX_FRAMES + 100} frames), more than REQUEST_MAX_FRAMES={MAX_FRAMES}"), message
    # the limit is per request: two videos within it alone, over it together
    status, message = server.ask(_video(media["oom"]), _video(media["oom"]), QUESTION)
    assert status == 400 and f"give {2 * OOM_FRAMES} frames" in message and "REQUEST_MAX_FRAMES" in message, message
    server.answers(media["good"])


def test_too_many_tokens_are_refused_with_max_length_named(server, media):
    frames = MAX_LENGTH // 4 + 50
    status, message = server.ask(_video(media["over_tokens"]), QUESTION)
    assert status == 400
    assert message.startswith(f"the request's videos alone give {frames * 4 + 2} tokens (video 0 "
                              f"{media['over_tokens']}: {frames} frames; 4 tokens per frame), more than this "
                              f"server's --max_length {MAX_LENGTH}"), message
    server.answers(media["good"])


def _concurrently(server, *requests, delay=0.5):
    """Ask the first request, then after `delay` seconds the others at once; returns the answers in order."""
    results = [None] * len(requests)

    def ask(i):
        results[i] = server.ask(*requests[i])

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(len(requests))]
    threads[0].start()
    time.sleep(delay)
    for t in threads[1:]:
        t.start()
    for t in threads:
        t.join(timeout=180)
    return results


def test_a_bad_request_does_not_fail_the_requests_batched_with_it(server, media):
    """While a longer request runs, a request whose text is over --max_length (found once it is encoded: ms-swift's
    own check) and a good one wait and are batched together (--max_batch_size 2)."""
    too_long = (_video(media["good"]), {"type": "text", "text": "red " * 1600})
    busy, bad, good = _concurrently(server, (_video(media["busy"]), QUESTION), too_long,
                                    (_video(media["other"]), QUESTION))
    assert busy[0] == 200 and good[0] == 200 and good[1], (busy, good)
    assert bad[0] == 400
    assert bad[1].startswith("the request is longer than this server's --max_length (Current length of row("), bad
    assert f"its videos: video 0 {media['good']}: 16 frames" in bad[1], bad


def test_a_stream_whose_generation_fails_is_answered_and_the_server_keeps_serving(server, media):
    """ms-swift runs `generate` of a stream in a thread of its own; when it raised, the stream waited forever and
    so did the engine's one worker: no later request was answered."""
    status, message = server.ask(_video(media["good"]), QUESTION, stream=True,
                                 extra_body={"repetition_penalty": -1.0})
    assert status == 400 and "penalty" in message, (status, message)
    status, text = server.ask(_video(media["good"]), QUESTION, stream=True)
    assert status == 200 and text
    server.answers(media["other"])


def _vm_size(pid):
    with open(f"/proc/{pid}/status") as f:
        return int(re.search(r"VmSize:\s+(\d+) kB", f.read()).group(1)) << 10


def test_out_of_memory_gets_a_503_and_the_server_keeps_serving(server, media):
    server.answers(media["good"])
    pid = server.pid
    soft, hard = resource.prlimit(pid, resource.RLIMIT_AS)
    resource.prlimit(pid, resource.RLIMIT_AS, (_vm_size(pid) + HEADROOM, hard))
    try:
        server.answers(media["good"])  # short requests fit under the limit
        expected = f"out of memory while answering this request (video 0 {media['oom']}: {OOM_FRAMES} frames): "
        for stream in (False, True):
            status, message = server.ask(_video(media["oom"]), QUESTION, stream=stream)
            assert status == 503, (stream, status, message)
            assert message.startswith(expected) and "can't allocate memory" in message, message
            assert "The server freed the memory and keeps serving" in message
            server.answers(media["good"])

        # requests in flight: while the first large request runs, a second one and a short one wait and are
        # batched together (--max_batch_size 2); the batch runs out of memory and its requests are answered alone
        first, second, short = _concurrently(server, (_video(media["oom"]), QUESTION),
                                             (_video(media["oom"]), QUESTION), (_video(media["good"]), QUESTION),
                                             delay=1.0)
        assert first[0] == 503 and second[0] == 503, (first, second)
        assert short[0] == 200 and short[1], short
        # (whether the second and third requests were batched together, "[sophia] a batch of 2 requests ran out of
        # memory" in the log, depends on timing; the answers above are what must hold either way)
        server.answers(media["other"])
    finally:
        resource.prlimit(pid, resource.RLIMIT_AS, (soft, hard))
    server.answers(media["good"])


def test_the_client_gets_the_allocators_reason_in_whole_sentences_without_the_operators_advice():
    from swift_sophia.ms_swift.patches.out_of_memory import _reason

    cuda = ("CUDA out of memory. Tried to allocate 3.66 GiB. GPU 0 has a total capacity of 139.80 GiB of which "
            "1.42 GiB is free. Including non-PyTorch memory, this process has 138.37 GiB memory in use. Of the "
            "allocated memory 137.52 GiB is allocated by PyTorch, and 182.59 MiB is reserved by PyTorch but "
            "unallocated. If reserved but "
            "unallocated memory is large try setting PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True to avoid "
            "fragmentation.  See documentation for Memory Management  (https://pytorch.org/docs/stable/notes/cuda.html)")
    assert _reason(torch.OutOfMemoryError(cuda)) == cuda[:cuda.index(" If reserved")]  # measured on an H200
    cpu = ("[enforce fail at alloc_cpu.cpp:119] err == 0. DefaultCPUAllocator: can't allocate memory: you tried to "
           "allocate 592576512 bytes. Error code 12 (Cannot allocate memory)")
    assert _reason(RuntimeError(cpu)) == cpu[cpu.index("Default"):]
    assert len(_reason(RuntimeError("x" * 1000))) == 400
