"""Support for the server's tests (tests/test_serve*.py): a tiny random Bark, an engine over it, and a real uvicorn
server on 127.0.0.1 and an ephemeral port, in a thread of the test process, stopped by the test."""

from __future__ import annotations

import contextlib
import json
import socket
import threading
import time

import numpy as np
import torch

import bark
import bark_tiny
from bark.longform import ByteTextEncoder

SEMANTIC_TOKENS = 12  # semantic tokens per sentence at most: a sentence is generated in ~0.1 s on a CPU
VOICE = "tiny"  # the name the server knows the test voice by
PRESET = "v2/tiny_speaker"  # the tiny checkpoint's one voice preset (the same arrays)
LETTERS = "abcdefghijklmnopqrstuvwxyz"
VOCAB = (["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + list(LETTERS) + list(LETTERS.upper())
         + ["##" + c for c in LETTERS + LETTERS.upper()] + list(".,;:!?'\""))


def tiny_checkpoint(path) -> None:
    """A tiny random checkpoint with a letter-level tokenizer (so ``bark-kernels serve --model PATH`` loads it)."""
    bark_tiny.save_tiny_bark(path, seed=3, hidden_size=32, num_layers=2, num_heads=2)
    (path / "vocab.txt").write_text("\n".join(VOCAB) + "\n", encoding="utf-8")
    (path / "tokenizer_config.json").write_text('{"do_lower_case": false}', encoding="utf-8")
    (path / "speaker_embeddings").mkdir()
    table = {}
    for key, array in voice().items():  # one named preset, PRESET: the test voice
        np.save(path / "speaker_embeddings" / f"tiny_{key}.npy", array)
        table[key] = f"speaker_embeddings/tiny_{key}.npy"
    (path / "speaker_embeddings_path.json").write_text(json.dumps({PRESET: table}), encoding="utf-8")


def tiny_model(path):
    """The checkpoint's model, with a semantic EOS that the text steers: sentences end after different numbers of
    tokens (rows of a batch end at their own steps)."""
    model = bark.BarkModel.from_pretrained(path, attn_implementation="eager")
    weight = model.semantic.lm_head.weight
    direction = torch.randn(weight.shape[1], generator=torch.Generator().manual_seed(0)) * weight.std()
    with torch.no_grad():
        weight[10_000] = 2.2 * direction
    return model


def voice() -> dict:
    return bark_tiny.random_voice_preset(seed=1, n_semantic=30, n_coarse_frames=40)


class BatchLog:
    """Every batch the engine ran (bark.BatchInfo) with the time it ended (perf_counter)."""

    def __init__(self) -> None:
        self.batches: list[tuple[bark.engine.BatchInfo, float]] = []

    def __call__(self, info) -> None:
        self.batches.append((info, time.perf_counter()))

    def rows_of(self, request_id: int) -> list[int]:
        return [piece for info, _ in self.batches for rid, piece in info.rows if rid == request_id]

    def since(self, start: int) -> list:
        return [info for info, _ in self.batches[start:]]


class Gate:
    """An engine callback that holds the worker at the first stage event of batch ``from_batch`` and of every later one
    until :meth:`open` (or ``timeout`` seconds: then ``timed_out``)."""

    def __init__(self, from_batch: int = 0, timeout: float = 30.0) -> None:
        self.from_batch, self.timeout = from_batch, timeout
        self.engine = None
        self.opened = threading.Event()
        self.timed_out = False
        self.waiting = threading.Event()

    def __call__(self, info, event) -> None:
        if self.engine is not None and self.engine.batches >= self.from_batch and not self.opened.is_set():
            self.waiting.set()
            if not self.opened.wait(self.timeout):
                self.timed_out = True
                self.opened.set()

    def open(self) -> None:
        self.opened.set()


class Server:
    """``create_app(engine)`` served by uvicorn on 127.0.0.1 and a port the OS picks, in a daemon thread."""

    def __init__(self, model, *, max_batch: int = 8, max_wait: float = 0.02, max_queue: int = 64, gate=None,
                 **settings) -> None:
        import uvicorn

        from bark.serve import ServeSettings, create_app

        self.log = BatchLog()
        self.engine = bark.Engine(model, ByteTextEncoder(), max_batch=max_batch, max_wait=max_wait,
                                  max_queue=max_queue, generate_kwargs={"semantic_max_new_tokens": SEMANTIC_TOKENS},
                                  callback=gate, on_batch=self.log)
        if gate is not None:
            gate.engine = self.engine
        settings.setdefault("voices", {VOICE: voice()})
        self.app = create_app(self.engine, ServeSettings(model_name="tiny-bark", **settings))
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(64)
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        self.server = uvicorn.Server(uvicorn.Config(self.app, log_level="warning", timeout_graceful_shutdown=10))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("the test server did not start")
            time.sleep(0.02)

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(30)
        self.engine.close(cancel=True, timeout=10)
        self.sock.close()


@contextlib.contextmanager
def serving(model, **kwargs):
    server = Server(model, **kwargs)
    try:
        yield server
    finally:
        server.stop()


def pcm_of(body: bytes, fmt: str) -> np.ndarray:
    """The int16 samples of a wav (streamed header checked) or pcm body."""
    if fmt == "wav":
        header = body[:44]
        assert header[:4] == b"RIFF" and header[8:16] == b"WAVEfmt " and header[36:40] == b"data", header
        channels, rate, bits = (int.from_bytes(header[22:24], "little"), int.from_bytes(header[24:28], "little"),
                                int.from_bytes(header[34:36], "little"))
        assert (channels, rate, bits) == (1, 24_000, 16)
        body = body[44:]
    assert len(body) % 2 == 0
    return np.frombuffer(body, dtype="<i2")
