"""bark-kernels serve (bark.serve, bark.cli.serve) on a tiny random Bark: a real uvicorn server on 127.0.0.1 and an
ephemeral port. The OpenAI client gets valid audio; SSE and chunked responses carry the first sentence before the last
one is generated (held back by the engine until the client has the first: the batch log proves the order); concurrent
requests share batches and each equals itself served alone; a full queue answers 429 with Retry-After and loses no
accepted request; a client that goes away frees its rows; bad bodies name their field; a failing generation fails its
request only; SIGTERM lets the requests in flight finish (a subprocess)."""

from __future__ import annotations

import base64
import io
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("transformers")
pytest.importorskip("fastapi", reason="the server's extra is not installed: pip install -e '.[serve]'")
pytest.importorskip("uvicorn", reason="the server's extra is not installed: pip install -e '.[serve]'")
httpx = pytest.importorskip("httpx", reason="the server's extra is not installed: pip install -e '.[serve]'")

import bark  # noqa: E402
from bark.wav import to_pcm16  # noqa: E402
from serve_support import PRESET, VOICE, Gate, pcm_of, serving, tiny_checkpoint, tiny_model, voice  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
THREE = "Hello there. How are you today? Fine, thanks."
# A row decoded in a batch and alone differ by ~1e-5 relative in float32 (the codec's sums may be ordered differently,
# tests/test_longform.py's RTOL); after rounding to 16-bit PCM that is at most one step.
PCM_STEPS = 1


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny_serve")
    tiny_checkpoint(path)
    return path, tiny_model(path)


@pytest.fixture(scope="module")
def server(tiny):
    with serving(tiny[1], max_batch=8, max_wait=0.05) as s:
        yield s


def _speech(url: str, timeout: float = 60, **body) -> httpx.Response:
    body.setdefault("input", THREE)
    body.setdefault("voice", VOICE)
    body.setdefault("greedy", True)
    return httpx.post(f"{url}/v1/audio/speech", json=body, timeout=timeout)


def _alone(engine, text: str, **fields) -> np.ndarray:
    """What the engine gives this request with nothing else in it (the reference of 'served alone')."""
    request = bark.SpeechRequest(text, voice=voice(), **fields)
    return to_pcm16(engine.submit(request).audio())


def test_openai_client_gets_valid_wav_and_pcm(server):
    openai = pytest.importorskip("openai", reason="the OpenAI client is not installed (the test extra has it)")
    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="not-needed", max_retries=0)
    reference = _alone(server.engine, THREE, generate_kwargs={"do_sample": False})
    assert reference.size > 0
    for fmt in ("wav", "pcm"):
        response = client.audio.speech.create(model="tts-1", voice=VOICE, input=THREE, response_format=fmt,
                                              extra_body={"greedy": True})
        samples = pcm_of(response.content, fmt)
        np.testing.assert_array_equal(samples, reference)  # both alone: the same code path, bit for bit
    with client.audio.speech.with_streaming_response.create(model="tts-1", voice=VOICE, input=THREE,
                                                            response_format="pcm", extra_body={"greedy": True}) as r:
        streamed = b"".join(r.iter_bytes())  # the README's streaming call
    np.testing.assert_array_equal(pcm_of(streamed, "pcm"), reference)
    wav = client.audio.speech.create(model="tiny-bark", voice=VOICE, input=THREE, response_format="wav",
                                     extra_body={"greedy": True}).content
    import wave

    with wave.open(io.BytesIO(wav)) as reader:  # the standard library reads the streamed header
        assert (reader.getnchannels(), reader.getsampwidth(), reader.getframerate()) == (1, 2, 24_000)
        np.testing.assert_array_equal(np.frombuffer(reader.readframes(10**9), "<i2"), reference)


def test_whole_file_formats_decode_to_the_same_audio(server):
    soundfile = pytest.importorskip("soundfile", reason="soundfile (the serve extra) writes flac/mp3/opus")
    formats = httpx.get(f"{server.url}/v1/audio/voices").json()["response_formats"]
    reference = pcm_of(_speech(server.url, response_format="pcm").content, "pcm")
    for fmt in ("flac", "mp3", "opus"):
        if fmt not in formats:
            continue
        response = _speech(server.url, response_format=fmt)
        assert response.status_code == 200, response.text
        assert response.headers["content-type"].startswith({"flac": "audio/flac", "mp3": "audio/mpeg",
                                                             "opus": "audio/ogg"}[fmt])
        decoded, rate = soundfile.read(io.BytesIO(response.content), dtype="int16")
        if fmt == "flac":  # lossless
            assert rate == 24_000
            np.testing.assert_array_equal(decoded, reference)
        else:  # lossy, with encoder delay and padding: the length within 0.1 s, 48 kHz for Opus
            assert abs(decoded.shape[0] / rate - reference.shape[0] / 24_000) < 0.1, fmt
    assert "flac" in formats, "libsndfile in soundfile's wheel writes FLAC"


def _read_stream(url: str, body: dict, on_first) -> tuple[bytes, float, list[dict]]:
    """POST ``body``, call ``on_first()`` when the first audio bytes arrive; -> (audio bytes, their arrival time,
    the SSE events or [])."""
    audio, events, first_at = b"", [], None
    with httpx.stream("POST", f"{url}/v1/audio/speech", json=body, timeout=60) as response:
        assert response.status_code == 200, response.read()
        if body.get("stream_format") == "sse":
            assert response.headers["content-type"].startswith("text/event-stream")
            for line in response.iter_lines():
                if not line.startswith("data: "):
                    continue
                event = json.loads(line[len("data: "):])
                events.append(event)
                if event["type"] == "speech.audio.delta":
                    audio += base64.b64decode(event["audio"])
                    if first_at is None:
                        first_at = time.perf_counter()
                        on_first()
        else:
            for chunk in response.iter_raw():
                audio += chunk
                if first_at is None and len(audio) > 44:
                    first_at = time.perf_counter()
                    on_first()
    return audio, first_at, events


@pytest.mark.parametrize("stream_format", ["audio", "sse"])
def test_first_sentence_arrives_before_the_last_is_generated(tiny, stream_format):
    """One sentence per batch; the worker is held before each later batch until the client has the first audio. If
    the server held the audio back until the end, the hold would time out and the last batch would end before the
    first audio arrived: both are checked."""
    gate = Gate(from_batch=1, timeout=20)
    with serving(tiny[1], max_batch=1, gate=gate) as s:
        body = {"input": THREE, "voice": VOICE, "greedy": True, "response_format": "wav",
                "stream_format": stream_format}
        audio, first_at, events = _read_stream(s.url, body, gate.open)
        assert not gate.timed_out, "the first sentence's audio did not reach the client while the others waited"
        (rid,) = {r for info, _ in s.log.batches for r, _ in info.rows}
        assert s.log.rows_of(rid) == [0, 1, 2]  # three sentences, three batches, in order
        last_batch_end = s.log.batches[-1][1]
        assert first_at < last_batch_end, "the first audio came after the last sentence was generated"
        np.testing.assert_array_equal(pcm_of(audio, "wav"), _alone(s.engine, THREE,
                                                                   generate_kwargs={"do_sample": False}))
        if stream_format == "sse":
            kinds = [e["type"] for e in events]
            assert kinds == ["speech.audio.delta"] * 3 + ["speech.audio.done"], kinds
            usage = events[-1]["usage"]
            assert usage["input_tokens"] == len(THREE.encode()) - 2  # bytes of the three sentences, spaces dropped
            assert usage["output_tokens"] > 0 and usage["total_tokens"] == usage["input_tokens"] + usage[
                "output_tokens"]


TEXTS = ["Good morning.", "A slightly longer sentence here.", "Yes.", "What time is it now?",
         "The quick brown fox jumps.", "No. Not today.", "One more, please.", "Last one in the batch."]


def test_concurrent_requests_share_batches_and_each_equals_itself_alone(tiny):
    """Eight clients at once: six greedy requests and two seeded sampled ones (each row its own seeded random
    stream: bark.engine), in fewer batches than requests; every response equals the same request sent alone to the
    same server."""
    bodies = [{"input": t, "voice": VOICE, "greedy": True, "response_format": "pcm"} for t in TEXTS[:6]]
    bodies += [{"input": t, "voice": VOICE, "seed": 7 + i, "response_format": "pcm"} for i, t in enumerate(TEXTS[6:])]
    with serving(tiny[1], max_batch=8, max_wait=1.0) as s:
        alone = []
        for body in bodies:
            response = _speech(s.url, **body)
            assert response.status_code == 200, response.text
            alone.append(pcm_of(response.content, "pcm"))
        before = len(s.log.batches)
        results: list = [None] * len(bodies)
        barrier = threading.Barrier(len(bodies))

        def client(i):
            barrier.wait()
            results[i] = _speech(s.url, **bodies[i])

        threads = [threading.Thread(target=client, args=(i,)) for i in range(len(bodies))]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        batches = s.log.since(before)
        pieces = sum(int(r.headers["X-Pieces"]) for r in results)
        assert len(batches) < len(bodies), [b.rows for b in batches]
        assert sum(len(b.rows) for b in batches) == pieces
        assert max(len(b.rows) for b in batches) >= 4, [b.rows for b in batches]  # the greedy ones ran together
        for i, (response, reference) in enumerate(zip(results, alone, strict=True)):
            assert response.status_code == 200, response.text
            samples = pcm_of(response.content, "pcm")
            assert samples.shape == reference.shape, bodies[i]
            if "seed" in bodies[i]:
                np.testing.assert_array_equal(samples, reference)  # a batch of its own: bit for bit
            else:
                steps = np.abs(samples.astype(np.int32) - reference.astype(np.int32)).max(initial=0)
                assert steps <= PCM_STEPS, (bodies[i], steps)


def _wait_for(condition, timeout: float = 20.0, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


def test_a_full_queue_answers_429_with_retry_after_and_loses_no_accepted_request(tiny):
    gate = Gate(from_batch=0, timeout=30)
    with serving(tiny[1], max_batch=1, max_queue=2, gate=gate) as s:
        accepted: list = [None, None]

        def client(i):
            accepted[i] = _speech(s.url, input=f"Number {i}. Still number {i}.", response_format="pcm")

        threads = [threading.Thread(target=client, args=(i,)) for i in range(2)]
        for t in threads:
            t.start()
        _wait_for(lambda: s.engine.queue_depth == 2, what="two requests queued")
        refused = [_speech(s.url, input="One too many.", timeout=10) for _ in range(3)]
        gate.open()
        for t in threads:
            t.join(60)
        assert not gate.timed_out
        for response in refused:
            assert response.status_code == 429, response.text
            assert int(response.headers["Retry-After"]) >= 1
            assert response.json()["error"]["type"] == "rate_limit_error"
            assert "max_queue=2" in response.json()["error"]["message"]
        for i, response in enumerate(accepted):
            assert response is not None and response.status_code == 200, response and response.text
            expected = _alone(s.engine, f"Number {i}. Still number {i}.", generate_kwargs={"do_sample": False})
            np.testing.assert_array_equal(pcm_of(response.content, "pcm"), expected)
        health = httpx.get(f"{s.url}/health").json()
        assert health["refused_full"] == 3 and health["queue_depth"] == 0


def test_a_client_that_goes_away_has_its_rows_dropped(tiny):
    text = "One. Two. Three. Four. Five."
    gate = Gate(from_batch=1, timeout=30)
    with serving(tiny[1], max_batch=1, gate=gate) as s:
        with httpx.stream("POST", f"{s.url}/v1/audio/speech", timeout=60,
                          json={"input": text, "voice": VOICE, "greedy": True, "response_format": "pcm"}) as response:
            assert response.status_code == 200
            rid = int(response.headers["X-Request-Id"])
            assert int(response.headers["X-Pieces"]) == 5
            next(response.iter_raw())  # the first sentence, then the client leaves
        _wait_for(lambda: s.engine.queue_depth == 0, what="the request to be cancelled")
        gate.open()
        assert not gate.timed_out
        after = _speech(s.url, input="Still serving.", response_format="pcm")  # the server goes on
        assert after.status_code == 200 and pcm_of(after.content, "pcm").size > 0
        # sentence 0 was sent; sentence 1 may have started (held at the gate) before the client left; 2-4 never
        # reached a batch (every batch after the first waits at the gate until the request is cancelled)
        assert s.log.rows_of(rid) in ([0], [0, 1]), [info.rows for info, _ in s.log.batches]
        assert httpx.get(f"{s.url}/health").json()["cancelled"] == 1


@pytest.mark.parametrize("body, status, param, words", [
    ({"voice": VOICE}, 422, "input", "required"),
    ({"input": ""}, 422, "input", "at least 1"),
    ({"input": "   "}, 400, "input", "empty"),
    ({"input": "x" * 4097}, 422, "input", "4096"),
    ({"input": "Hi.", "voice": "nobody"}, 400, "voice", "unknown voice 'nobody'"),
    ({"input": "Hi.", "speed": 1.5}, 400, "speed", "only 1.0"),
    ({"input": "Hi.", "response_format": "ogg"}, 422, "response_format", "'ogg'"),
    ({"input": "Hi.", "response_format": "aac"}, 400, "response_format", "not available"),
    ({"input": "Hi.", "stream_format": "sse", "response_format": "flac"}, 400, "stream_format", "written whole"),
    ({"input": "Hi.", "stream_format": "chunks"}, 422, "stream_format", "'chunks'"),
    ({"input": "Hi.", "seed": -1}, 422, "seed", "greater than or equal to 0"),
    ({"input": "Hi.", "temperature": 0.5}, 400, "temperature", "greedy"),
    ({"input": "Hi.", "greedy": False, "temperature": 0}, 422, "temperature", "greater than 0"),
    ({"input": "Hi.", "model": "whisper-1"}, 400, "model", "'whisper-1'"),
    ({"input": "Hi.", "volume": 3}, 422, "volume", "unknown field"),
    ({"input": "Hi.", "instructions": "whisper"}, 400, "instructions", "no instructions"),
])
def test_a_bad_body_is_refused_naming_the_field(server, body, status, param, words):
    full = {"voice": VOICE, "greedy": True, **body}
    if "input" not in body:
        full.pop("greedy")
    response = httpx.post(f"{server.url}/v1/audio/speech", json=full, timeout=30)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["param"] == param and words in error["message"], error
    assert error["message"].startswith(f"{param}:") and "\n" not in error["message"]


def test_a_body_that_is_not_json_is_refused(server):
    response = httpx.post(f"{server.url}/v1/audio/speech", content=b"{not json", timeout=30,
                          headers={"Content-Type": "application/json"})
    assert response.status_code == 422 and "not a JSON object" in response.json()["error"]["message"]


def test_a_generation_error_fails_that_request_only(tiny):
    with serving(tiny[1], max_batch=8, max_wait=0.5) as s:
        generate = s.engine._generate

        def failing(batch):  # a fault in generation that only the row saying "explode" hits, also alone
            if any("explode" in job.text for job in batch):
                raise RuntimeError("the model exploded\non two lines")
            return generate(batch)

        s.engine._generate = failing
        results = {}

        def client(name, text):
            results[name] = _speech(s.url, input=text, response_format="pcm")

        threads = [threading.Thread(target=client, args=(n, t)) for n, t in
                   (("bad", "Please explode now."), ("good", "Please speak now."))]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        bad, good = results["bad"], results["good"]
        assert bad.status_code == 500, bad.text
        message = bad.json()["error"]["message"]
        assert message == "generation failed: RuntimeError: the model exploded on two lines"
        assert good.status_code == 200 and pcm_of(good.content, "pcm").size > 0
        np.testing.assert_array_equal(pcm_of(good.content, "pcm"), _alone(s.engine, "Please speak now.",
                                                                          generate_kwargs={"do_sample": False}))
        assert _speech(s.url, input="And again.").status_code == 200
        health = httpx.get(f"{s.url}/health").json()
        assert health["status"] == "ok" and health["failed"] == 1


@pytest.mark.parametrize("stream_format", ["audio", "sse"])
def test_a_sentence_failing_after_the_first_cuts_the_stream(tiny, stream_format):
    """The status went out with the first sentence: a later failure ends an SSE stream with an error event and cuts
    an audio stream before its final chunk (the client sees an incomplete response, not a short file)."""
    with serving(tiny[1], max_batch=1) as s:
        generate = s.engine._generate

        def failing(batch):
            if any("explode" in job.text for job in batch):
                raise RuntimeError("the model exploded")
            return generate(batch)

        s.engine._generate = failing
        body = {"input": "First is fine. Then explode.", "voice": VOICE, "greedy": True, "response_format": "pcm",
                "stream_format": stream_format}
        with httpx.stream("POST", f"{s.url}/v1/audio/speech", json=body, timeout=60) as response:
            assert response.status_code == 200
            if stream_format == "sse":
                events = [json.loads(line[6:]) for line in response.iter_lines() if line.startswith("data: ")]
                assert [e["type"] for e in events] == ["speech.audio.delta", "error"]
                assert events[1]["error"]["message"] == "generation failed: RuntimeError: the model exploded"
            else:
                with pytest.raises(httpx.RemoteProtocolError):
                    for _ in response.iter_raw():
                        pass
        assert _speech(s.url, input="Still here.").status_code == 200
        assert httpx.get(f"{s.url}/health").json()["failed"] == 1


def test_models_voices_health_and_page(server):
    models = httpx.get(f"{server.url}/v1/models").json()
    assert models["object"] == "list" and models["data"][0]["id"] == "tiny-bark"
    voices = httpx.get(f"{server.url}/v1/audio/voices").json()
    assert voices["voices"] == [VOICE] and voices["default"] is None
    assert {"wav", "pcm"} <= set(voices["response_formats"])
    health = httpx.get(f"{server.url}/health").json()
    assert health["status"] == "ok" and health["model"] == "tiny-bark" and health["queue_depth"] == 0
    assert health["max_batch"] == 8 and health["device"] == "cpu"
    page = httpx.get(f"{server.url}/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert '<audio id="player"' in page.text and 'id="play"' in page.text


# -- the command ---------------------------------------------------------------------------------------------------


def _env() -> dict:
    return dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), str(ROOT / "tests")]), PYTHONUNBUFFERED="1")


def test_serve_command_bad_options_are_one_line(tmp_path, capsys):
    from bark.cli.serve import serve_main

    assert serve_main(["--port", "70000"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--port" in err and "65535" in err
    assert serve_main(["--max-wait-ms", "-1"]) == 2
    assert "milliseconds" in capsys.readouterr().err
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        assert serve_main(["--model", "random", "--port", str(port)]) == 1
        err = capsys.readouterr().err
        assert err.startswith(f"bark-kernels serve: error: --host 127.0.0.1 --port {port}: cannot listen there")
        assert err.count("\n") == 1
    assert serve_main(["--model", "random", "--port", "0", "--voices-dir", str(tmp_path / "nope")]) == 1
    assert "--voices-dir" in capsys.readouterr().err
    assert serve_main(["--model", "random", "--port", "0", "--voice", "nobody"]) == 1
    assert "--voice: 'nobody'" in capsys.readouterr().err


def test_sigterm_finishes_the_requests_in_flight_then_exits(tiny, tmp_path):
    path, _ = tiny
    voices = tmp_path / "voices"
    voices.mkdir()
    np.savez(voices / "mine.npz", **voice())
    command = [sys.executable, "-c", "import sys; from bark.cli.serve import serve_main; sys.exit(serve_main())",
               "--model", str(path), "--port", "0", "--voices-dir", str(voices), "--voice", "mine", "--max-batch", "1",
               "--greedy", "--semantic-max-new-tokens", "12", "--attn", "eager", "--log-level", "warning"]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env(),
                               cwd=tmp_path)
    try:
        url = None
        for line in process.stdout:
            match = re.match(r"serving (http://127\.0\.0\.1:\d+)", line)
            if match:
                url = match.group(1)
                break
        assert url is not None, process.stderr.read()
        results: dict = {}

        voices = httpx.get(f"{url}/v1/audio/voices").json()
        assert voices["voices"] == ["mine", PRESET] and voices["default"] == "mine"

        def client(i):  # the default voice (--voice mine), or the checkpoint's preset by name
            body = {"input": f"Request {i}. It has four sentences. One more. The last.", "response_format": "wav"}
            results[i] = httpx.post(f"{url}/v1/audio/speech", timeout=120,
                                    json={**body, "voice": PRESET} if i == 0 else body)

        threads = [threading.Thread(target=client, args=(i,)) for i in range(3)]
        for t in threads:
            t.start()
        _wait_for(lambda: httpx.get(f"{url}/health").json()["requests"] == 3, what="three requests accepted")
        in_flight = httpx.get(f"{url}/health").json()["queue_depth"]
        process.send_signal(signal.SIGTERM)
        for t in threads:
            t.join(120)
        out, err = process.communicate(timeout=120)
    finally:
        if process.poll() is None:
            process.kill()
            process.communicate()
    assert process.returncode == 0, err
    assert in_flight >= 2  # 12 sentences one at a time: most of them were still to come at SIGTERM
    for i in range(3):
        assert results[i].status_code == 200, results[i].text
        assert int(results[i].headers["X-Pieces"]) == 4 and pcm_of(results[i].content, "wav").size > 0
    assert "stopped: 3 requests served, 0 failed, 0 cancelled" in out, out
    assert "Traceback" not in err, err
    with pytest.raises(httpx.ConnectError):
        httpx.get(f"{url}/health", timeout=5)
