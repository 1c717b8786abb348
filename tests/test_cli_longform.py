"""``bark-kernels speak`` with a long text (bark.cli.longform): one WAV of every piece, written as pieces finish and
valid when the run is interrupted; --wav-per-piece, --save-voice, --offload, --continuity; argument errors."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import wave

import numpy as np
import pytest

import bark
from bark.cli import speak_main
from bark.voice import load_voice
from bark.wav import to_pcm16

pytest.importorskip("transformers")
from bark_tiny import random_voice_preset, save_tiny_bark  # noqa: E402
from test_longform import SENTENCES, TEXT, VOCAB  # noqa: E402

FAST = ["--semantic-max-new-tokens", "8", "--quiet", "--device", "cpu", "--greedy"]
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny_speak_long")
    save_tiny_bark(path)
    (path / "vocab.txt").write_text("\n".join(VOCAB) + "\n", encoding="utf-8")
    (path / "tokenizer_config.json").write_text('{"do_lower_case": false}', encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def story(tmp_path_factory):
    path = tmp_path_factory.mktemp("story") / "story.txt"
    path.write_text(TEXT.replace(". ", ".\n", 3), encoding="utf-8")  # wrapped lines are spaces
    return path


def _read_wav(path):
    with wave.open(str(path), "rb") as w:
        assert (w.getnchannels(), w.getsampwidth(), w.getframerate()) == (1, 2, 24_000)
        return np.frombuffer(w.readframes(w.getnframes()), dtype="<i2")


def _api(tiny_dir, text, **kwargs):
    model = bark.BarkModel.from_pretrained(str(tiny_dir))
    processor = bark.BarkProcessor.from_pretrained(str(tiny_dir))
    return bark.synthesize(model, text, processor=processor, semantic_max_new_tokens=8, do_sample=False,
                           return_pieces=True, order="text", **kwargs)  # the CLI streams: chunks in text order


def test_text_file_becomes_one_wav_of_every_piece(tiny_dir, story, tmp_path, capsys):
    out = tmp_path / "story.wav"
    voice = tmp_path / "voice.npz"
    np.savez(voice, **random_voice_preset(seed=4))
    rc = speak_main(["--text-file", str(story), "-o", str(out), "--model", str(tiny_dir), "--voice", str(voice),
                     "--batch-size", "5", "--pause", "0.05", "--save-voice", str(tmp_path / "me.npz"), *FAST])
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    audio, pieces = _api(tiny_dir, TEXT, voice=str(voice), batch_size=5, pause=0.05)
    assert len(pieces) == 13
    assert np.array_equal(_read_wav(out), to_pcm16(audio))  # every piece, in order, with the pauses
    for word in ("13 pieces", "semantic", "coarse", "fine", "codec", "real-time factor", "attention",
                 "in 3 generate call(s)", "saved voice"):
        assert word in captured.out, word
    saved = load_voice(tmp_path / "me.npz")  # --save-voice: the last piece's generation
    for key, value in pieces[-1].voice().items():
        assert np.array_equal(saved[key], value)
    assert not [p for p in os.listdir(tmp_path) if p.endswith(".tmp")]


def test_wav_per_piece_previous_continuity_and_offload_note(tiny_dir, tmp_path, capsys):
    text = " ".join(SENTENCES[:3])
    out = tmp_path / "p.wav"
    rc = speak_main([text, "-o", str(out), "--model", str(tiny_dir), "--wav-per-piece", "--continuity", "previous",
                     "--offload", *FAST])
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    assert "offload" in captured.out and "no-op" in captured.out  # this machine has no CUDA (or says what it did)
    _, pieces = _api(tiny_dir, text, continuity="previous")
    assert not out.exists()
    for i, piece in enumerate(pieces):
        assert np.array_equal(_read_wav(tmp_path / f"p_{i:03d}.wav"), to_pcm16(piece.audio))
    assert not (tmp_path / f"p_{len(pieces):03d}.wav").exists()


def test_interrupted_run_keeps_a_valid_wav_of_the_finished_pieces(tiny_dir, tmp_path, capsys, monkeypatch):
    from bark import generation

    real = generation.generate
    calls = []

    def generate(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt  # Ctrl-C while the third piece is being generated
        return real(*args, **kwargs)

    monkeypatch.setattr(generation, "generate", generate)
    out = tmp_path / "cut.wav"
    text = " ".join(SENTENCES[:4])
    rc = speak_main([text, "-o", str(out), "--model", str(tiny_dir), "--batch-size", "1", *FAST])
    err = capsys.readouterr().err
    assert rc == 130 and "complete WAV of the 2 finished piece(s) of 4" in err
    monkeypatch.setattr(generation, "generate", real)
    _, pieces = _api(tiny_dir, text, batch_size=1)
    expected = np.concatenate([to_pcm16(pieces[0].audio), np.zeros(6000, dtype="<i2"), to_pcm16(pieces[1].audio)])
    assert np.array_equal(_read_wav(out), expected)


def test_killed_process_leaves_a_playable_wav(tiny_dir, tmp_path):
    """A real process interrupted (SIGINT) once its WAV exists: exit code 130 and a valid WAV of whole pieces. Each
    piece's generate is made to take 0.3 s longer in that process, so the signal (sent within 50 ms of the WAV's first
    piece) always finds pieces still to come: the test never depends on the machine's speed."""
    out = tmp_path / "live.wav"
    text = " ".join(SENTENCES * 3)
    code = ("import sys, time; from bark import generation; real = generation.generate; "
            "generation.generate = lambda *a, **k: (time.sleep(0.3), real(*a, **k))[1]; "
            "from bark.cli import speak_main; "
            f"sys.exit(speak_main({[text, '-o', str(out), '--model', str(tiny_dir), '--batch-size', '1', *FAST]!r}))")
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while not out.exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert out.exists(), proc.communicate(timeout=30)
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    pcm = _read_wav(out)
    assert proc.returncode == 130, err
    assert "complete WAV of the" in err
    assert not [p for p in os.listdir(tmp_path) if p.endswith(".tmp")]
    # whole pieces with their pauses, as the uninterrupted run would have begun (greedy; batched here for speed:
    # rows equal alone, so at most a rounding step apart)
    audio, pieces = _api(tiny_dir, text, batch_size=12)
    ends = np.cumsum([p.audio.shape[0] + (6000 if i else 0) for i, p in enumerate(pieces)])
    assert pcm.size in set(ends.tolist()), (pcm.size, ends[:5])
    assert np.abs(pcm.astype(np.int32) - to_pcm16(audio)[: pcm.size]).max() <= 1


@pytest.mark.parametrize("argv_tail, code, message", [
    (["--text-file", "{tmp}/nope.txt"], 1, "nope.txt"),
    (["hi", "--text-file", "{tmp}/text.txt"], 1, "not both"),
    (["--text-file", "{tmp}/empty.txt"], 1, "is empty"),
    (["--batch-file", "{tmp}/text.txt", "--save-voice", "{tmp}/v.npz"], 1, "--save-voice"),
    (["--batch-file", "{tmp}/text.txt", "--text-file", "{tmp}/text.txt"], 1, "--text-file"),
    (["hi", "--max-piece-tokens", "300"], 2, "[1, 256]"),
    (["hi", "--pause", "-1"], 2, "--pause"),
    (["hi", "--continuity", "random"], 2, "--continuity"),
    (["hi", "--save-voice", "{tmp}/no_dir/v.npz"], 1, "does not exist"),
    (["hi", "--save-voice", "{tmp}"], 1, "is a directory"),
])
def test_long_text_argument_errors(tiny_dir, tmp_path, capsys, argv_tail, code, message):
    (tmp_path / "text.txt").write_text("hello\n", encoding="utf-8")
    (tmp_path / "empty.txt").write_text(" \n", encoding="utf-8")
    out = tmp_path / "out.wav"
    argv = [a.format(tmp=tmp_path) for a in argv_tail] + ["-o", str(out), "--model", str(tiny_dir), "--quiet"]
    rc = speak_main(argv)
    err = capsys.readouterr().err
    assert rc == code and message in err
    assert not out.exists() and not (tmp_path / "v.npz").exists()


def test_random_model_long_text(tmp_path, capsys, monkeypatch):
    """The built-in random model has no tokenizer: pieces are counted in bytes, and its voice .npz works."""
    from bark_tiny import tiny_random_bark_config

    import bark.config

    monkeypatch.setattr(bark.hub, "hub_cached", lambda repo_id: False)
    monkeypatch.setattr(bark.config, "bark_small_config", tiny_random_bark_config)
    out = tmp_path / "noise.wav"
    rc = speak_main([" ".join(SENTENCES[:3]), "-o", str(out), "--quiet", "--device", "cpu",
                     "--semantic-max-new-tokens", "6", "--save-voice", str(tmp_path / "v")])
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    assert "NOISE" in captured.out and "3 pieces" in captured.out
    assert _read_wav(out).size > 0 and (tmp_path / "v.npz").exists()
    rc = speak_main(["Again.", "-o", str(out), "--quiet", "--device", "cpu", "--semantic-max-new-tokens", "6",
                     "--voice", str(tmp_path / "v.npz")])
    assert rc == 0, capsys.readouterr().err
