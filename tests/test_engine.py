"""bark.Engine on a tiny random Bark with a letter-level tokenizer: callers on two threads and an asyncio task get,
each, exactly the pieces their requests get alone (greedy, and seeded sampling wherever a piece lands); a cancelled
request's rows leave the next batch; a failing request fails alone; a full queue refuses; close finishes or cancels
what is in flight; bad requests and options fail at submit / construction, naming the field."""

from __future__ import annotations

import asyncio
import threading

import numpy as np
import pytest
import torch

import bark
from bark.engine import BatchInfo, EngineClosedError, QueueFullError, RequestCancelled, SpeechRequest

pytest.importorskip("transformers")
import bark_tiny  # noqa: E402
from bark_tiny import rel_err  # noqa: E402

RTOL = 1e-5  # audio of a row decoded alone vs with others (same codes; the codec's sums may be ordered differently)
LETTERS = "abcdefghijklmnopqrstuvwxyz"
VOCAB = (["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + list(LETTERS) + list(LETTERS.upper())
         + ["##" + c for c in LETTERS + LETTERS.upper()] + list(".,;:!?'\""))
FAST = {"semantic_max_new_tokens": 10}
SAMPLED = {**FAST, "do_sample": True, "semantic_temperature": 0.9, "coarse_temperature": 0.9, "fine_temperature": 0.7}
GREEDY = {**FAST, "do_sample": False}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(model with a semantic EOS that makes pieces end at different steps, processor)."""
    path = tmp_path_factory.mktemp("tiny_engine")
    bark_tiny.save_tiny_bark(path, seed=3, hidden_size=32, num_layers=2, num_heads=2)
    (path / "vocab.txt").write_text("\n".join(VOCAB) + "\n", encoding="utf-8")
    (path / "tokenizer_config.json").write_text('{"do_lower_case": false}', encoding="utf-8")
    model = bark.BarkModel.from_pretrained(path, attn_implementation="eager")
    weight = model.semantic.lm_head.weight
    direction = torch.randn(weight.shape[1], generator=torch.Generator().manual_seed(0)) * weight.std()
    with torch.no_grad():
        weight[10_000] = 2.2 * direction
    return model, bark.BarkProcessor.from_pretrained(path)


def _voice(seed=1):
    return bark_tiny.random_voice_preset(seed=seed, n_semantic=30, n_coarse_frames=40)


REQUESTS = [  # (text, fields): a voice, no voice (the first piece becomes the voice), "previous" continuity
    ("The rain stopped. Birds began to sing again. We walked home.", {"voice": _voice(1)}),
    ("Was it worth it? Nobody knows!", {}),
    ("It was late. Goodnight, said the owl.", {"continuity": "previous", "voice": _voice(2)}),
]


def _alone(model, processor, text, fields, kwargs):
    """The pieces of one request on an engine of its own, one row per batch."""
    with bark.Engine(model, processor, max_batch=1, generate_kwargs=kwargs) as engine:
        return engine.submit(SpeechRequest(text, **fields)).result(timeout=120)


def _same(got, want, what):
    assert [p.text for p in got] == [p.text for p in want], what
    for g, w in zip(got, want, strict=True):
        for name in ("semantic", "coarse", "fine"):
            assert np.array_equal(getattr(g, name), getattr(w, name)), (what, g.piece_index, name)
        assert g.audio.shape == w.audio.shape, (what, g.piece_index)
        if w.audio.size:
            assert rel_err(torch.from_numpy(g.audio), torch.from_numpy(w.audio)) <= RTOL, (what, g.piece_index)


@pytest.mark.parametrize("kwargs, seeds", [(GREEDY, (None, None, None)), (SAMPLED, (11, 12, 2**63 - 1))],
                         ids=["greedy", "seeded-sampling"])
def test_threads_and_asyncio_each_get_their_pieces_alone(tiny, kwargs, seeds):
    model, processor = tiny
    requests = [SpeechRequest(text, seed=seed, **fields) for (text, fields), seed in zip(REQUESTS, seeds)]
    batches: list[BatchInfo] = []
    engine = bark.Engine(model, processor, max_batch=8, max_wait=0.2, generate_kwargs=kwargs,
                         on_batch=batches.append)
    results: dict[int, list] = {}
    start = threading.Barrier(3)

    def caller(i):
        start.wait()
        results[i] = list(engine.submit(requests[i]))

    async def async_caller():
        await asyncio.get_running_loop().run_in_executor(None, start.wait)
        return [piece async for piece in engine.submit(requests[2])]

    threads = [threading.Thread(target=caller, args=(i,)) for i in (0, 1)]
    for t in threads:
        t.start()
    results[2] = asyncio.run(async_caller())
    for t in threads:
        t.join(120)
    engine.close()
    assert engine.closed and engine.queue_depth == 0
    # the engine did batch across callers: some batch held rows of two requests or more
    assert any(len({rid for rid, _ in b.rows}) >= 2 for b in batches), batches
    for i, ((text, fields), request) in enumerate(zip(REQUESTS, requests, strict=True)):
        alone = _alone(model, processor, text, {**fields, "seed": request.seed}, kwargs)
        _same(results[i], alone, f"request {i}")
        assert [p.piece_index for p in results[i]] == list(range(len(alone)))
        assert sum(p.semantic.size for p in alone) > 0


def test_seeded_pieces_equal_stream_and_the_seed_matters(tiny):
    """Piece k of a request with seed s = piece k of bark.stream(seed=s) whatever its batch size; another seed
    samples other tokens."""
    model, processor = tiny
    text, fields = REQUESTS[0]
    with bark.Engine(model, processor, max_batch=4, generate_kwargs=SAMPLED) as engine:
        got = engine.submit(text, seed=5, **fields).result(timeout=120)
        other = engine.submit(text, seed=6, **fields).result(timeout=120)
    streamed = list(bark.stream(model, text, processor=processor, seed=5, batch_size=2, **fields, **SAMPLED))
    _same(got, streamed, "stream")
    assert any(not np.array_equal(a.coarse, b.coarse) for a, b in zip(got, other, strict=True))


class _Gate:
    """A request callback that holds the worker inside its first batch until released."""

    def __init__(self):
        self.entered, self.release = threading.Event(), threading.Event()

    def __call__(self, event):
        self.entered.set()
        assert self.release.wait(60)


def test_a_cancelled_request_frees_its_rows_at_the_next_batch(tiny):
    model, processor = tiny
    batches: list[BatchInfo] = []
    gate = _Gate()
    engine = bark.Engine(model, processor, max_batch=2, max_wait=0.5, generate_kwargs=GREEDY,
                         on_batch=batches.append)
    x, y = engine.submit_many([SpeechRequest("One. Two. Three. Four.", voice=_voice(), callback=gate),
                               SpeechRequest("Five. Six.", voice=_voice())])
    assert gate.entered.wait(60)
    x.cancel()
    gate.release.set()
    assert len(y.result(timeout=120)) == 2
    with pytest.raises(RequestCancelled):
        list(x)
    engine.close()
    rows = [b.rows for b in batches]
    assert rows == [((x.id, 0), (x.id, 1)), ((y.id, 0), (y.id, 1))], rows  # X's last two pieces never ran
    assert x.cancelled and x.finished and y.finished and engine.rows == 4


def test_a_failing_request_fails_alone(tiny, monkeypatch):
    model, processor = tiny
    from bark import longform

    real = longform._generate_chunk

    def poisoned(target, device, chunk, *args, **kwargs):
        if any("Poison" in job.text for job in chunk):
            raise RuntimeError("poisoned piece")
        return real(target, device, chunk, *args, **kwargs)

    monkeypatch.setattr(longform, "_generate_chunk", poisoned)
    batches: list[BatchInfo] = []
    with bark.Engine(model, processor, max_batch=4, generate_kwargs=GREEDY, on_batch=batches.append) as engine:
        good, bad, also = engine.submit_many([SpeechRequest("Fine words.", voice=_voice()),
                                              SpeechRequest("Poison here.", voice=_voice()),
                                              SpeechRequest("More words. And more.", voice=_voice())])
        assert len(good.result(timeout=120)) == 1 and len(also.result(timeout=120)) == 2
        with pytest.raises(RuntimeError, match="poisoned piece"):
            bad.result(timeout=120)
    assert isinstance(bad.error, RuntimeError) and good.error is None and also.error is None
    assert len(batches) == 1 and len(batches[0].rows) == 4  # one batch, its rows re-run one by one after the failure


def test_a_full_queue_refuses_with_a_clear_error(tiny):
    model, processor = tiny
    gate = _Gate()
    engine = bark.Engine(model, processor, max_batch=2, max_queue=2, generate_kwargs=GREEDY)
    try:
        first = engine.submit("Hold on.", voice=_voice(), callback=gate)
        assert gate.entered.wait(60)
        second = engine.submit("Wait.", voice=_voice())
        with pytest.raises(QueueFullError, match=r"2 requests unfinished \(max_queue=2\); retry later") as info:
            engine.submit("One more.", voice=_voice())
        assert info.value.retry_after >= 1.0
        with pytest.raises(QueueFullError, match="max_queue=2"):
            engine.submit_many(["A.", "B."])
        assert engine.queue_depth == 2
    finally:
        gate.release.set()
    assert len(first.result(timeout=120)) == 1 and len(second.result(timeout=120)) == 1
    third = engine.submit("Now there is room.", voice=_voice())  # finished requests free their places
    assert len(third.result(timeout=120)) == 1
    engine.close()


def test_close_finishes_or_cancels_requests_in_flight(tiny):
    model, processor = tiny
    engine = bark.Engine(model, processor, max_batch=2, generate_kwargs=GREEDY)
    handles = [engine.submit(text, voice=_voice()) for text in ("One. Two.", "Three.", "Four. Five. Six.")]
    engine.close()  # finish them
    assert engine.closed
    assert [len(h.result(timeout=1)) for h in handles] == [2, 1, 3]
    with pytest.raises(EngineClosedError):
        engine.submit("Too late.")

    gate = _Gate()
    engine = bark.Engine(model, processor, max_batch=1, generate_kwargs=GREEDY)
    running = engine.submit("Running now.", voice=_voice(), callback=gate)
    assert gate.entered.wait(60)
    waiting = engine.submit("Never started. Nor this.", voice=_voice())
    closer = threading.Thread(target=engine.close, kwargs={"cancel": True})
    closer.start()
    while not engine._closing:
        pass
    gate.release.set()
    closer.join(60)
    assert engine.closed and not closer.is_alive()
    for handle in (running, waiting):
        with pytest.raises(RequestCancelled):
            handle.result(timeout=1)
    assert engine.rows == 1  # the running batch ended; nothing else ran


def test_progress_per_batch_and_per_request(tiny):
    model, processor = tiny
    engine_events, request_events = [], []
    with bark.Engine(model, processor, max_batch=4, generate_kwargs=GREEDY,
                     callback=lambda info, event: engine_events.append(event)) as engine:
        handle = engine.submit("First one. Second one.", voice=_voice(), callback=request_events.append)
        other = engine.submit("Someone else.", voice=_voice())
        assert len(handle) == handle.pieces_total == 2
        handle.result(timeout=120)
        other.result(timeout=120)
        assert handle.pieces_done == 2
    stages = [(e.stage, e.kind) for e in request_events if e.kind != "progress"]
    assert stages[:2] == [("semantic", "start"), ("semantic", "end")] and ("codec", "end") in stages
    assert len(engine_events) >= len(request_events) > 0


def test_bad_requests_fail_at_submit_naming_the_field(tiny):
    model, processor = tiny
    with bark.Engine(model, processor, generate_kwargs=GREEDY) as engine:
        cases = [
            (SpeechRequest(""), ValueError, "text: empty"),
            (SpeechRequest(3), TypeError, "text: expected a str"),
            (SpeechRequest("Hi.", voice=3.5), TypeError, "voice: expected"),
            (SpeechRequest("Hi.", continuity="next"), ValueError, "continuity: expected one of"),
            (SpeechRequest("Hi.", seed=-1), ValueError, "seed: expected an int >= 0"),
            (SpeechRequest("Hi.", max_tokens=999), ValueError, r"max_tokens: expected an int in \[1, "),
            (SpeechRequest("Hi.", generate_kwargs={"generator": torch.Generator()}), TypeError, "generator"),
            (SpeechRequest("Hi.", generate_kwargs={"row_seeds": [1]}), TypeError, "row_seeds"),
            (SpeechRequest("Hi.", generate_kwargs={"tempreature": 0.5}), TypeError, "tempreature"),
            (SpeechRequest("Hi.", callback=3), TypeError, "callback: expected a callable"),
            (SpeechRequest("Hi.", split="yes"), TypeError, "split: expected True or False"),
            ("not a request", None, None),
        ]
        for request, error, match in cases[:-1]:
            with pytest.raises(error, match=match):
                engine.submit(request)
        with pytest.raises(TypeError, match=r"requests\[1\]: expected a bark.SpeechRequest"):
            engine.submit_many([SpeechRequest("Hi."), 7])
        assert engine.queue_depth == 0  # nothing was queued by a refused submit
    for kwargs, match in (({"max_batch": 0}, "max_batch"), ({"max_wait": -1}, "max_wait"),
                          ({"decode_mode": "fast"}, "decode_mode"), ({"generate_kwargs": {"bogus": 1}}, "bogus")):
        with pytest.raises((ValueError, TypeError), match=match):
            bark.Engine(model, processor, **kwargs)


def test_from_options_loads_and_checks_before_loading(monkeypatch):
    import bark.config
    from bark_tiny import tiny_random_bark_config

    monkeypatch.setattr(bark.config, "bark_small_config", tiny_random_bark_config)
    with bark.Engine.from_options(bark.EngineOptions(model="random", device="cpu", max_batch=3,
                                                     generate_kwargs=GREEDY), threads=torch.get_num_threads()) as e:
        assert e.loaded.random and e.max_batch == 3 and isinstance(e.processor, bark.longform.ByteTextEncoder)
        assert len(e.submit("Noise, twice. Yes.").result(timeout=120)) == 2
    for fields, match in (({"dtype": "float8"}, "dtype: expected one of"), ({"attn": "magic"}, "attn"),
                          ({"threads": 0}, "threads"), ({"decode_mode": "x"}, "decode_mode")):
        with pytest.raises(bark.OptionError, match=match):
            bark.EngineOptions(**fields)
    with pytest.raises(bark.OptionError, match="device"):
        bark.Engine.from_options(model="random", device="tpu")
    with pytest.raises(bark.OptionError, match="model /no/such/checkpoint"):
        bark.Engine.from_options(model="/no/such/checkpoint", device="cpu")
