"""bark.cli: ``bark-kernels speak`` on a tiny saved random Bark checkpoint (and the built-in random model path)."""

from __future__ import annotations

import argparse
import os
import wave

import numpy as np
import pytest
import torch

from bark.cli import speak as cli
from bark.cli import add_speak_parser, speak_main, write_wav_atomic

pytest.importorskip("transformers")
from bark_tiny import random_voice_preset, save_tiny_speak_checkpoint, tiny_random_bark_config  # noqa: E402

FAST = ["--semantic-max-new-tokens", "12", "--quiet", "--device", "cpu"]


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return save_tiny_speak_checkpoint(tmp_path_factory.mktemp("tiny_bark"))


def _read_wav(path):
    with wave.open(str(path), "rb") as w:
        assert w.getnchannels() == 1
        assert w.getsampwidth() == 2
        assert w.getframerate() == 24_000
        assert w.getcomptype() == "NONE"
        return np.frombuffer(w.readframes(w.getnframes()), dtype="<i2")


def _leftovers(directory):
    return sorted(p.name for p in directory.iterdir() if p.name.endswith(".tmp") or p.name.startswith("."))


def test_speak_writes_the_models_audio(tiny_dir, tmp_path, capsys):
    out = tmp_path / "out.wav"
    threads = str(torch.get_num_threads())  # same thread count as the reference run below: same float sums
    rc = speak_main(
        [
            "hello world.",
            "-o",
            str(out),
            "--model",
            str(tiny_dir),
            "--seed",
            "3",
            "--threads",
            threads,
            "--voice",
            "v2/en_speaker_0",
            *FAST,
        ]
    )
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    pcm = _read_wav(out)
    assert pcm.size > 0 and pcm.size % 320 == 0  # whole codec frames
    assert np.abs(pcm).max() > 0
    assert _leftovers(tmp_path) == []
    for word in ("semantic", "coarse", "fine", "codec", "real-time factor", "attention"):
        assert word in captured.out
    assert "did not run" not in captured.out  # every stage was seen by the progress / timing hooks
    assert "NOISE" not in captured.out  # a checkpoint, not the built-in random model

    # The WAV holds exactly what the model generates for the same inputs and seed (16-bit rounding aside), with the
    # front ends' default recipe, suno's.
    import bark

    model = bark.BarkModel.from_pretrained(str(tiny_dir))
    processor = bark.BarkProcessor.from_pretrained(str(tiny_dir))
    inputs = processor(["hello world."], voice_preset="v2/en_speaker_0")
    audio, lengths = model.generate(  # the run's one piece samples from its own stream: piece_seed(--seed, 0)
        inputs["input_ids"],
        attention_mask=inputs["attention_mask"],
        history_prompt=inputs["history_prompt"],
        return_output_lengths=True,
        do_sample=True,
        semantic_max_new_tokens=12,
        row_seeds=[bark.longform.piece_seed(3, 0)],
        recipe="suno",
    )
    expected = np.round(np.clip(audio[0, : lengths[0]].numpy(), -1, 1) * 32767).astype(np.int16)
    assert np.array_equal(pcm, expected)
    assert captured.out.splitlines()[0].startswith("recipe: suno (")  # says so first, with no --recipe


def test_speak_recipe_transformers_is_barkmodel_generate(tiny_dir, tmp_path, capsys):
    """--recipe transformers: the first line says it, and the WAV is BarkModel.generate's (its default recipe)."""
    import bark

    out = tmp_path / "out.wav"
    threads = str(torch.get_num_threads())
    rc = speak_main(["hello world.", "-o", str(out), "--model", str(tiny_dir), "--seed", "3", "--threads", threads,
                     "--voice", "v2/en_speaker_0", "--recipe", "transformers", *FAST])
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    assert captured.out.splitlines()[0].startswith("recipe: transformers (")
    model = bark.BarkModel.from_pretrained(str(tiny_dir))
    inputs = bark.BarkProcessor.from_pretrained(str(tiny_dir))(["hello world."], voice_preset="v2/en_speaker_0")
    audio, lengths = model.generate(inputs["input_ids"], attention_mask=inputs["attention_mask"],
                                    history_prompt=inputs["history_prompt"], return_output_lengths=True,
                                    do_sample=True, semantic_max_new_tokens=12,
                                    row_seeds=[bark.longform.piece_seed(3, 0)])
    expected = np.round(np.clip(audio[0, : lengths[0]].numpy(), -1, 1) * 32767).astype(np.int16)
    assert np.array_equal(_read_wav(out), expected)


def test_batch_file_and_voice_preset(tiny_dir, tmp_path, capsys):
    texts = tmp_path / "texts.txt"
    texts.write_text("hello world\n\nthe bark!\n", encoding="utf-8")
    voice = tmp_path / "voice.npz"
    np.savez(voice, **random_voice_preset(seed=1))
    out = tmp_path / "speech.wav"
    rc = speak_main(
        [
            "--batch-file",
            str(texts),
            "-o",
            str(out),
            "--model",
            str(tiny_dir),
            "--voice",
            str(voice),
            "--greedy",
            "--attn",
            "eager",
            *FAST,
        ]
    )
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    assert not out.exists()
    for name in ("speech_000.wav", "speech_001.wav"):
        assert _read_wav(tmp_path / name).size > 0
    assert not (tmp_path / "speech_002.wav").exists()
    assert "eager (--attn eager)" in captured.out
    assert _leftovers(tmp_path) == []


def test_builtin_random_model_when_no_checkpoint(tmp_path, capsys, monkeypatch):
    import bark.config

    # No cached suno/bark-small: the built-in random model runs (shrunk here to keep the test fast) and says so.
    monkeypatch.setattr(bark.hub, "hub_cached", lambda repo_id: False)
    monkeypatch.setattr(bark.config, "bark_small_config", tiny_random_bark_config)
    out = tmp_path / "noise.wav"
    rc = speak_main(["hello", "-o", str(out), "--quiet", "--device", "cpu"])
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    assert "random model" in captured.out and "NOISE" in captured.out
    assert f"semantic_max_new_tokens: {cli.RANDOM_MODEL_SEMANTIC_MAX_NEW_TOKENS}" in captured.out
    assert _read_wav(out).size > 0


@pytest.mark.parametrize(
    "argv_tail, code, message",
    [
        (["hello"], 2, "-o/--output"),  # no output path (argparse)
        (["-o", "{out}", "--model", "{model}"], 1, "nothing to speak"),
        (["   ", "-o", "{out}", "--model", "{model}"], 1, "text: empty"),
        (["hi", "-o", "{out}", "--model", "{model}", "--attn", "magic"], 2, "--attn"),
        (["hi", "-o", "{out}", "--model", "{model}", "--semantic-max-new-tokens", "0"], 2, "positive integer"),
        (["hi", "-o", "{out}", "--model", "{model}", "--seed", "-1"], 2, "--seed"),
        (["hi", "-o", "{out}", "--model", "{tmp}/no_such_checkpoint"], 1, "no_such_checkpoint"),
        (["hi", "-o", "{out}", "--model", "{model}", "--voice", "{tmp}/missing.npz"], 1, "missing.npz"),
        (["hi", "-o", "{out}", "--model", "{model}", "--voice", "v2/en_speaker_9"], 1, "v2/en_speaker_9"),
        (["hi", "-o", "{tmp}/no_dir/out.wav", "--model", "{model}"], 1, "does not exist"),
        (["hi", "-o", "{tmp}", "--model", "{model}"], 1, "is a directory"),
        (["hi", "-o", "{out}", "--model", "{model}", "--batch-file", "{tmp}/texts.txt"], 1, "not both"),
        (["-o", "{out}", "--model", "{model}", "--batch-file", "{tmp}/nope.txt"], 1, "nope.txt"),
        (["hi", "-o", "{out}", "--model", "{model}", "--device", "tpu"], 1, "--device"),
    ],
)
def test_bad_arguments_fail_cleanly(tiny_dir, tmp_path, capsys, argv_tail, code, message):
    (tmp_path / "texts.txt").write_text("hello\n", encoding="utf-8")
    out = tmp_path / "out.wav"
    argv = [a.format(out=out, model=tiny_dir, tmp=tmp_path) for a in argv_tail] + ["--quiet"]
    rc = speak_main(argv)
    err = capsys.readouterr().err
    assert rc == code
    assert message in err
    assert not out.exists()
    assert not (tmp_path / "no_dir").exists()
    assert _leftovers(tmp_path) == []


def test_cuda_requested_without_cuda(tiny_dir, tmp_path, capsys, monkeypatch):
    """Checked on every machine: CUDA is made to look absent (or present with one device) for the CLI."""
    out = tmp_path / "out.wav"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert speak_main(["hi", "-o", str(out), "--model", str(tiny_dir), "--device", "cuda"]) == 1
    assert "CUDA was requested but torch sees no CUDA device" in capsys.readouterr().err and not out.exists()
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert speak_main(["hi", "-o", str(out), "--model", str(tiny_dir), "--device", "cuda:1"]) == 1
    assert "only 1 CUDA device(s)" in capsys.readouterr().err and not out.exists()


def test_failed_write_leaves_nothing(tmp_path, monkeypatch):
    target = tmp_path / "x.wav"
    target.write_bytes(b"old content")

    def boom(self, data):
        raise OSError("disk full")

    monkeypatch.setattr(wave.Wave_write, "writeframes", boom)
    with pytest.raises(OSError, match="disk full"):
        write_wav_atomic(str(target), np.zeros(100))
    assert target.read_bytes() == b"old content"  # the previous file is untouched
    assert _leftovers(tmp_path) == []


def test_write_wav_atomic_pcm(tmp_path):
    path = tmp_path / "t.wav"
    n = write_wav_atomic(str(path), np.array([0.0, 0.5, -0.5, 1.0, -1.0, 2.0, np.nan]), 24_000)
    assert n == 7
    assert _read_wav(path).tolist() == [0, 16384, -16384, 32767, -32767, 32767, 0]
    umask = os.umask(0)
    os.umask(umask)
    assert os.stat(path).st_mode & 0o777 == 0o666 & ~umask  # a normal file's permissions, not mkstemp's 0600


def test_add_speak_parser():
    parser = argparse.ArgumentParser(prog="bark-kernels")
    sub = parser.add_subparsers(dest="command")
    add_speak_parser(sub)
    args = parser.parse_args(["speak", "hi", "-o", "x.wav", "--attn", "sdpa", "--seed", "7"])
    assert args.command == "speak" and args.text == "hi" and args.attn == "sdpa" and args.seed == 7
    assert args.func is cli.run_speak


def test_default_model_from_the_local_hf_cache(tiny_dir, tmp_path, capsys, monkeypatch):
    # No --model: suno/bark-small is used when the local Hugging Face cache has it (offline, no download).
    import shutil

    hub = pytest.importorskip("huggingface_hub")
    repo = tmp_path / "hub" / "models--suno--bark-small"
    shutil.copytree(tiny_dir, repo / "snapshots" / ("1" * 40))
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("1" * 40)
    monkeypatch.setattr(hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(hub.constants, "HF_HUB_OFFLINE", True)
    out = tmp_path / "cached.wav"
    rc = speak_main(["hello", "-o", str(out), *FAST])
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    assert "model:  suno/bark-small" in captured.out and "NOISE" not in captured.out
    assert _read_wav(out).size > 0
