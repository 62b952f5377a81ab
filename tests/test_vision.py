"""The vision analyzer: real images through a real local HTTP server, Pillow, and FakeLLM.

Assertions are on what FakeLLM actually received (the image bytes are
decoded back from the data URLs it was sent) and on what the file server
saw. Refused images must never reach the model: those tests assert FakeLLM
got no request at all.
"""

from __future__ import annotations

import asyncio
import base64
import io
import random
import re
import struct
import sys
import threading
import uuid
import zlib
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis.asyncio as aioredis
from PIL import Image, ImageDraw

from devharness import devenv
from kubetriage.analyzers.llm import SYSTEM_PROMPT, LLMConfig
from kubetriage.analyzers.vision import (
    VISION_RULES,
    ImageRefused,
    PixelBudget,
    VisionAnalyzer,
    VisionConfig,
    decoded_pixels,
    image_sources,
    prepare_image,
    sniff,
)
from kubetriage.api.contract import AnalysisContext, AnalysisRequest
from kubetriage.api.models import AnalyzerName, Classification, Screenshot, ScriptResult, Source
from kubetriage.infra.queue import Event, Queue
from tests.fakellm import FakeLLM
from tests.localhttp import LocalHTTPServer, Route
from tests.waiting import eventually

MODEL = "fake/triage-vision"
FENCE = re.compile(r"<<<UNTRUSTED-DATA-([0-9a-f]{32})>>>\n(.*)\n<<<END-UNTRUSTED-DATA-\1>>>", re.DOTALL)


# --------------------------------------------------------------------------- images


def drawn_png(width: int = 320, height: int = 200, text: str = "Error 500") -> bytes:
    """A screenshot-like image: flat colours and a few shapes, which PNG compresses well."""
    img = Image.new("RGB", (width, height), (245, 245, 245))
    draw = ImageDraw.Draw(img)
    draw.rectangle((10, 10, width - 10, 40), fill=(200, 30, 30))
    draw.text((20, 60), text, fill=(0, 0, 0))
    out = io.BytesIO()
    img.save(out, format="PNG")
    return out.getvalue()


def noise_image(width: int, height: int, fmt: str = "PNG", seed: int = 7) -> bytes:
    """Incompressible pixels, so the size caps are really exercised."""
    rnd = random.Random(seed)
    img = Image.frombytes("RGB", (width, height), rnd.randbytes(width * height * 3))
    out = io.BytesIO()
    img.save(out, format=fmt, **({"quality": 92} if fmt == "JPEG" else {}))
    return out.getvalue()


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def declared_png(width: int, height: int) -> bytes:
    """A tiny file whose header declares ``width`` x ``height`` pixels: the decompression-bomb shape."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    # One scanline's worth of zeros, compressed; a real bomb would inflate to the full size.
    idat = zlib.compress(b"\x00" * (1 + 3 * min(width, 4096)), 9)
    return b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr) + _chunk(b"IDAT", idat) + _chunk(b"IEND", b"")


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def sent_images(request: dict[str, Any]) -> list[tuple[str, bytes]]:
    """(media type, bytes) of every image part in a chat request FakeLLM received."""
    out = []
    for message in request["messages"]:
        if isinstance(message.get("content"), list):
            for part in message["content"]:
                if part.get("type") == "image_url":
                    url = part["image_url"]["url"]
                    head, _, payload = url.partition(",")
                    assert head.startswith("data:image/") and head.endswith(";base64")
                    out.append((head[5:-7], base64.b64decode(payload)))
    return out


def user_text_of(request: dict[str, Any]) -> str:
    content = request["messages"][1]["content"]
    return "\n".join(p["text"] for p in content if p.get("type") == "text") if isinstance(content, list) else content


# --------------------------------------------------------------------------- fixtures


@pytest.fixture
async def llm() -> AsyncIterator[FakeLLM]:
    async with FakeLLM() as server:
        server.set_default({"classification": "false_positive", "reason": "the page shows a CDN error page",
                            "confidence": 0.9})
        yield server


@pytest.fixture
def files() -> Iterator[LocalHTTPServer]:
    with LocalHTTPServer() as server:
        yield server


MakeVision = Callable[..., VisionAnalyzer]


@pytest.fixture
async def make(llm: FakeLLM, files: LocalHTTPServer) -> AsyncIterator[MakeVision]:
    made: list[VisionAnalyzer] = []

    def factory(**limits: Any) -> VisionAnalyzer:
        config = LLMConfig(base_url=llm.url, model=MODEL, timeout_seconds=10, max_retries=0,
                           allow_http=True, allow_private_endpoints=True)  # FakeLLM: http on loopback
        analyzer = VisionAnalyzer(config, VisionConfig(**limits), allow_private_for_tests=files.exempt)
        made.append(analyzer)
        return analyzer

    yield factory
    for analyzer in made:
        await analyzer.aclose()


def request_for(
    screenshots: list[Screenshot] | None = None, report_url: str | None = None, name: str = "ui-run-1",
    success: bool = False,
) -> AnalysisRequest:
    return AnalysisRequest(
        uid=f"uid-{name}",
        name=name,
        namespace="qa",
        source=Source(type="scriptResult"),
        script_result=ScriptResult(
            script_name="checkout.spec.ts",
            test_case="pays with card",
            success=success,
            error_message="Error: expect(page).toHaveTitle(expected) failed",
            screenshots=screenshots,
            report_url=report_url,
        ),
    )


CTX = AnalysisContext()


# --------------------------------------------------------------------------- the happy paths


async def test_large_png_is_downscaled_within_the_cap_and_sent(
    make: MakeVision, llm: FakeLLM, files: LocalHTTPServer
) -> None:
    big = noise_image(2000, 1200)
    assert len(big) > 5_000_000
    files.route("/shots/failure.png", Route(big, headers={"Content-Type": "image/png"}))
    analyzer = make(max_side=800, max_output_bytes=150_000, max_input_bytes=16 * 1024 * 1024)
    verdict = await analyzer.analyze(request_for([Screenshot(url=files.url("/shots/failure.png"))]), CTX)

    assert verdict is not None
    assert verdict.analyzer == "vision"
    assert verdict.classification == Classification.FALSE_POSITIVE
    assert verdict.model == MODEL
    assert "[vision: 1 image(s) sent]" in verdict.reason
    [sent] = llm.requests
    [(media_type, data)] = sent_images(sent)
    assert len(data) <= 150_000
    decoded = Image.open(io.BytesIO(data))
    decoded.load()
    assert decoded.format == {"image/png": "PNG", "image/jpeg": "JPEG"}[media_type]
    assert max(decoded.size) <= 800
    # Aspect ratio kept (2000x1200 is 5:3).
    assert abs(decoded.width / decoded.height - 5 / 3) < 0.02
    assert sent["model"] == MODEL


async def test_small_inline_screenshot_is_sent_as_png_with_the_fenced_prompt(make: MakeVision, llm: FakeLLM) -> None:
    png = drawn_png(320, 200)
    verdict = await make().analyze(request_for([Screenshot(data=b64(png), media_type="image/png")]), CTX)
    assert verdict is not None
    [sent] = llm.requests
    [(media_type, data)] = sent_images(sent)
    assert media_type == "image/png"
    assert Image.open(io.BytesIO(data)).size == (320, 200)
    # The text analyzer's prompt, unchanged, plus the constant image rule; the data stays inside the fence.
    assert sent["messages"][0]["content"] == SYSTEM_PROMPT + VISION_RULES
    fenced = FENCE.search(user_text_of(sent))
    assert fenced is not None
    assert "checkout.spec.ts" in fenced.group(2)
    assert '"screenshots":1' in fenced.group(2)


async def test_large_jpeg_is_decoded_at_reduced_scale_and_fits(make: MakeVision) -> None:
    jpeg = noise_image(3000, 2000, fmt="JPEG")
    prepared = prepare_image(jpeg, VisionConfig(max_side=600, max_output_bytes=200_000, max_input_bytes=16 << 20))
    assert max(prepared.width, prepared.height) <= 600
    assert len(prepared.data) <= 200_000
    assert (prepared.source_width, prepared.source_height) == (3000, 2000)
    Image.open(io.BytesIO(prepared.data)).load()


async def test_report_images_are_resolved_fetched_and_vetted(
    make: MakeVision, llm: FakeLLM, files: LocalHTTPServer
) -> None:
    gif = io.BytesIO()
    Image.new("P", (40, 30), 3).save(gif, format="GIF")
    inline = drawn_png(50, 40)
    page = f"""<!doctype html><html><body><h1>Run 42</h1>
      <img src="shots/a.png" alt="a"><IMG SRC='../b.png'>
      <img src="http://169.254.169.254/latest/meta-data/iam.png">
      <img src="data:image/png;base64,{b64(inline)}">
      <img src="/c.gif"><img src="shots/a.png"><img alt="no source">
    </body></html>"""
    files.route("/runs/42/report.html", Route(page.encode(), headers={"Content-Type": "text/html; charset=utf-8"}))
    files.route("/runs/42/shots/a.png", Route(drawn_png(120, 80), headers={"Content-Type": "image/png"}))
    files.route("/runs/b.png", Route(drawn_png(90, 60), headers={"Content-Type": "image/png"}))
    files.route("/c.gif", Route(gif.getvalue(), headers={"Content-Type": "image/gif"}))
    analyzer = make(max_images=6, max_report_images=6)
    request = request_for(report_url=files.url("/runs/42/report.html"))
    verdict = await analyzer.analyze(request, CTX)

    assert verdict is not None
    [sent] = llm.requests
    sizes = sorted(Image.open(io.BytesIO(data)).size for _, data in sent_images(sent))
    assert sizes == [(40, 30), (50, 40), (90, 60), (120, 80)]
    assert sorted(files.paths()) == ["/c.gif", "/runs/42/report.html", "/runs/42/shots/a.png", "/runs/b.png"]
    [refused] = analyzer.refusals_for(request.uid)
    assert "169.254.169.254" in refused and "metadata" in refused
    assert "not used: report image 3" in verdict.reason


async def test_report_image_count_is_capped(make: MakeVision, llm: FakeLLM, files: LocalHTTPServer) -> None:
    page = "".join(f'<img src="/s{i}.png">' for i in range(5))
    files.route("/r.html", Route(page.encode(), headers={"Content-Type": "text/html"}))
    for i in range(5):
        files.route(f"/s{i}.png", Route(drawn_png(60 + i, 40), headers={"Content-Type": "image/png"}))
    analyzer = make(max_report_images=2)
    request = request_for(report_url=files.url("/r.html"))
    assert await analyzer.analyze(request, CTX) is not None
    assert len(sent_images(llm.requests[0])) == 2
    assert not {"/s2.png", "/s3.png", "/s4.png"} & set(files.paths())
    assert len([r for r in analyzer.refusals_for(request.uid) if "over the image limit" in r]) == 3


def test_image_sources_parsing() -> None:
    page = '<img src=" a.png "><img src="https://cdn.example.com/x.png"><img src="data:image/png;base64,AAAA">'
    assert image_sources(page, "https://reports.example.com/run/7/index.html") == [
        "https://reports.example.com/run/7/a.png",
        "https://cdn.example.com/x.png",
        "data:image/png;base64,AAAA",
    ]


# --------------------------------------------------------------------------- refusals never reach the model


async def test_html_served_as_png_is_refused(make: MakeVision, llm: FakeLLM, files: LocalHTTPServer) -> None:
    files.route("/shot.png", Route(b"<html><body>Login</body></html>", headers={"Content-Type": "image/png"}))
    analyzer = make()
    request = request_for([Screenshot(url=files.url("/shot.png"))])
    assert await analyzer.analyze(request, CTX) is None
    [note] = analyzer.refusals_for(request.uid)
    assert "not a PNG, JPEG, GIF or WebP image" in note
    assert llm.requests == []


async def test_oversize_downloaded_and_inline_images_are_refused(
    make: MakeVision, llm: FakeLLM, files: LocalHTTPServer
) -> None:
    files.route("/huge.png", Route(noise_image(700, 700), headers={"Content-Type": "image/png"}))
    analyzer = make(max_input_bytes=100_000)
    inline = noise_image(200, 200)
    assert len(inline) > 100_000
    request = request_for([Screenshot(url=files.url("/huge.png")), Screenshot(data=b64(inline))])
    assert await analyzer.analyze(request, CTX) is None
    notes = analyzer.refusals_for(request.uid)
    assert len(notes) == 2
    assert "exceeds the 100000-byte cap" in notes[0]
    assert "exceeds the 100000-byte input cap" in notes[1]
    assert llm.requests == []


@pytest.mark.parametrize(
    ("width", "height", "why"),
    [
        (50_000, 50_000, "decompression-bomb"),
        # Below Pillow's own limit (89M pixels): only our cap stands in the way.
        (6_000, 6_000, "6000x6000 = 36000000 pixels, over the 25000000-pixel cap"),
    ],
)
async def test_decompression_bombs_are_refused_before_decoding(
    make: MakeVision, llm: FakeLLM, width: int, height: int, why: str
) -> None:
    bomb = declared_png(width, height)
    assert len(bomb) < 20_000
    analyzer = make()
    request = request_for([Screenshot(data=b64(bomb), media_type="image/png")])
    assert await analyzer.analyze(request, CTX) is None
    [note] = analyzer.refusals_for(request.uid)
    assert why in note
    assert llm.requests == []


async def test_truncated_png_is_refused(make: MakeVision, llm: FakeLLM) -> None:
    whole = noise_image(300, 300)
    analyzer = make()
    request = request_for([Screenshot(data=b64(whole[: len(whole) // 2]))])
    assert await analyzer.analyze(request, CTX) is None
    [note] = analyzer.refusals_for(request.uid)
    assert "truncated or corrupt PNG data" in note
    assert llm.requests == []


def test_prepare_image_refusals() -> None:
    config = VisionConfig()
    with pytest.raises(ImageRefused, match="not a PNG"):
        prepare_image(b"GIF88a" + b"\x00" * 100, config)
    with pytest.raises(ImageRefused, match="unreadable PNG header"):
        prepare_image(b"\x89PNG\r\n\x1a\n" + b"\x00" * 40, config)
    # A PDF or EPS renamed .png is refused by the sniff; Pillow never picks another decoder.
    with pytest.raises(ImageRefused, match="not a PNG"):
        prepare_image(b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\n", config)
    assert sniff(b"RIFF\x00\x00\x00\x00WEBPVP8 ") == "WEBP"
    assert sniff(b"XXXX\x00\x00\x00\x00WEBPVP8 ") is None


async def test_private_screenshot_url_is_refused_but_other_images_are_used(make: MakeVision, llm: FakeLLM) -> None:
    analyzer = make()
    request = request_for([
        Screenshot(url="http://10.0.0.8/internal.png"),
        Screenshot(url="http://169.254.169.254/latest/meta-data/"),
        Screenshot(data=b64(drawn_png())),
    ])
    verdict = await analyzer.analyze(request, CTX)
    assert verdict is not None
    assert len(sent_images(llm.requests[0])) == 1
    notes = analyzer.refusals_for(request.uid)
    assert any("10.0.0.8" in n and "private" in n for n in notes)
    assert any("metadata" in n for n in notes)
    assert "not used:" in verdict.reason


async def test_unreachable_report_is_a_note_not_a_failure(make: MakeVision, llm: FakeLLM) -> None:
    analyzer = make()
    request = request_for(report_url="http://192.168.0.10/report.html")
    assert await analyzer.analyze(request, CTX) is None
    assert "private" in analyzer.refusals_for(request.uid)[0]
    assert llm.requests == []


async def test_no_images_or_a_passing_run_means_no_opinion_and_no_traffic(
    make: MakeVision, llm: FakeLLM, files: LocalHTTPServer
) -> None:
    analyzer = make()
    assert await analyzer.analyze(request_for(), CTX) is None
    passing = request_for([Screenshot(url=files.url("/x.png"))], success=True)
    assert await analyzer.analyze(passing, CTX) is None
    assert files.seen == []
    assert llm.requests == []


# --------------------------------------------------------------------------- model round trips


async def test_concurrent_jobs_each_send_their_own_images(make: MakeVision, llm: FakeLLM) -> None:
    analyzer = make()
    jobs = {"job-wide": (140, 50), "job-tall": (50, 140), "job-square": (90, 90)}
    requests = [request_for([Screenshot(data=b64(drawn_png(*size)))], name=name) for name, size in jobs.items()]
    verdicts = await asyncio.gather(*(analyzer.analyze(r, CTX) for r in requests))
    assert all(v is not None for v in verdicts)
    assert len(llm.requests) == 3
    for sent in llm.requests:
        fenced = FENCE.search(user_text_of(sent))
        assert fenced is not None
        name = re.search(r'"name":"(job-\w+)"', fenced.group(2))
        assert name is not None
        [(_, data)] = sent_images(sent)
        assert Image.open(io.BytesIO(data)).size == jobs[name.group(1)]


async def test_repair_round_keeps_the_images(make: MakeVision, llm: FakeLLM) -> None:
    llm.reply("I think it is probably fine")
    llm.verdict("valid", "the screenshot shows a real validation error", 0.8)
    verdict = await make().analyze(request_for([Screenshot(data=b64(drawn_png()))]), CTX)
    assert verdict is not None and verdict.classification == Classification.VALID
    assert len(llm.requests) == 2
    assert [len(sent_images(r)) for r in llm.requests] == [1, 1]
    assert verdict.tokens is not None and verdict.tokens.total > 0


# --------------------------------------------------------------------------- decode budgets


async def test_a_job_decodes_only_its_pixel_budget_and_says_which_images_it_refused(
    make: MakeVision, llm: FakeLLM
) -> None:
    analyzer = make(max_job_pixels=25_000)
    request = request_for([Screenshot(data=b64(drawn_png(100, 100, text=f"shot {i}"))) for i in range(3)])
    verdict = await analyzer.analyze(request, CTX)
    assert verdict is not None
    assert len(sent_images(llm.requests[0])) == 2  # 2 x 10000 pixels fit; the third would make 30000
    [note] = analyzer.refusals_for(request.uid)
    assert note.startswith("screenshot 3: ") and "would exceed the job's 25000-pixel budget" in note


def test_webp_counts_double_against_the_pixel_cap() -> None:
    """libwebp decodes into its own full-size buffer before Pillow copies it: twice the memory of a PNG."""
    config = VisionConfig(max_input_pixels=20_000, max_worker_pixels=20_000)
    png, webp = io.BytesIO(), io.BytesIO()
    Image.new("RGB", (120, 100), (200, 30, 30)).save(png, format="PNG")
    Image.new("RGB", (120, 100), (200, 30, 30)).save(webp, format="WEBP")
    assert decoded_pixels(png.getvalue(), config) == 12_000
    assert prepare_image(png.getvalue(), config).width == 120
    with pytest.raises(ImageRefused, match=r"12000 pixels \(x2: .*libwebp.*over the 20000-pixel cap"):
        decoded_pixels(webp.getvalue(), config)
    with pytest.raises(ImageRefused, match="x2"):
        prepare_image(webp.getvalue(), config)


def test_the_worker_budget_must_fit_the_largest_image() -> None:
    with pytest.raises(ValueError, match="max_worker_pixels must be at least max_input_pixels"):
        VisionConfig(max_input_pixels=30_000_000, max_worker_pixels=25_000_000)


class Gate:
    """A decode stand-in run by the budget's threads: says when it started, returns when released."""

    def __init__(self) -> None:
        self.started = threading.Event()
        self.release = threading.Event()

    def __call__(self) -> str:
        self.started.set()
        assert self.release.wait(60), "never released"
        return "decoded"


async def test_the_worker_budget_holds_a_decode_until_its_pixels_are_free() -> None:
    budget = PixelBudget(100, decodes=2)
    first, second, small = Gate(), Gate(), Gate()
    try:
        running = asyncio.create_task(budget.run(60, first))
        await eventually(first.started.is_set, "the first decode to start")
        waiting = asyncio.create_task(budget.run(60, second))
        behind = asyncio.create_task(budget.run(10, small))  # would fit, but waits its turn behind the big one
        await eventually(lambda: budget.waiting, "both later decodes to queue", accept=lambda n: n == 2)
        assert budget.free == 40
        assert not second.started.is_set() and not small.started.is_set()
        first.release.set()
        assert await running == "decoded"
        await eventually(second.started.is_set, "the second decode to start once the first gave its pixels back")
        await eventually(small.started.is_set, "the small decode to start in the room left")
        assert budget.free == 30
        second.release.set()
        small.release.set()
        assert await asyncio.gather(waiting, behind) == ["decoded", "decoded"]
        assert (budget.free, budget.waiting) == (100, 0)
    finally:
        for gate in (first, second, small):
            gate.release.set()
        budget.close()


async def test_a_cancelled_job_keeps_its_pixels_counted_until_its_decode_returns() -> None:
    """A job past its deadline stops waiting, but the thread still holds the decoded frame."""
    budget = PixelBudget(100, decodes=2)
    gate, holder = Gate(), Gate()
    try:
        task = asyncio.create_task(budget.run(70, gate))
        await eventually(gate.started.is_set, "the decode to start")
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert budget.free == 30
        gate.release.set()
        await eventually(lambda: budget.free, "the pixels to come back when the thread returns",
                         accept=lambda free: free == 100)

        held = asyncio.create_task(budget.run(70, holder))
        await eventually(holder.started.is_set, "a decode to hold 70 pixels")
        queued = asyncio.create_task(budget.run(80, Gate()))  # cancelled while waiting: leaves no trace
        await eventually(lambda: budget.waiting, "the decode to queue", accept=lambda n: n == 1)
        queued.cancel()
        with pytest.raises(asyncio.CancelledError):
            await queued
        assert (budget.free, budget.waiting) == (30, 0)
        holder.release.set()
        assert await held == "decoded"
        assert budget.free == 100
    finally:
        gate.release.set()
        holder.release.set()
        budget.close()


# --------------------------------------------------------------------------- a real worker's memory

WORKER_PEAK_LIMIT = 384 * 1024 * 1024


def flat_rgba_png(side: int, shade: int) -> bytes:
    """A huge screenshot that compresses to ~110 KB: flat colour, a banner and a caption, with alpha."""
    img = Image.new("RGBA", (side, side), (shade, shade, shade, 255))
    draw = ImageDraw.Draw(img)
    draw.rectangle((100, 100, side - 100, 400), fill=(200, 30, 30, 255))
    draw.text((200, 600), f"Error 500 (shade {shade})", fill=(0, 0, 0, 255))
    out = io.BytesIO()
    img.save(out, format="PNG", compress_level=9)
    return out.getvalue()


def peak_rss(pid: int) -> int:
    """The process's high-water resident set size (VmHWM), in bytes."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise AssertionError(f"no VmHWM in /proc/{pid}/status")


async def test_a_worker_decoding_four_huge_pngs_stays_under_its_memory_limit(
    redis_server: devenv.Redis, llm: FakeLLM, tmp_path: Path
) -> None:
    """Issue 12 item 2: four inline 5000x5000 RGBA PNGs (each inside every cap) took a worker to 924 MB.

    A real ``kubetriage worker`` process claims the job from the session's Redis and sends the images to
    FakeLLM; its peak RSS, read from the kernel, must leave room under the chart's 512Mi limit.
    """
    shots = [flat_rgba_png(5000, 230 + i) for i in range(4)]
    assert all(len(b64(s)) < 200_000 for s in shots)  # small on the wire: the cost is all in decoding
    prefix, pool = f"t{uuid.uuid4().hex[:8]}", "qa/vision"
    worker = devenv.spawn(f"worker-{prefix}", [sys.executable, "-m", "kubetriage", "worker"], tmp_path, env={
        "KUBETRIAGE_REDIS_URL": redis_server.url, "KUBETRIAGE_REDIS_PREFIX": prefix, "KUBETRIAGE_POOL": pool,
        "KUBETRIAGE_LLM_BASE_URL": llm.url, "KUBETRIAGE_LLM_VISION_MODEL": MODEL, "KUBETRIAGE_LLM_API_KEY": "k",
        "KUBETRIAGE_LLM_ALLOW_HTTP": "true", "KUBETRIAGE_LLM_ALLOW_PRIVATE_ENDPOINTS": "true",  # FakeLLM
        "KUBETRIAGE_METRICS_PORT": "0",
    })
    redis = aioredis.from_url(redis_server.url)
    try:
        queue = Queue(redis, prefix)
        await queue.ensure_group()
        request = request_for([Screenshot(data=b64(s), media_type="image/png") for s in shots], name="huge-pngs")
        request = request.model_copy(update={"analyzer": AnalyzerName.VISION})  # the rules would decide this text alone
        await queue.enqueue(uid=request.uid, pool=pool, priority=1, namespace=request.namespace,
                            name=request.name, max_attempts=1,
                            payload=request.model_dump(mode="json", exclude_none=True))
        seen: list[Event] = []

        async def finished() -> Event | None:
            seen.extend(await queue.read_events("test", block_ms=200))
            return next((e for e in seen if e.uid == request.uid and e.type in ("result", "failed")), None)

        done = await eventually(finished, "the worker's verdict on the job", timeout=120,
                                give_up=lambda: None if worker.alive() else f"worker exited:\n{worker.tail()}",
                                context=worker.tail)
        peak = peak_rss(worker.popen.pid)
    finally:
        worker.stop()
        await redis.aclose()
    assert done.type == "result", done.body
    assert "[vision: 4 image(s) sent]" in done.body  # in the verdict's reason, whatever the safety policy made of it
    [sent] = llm.requests
    assert [Image.open(io.BytesIO(data)).size for _, data in sent_images(sent)] == [(1568, 1568)] * 4
    assert peak < WORKER_PEAK_LIMIT, f"worker peak RSS {peak / 2**20:.0f} MiB"
