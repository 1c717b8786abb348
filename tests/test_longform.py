"""bark.longform, bark.voice, bark.offload, bark.wav on a tiny random Bark with a letter-level tokenizer: a long text
becomes one recording whose pieces each equal that piece generated alone; streaming order; continuity; voice prompts
that round-trip; offload; a WAV that stays valid while it grows."""

from __future__ import annotations

import functools
import os
import struct
import wave

import numpy as np
import pytest
import torch

import bark
from bark.generation import generate_tokens
from bark.voice import VoiceRecorder, coarse_codebooks, load_voice, save_voice
from bark.wav import WavAppender, to_pcm16

pytest.importorskip("transformers")
import bark_tiny  # noqa: E402
from bark_tiny import rel_err  # noqa: E402

RTOL = 1e-5  # audio of a row decoded alone vs with others (same codes; the codec's sums may be ordered differently)
LETTERS = "abcdefghijklmnopqrstuvwxyz"
VOCAB = (["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + list(LETTERS) + list(LETTERS.upper())
         + ["##" + c for c in LETTERS + LETTERS.upper()] + list(".,;:!?'\""))
SEMANTIC_TOKENS = 14
# These tests compare long-form pieces with generate's defaults (recipe "transformers", greedy); the front ends
# default to suno's recipe (sampled), which tests/test_suno_recipe.py covers.
_synthesize = functools.partial(bark.synthesize, recipe="transformers")
_stream = functools.partial(bark.stream, recipe="transformers")

# 12 sentences, one of them longer than Bark's 256 text tokens (one token per letter with this vocabulary)
SENTENCES = [
    "The quick brown fox jumps over the lazy dog.",
    "Dr. Smith paid three dollars, e.g. for tea.",
    "Was it worth it?",
    "Nobody knows!",
    "She said \"maybe\" and then laughed.",
    ", ".join(["the long sentence keeps going and going"] * 9) + ".",
    "Wait... then what happened?",
    "The rain stopped.",
    "Birds began to sing again.",
    "We walked home slowly.",
    "It was late.",
    "Goodnight.",
]
TEXT = " ".join(SENTENCES)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(checkpoint dir, model with a semantic EOS that makes rows end at different steps, processor)."""
    path = tmp_path_factory.mktemp("tiny_longform")
    bark_tiny.save_tiny_bark(path, seed=3, hidden_size=32, num_layers=2, num_heads=2)
    (path / "vocab.txt").write_text("\n".join(VOCAB) + "\n", encoding="utf-8")
    (path / "tokenizer_config.json").write_text('{"do_lower_case": false}', encoding="utf-8")
    model = bark.BarkModel.from_pretrained(path, attn_implementation="eager")
    weight = model.semantic.lm_head.weight
    direction = torch.randn(weight.shape[1], generator=torch.Generator().manual_seed(0)) * weight.std()
    with torch.no_grad():
        weight[10_000] = 2.2 * direction  # EOS steered by the input: pieces end after different numbers of tokens
    return path, model, bark.BarkProcessor.from_pretrained(path)


def _voice():
    return bark_tiny.random_voice_preset(seed=1, n_semantic=30, n_coarse_frames=40)


def _alone(model, processor, text, history, **kwargs):
    enc = processor([text])
    history = None if history is None else bark_tiny.as_torch_preset(history)
    tokens = generate_tokens(model, enc["input_ids"], enc["attention_mask"], history_prompt=history,
                             semantic_max_new_tokens=SEMANTIC_TOKENS, **kwargs)
    audio = model.generate(enc["input_ids"], attention_mask=enc["attention_mask"], history_prompt=history,
                           semantic_max_new_tokens=SEMANTIC_TOKENS, **kwargs)
    return tokens, audio[0].numpy()


def _assert_piece_equals_alone(model, processor, piece, history):
    tokens, audio = _alone(model, processor, piece.text, history)
    gen = model.generation_config
    assert np.array_equal(piece.semantic, tokens["semantic"][0].numpy()), f"piece {piece.index}: semantic"
    assert np.array_equal(piece.coarse, coarse_codebooks(tokens["coarse"][0], gen)), f"piece {piece.index}: coarse"
    assert np.array_equal(piece.fine, tokens["fine"][0].numpy()), f"piece {piece.index}: fine"
    assert piece.audio.shape == audio.shape, f"piece {piece.index}: {piece.audio.shape} vs alone {audio.shape}"
    if audio.size:
        assert rel_err(torch.from_numpy(piece.audio), torch.from_numpy(audio)) <= RTOL


@pytest.mark.parametrize("backend", ["eager", "sdpa"])
def test_long_text_is_one_recording_of_pieces_equal_to_each_alone(tiny, backend):
    """sdpa on a CPU runs the host-lengths decode (rows prefilled one by one, finished rows skip attention)."""
    _, model, processor = tiny
    model.attn_implementation = backend
    try:
        _long_text_equals_alone(model, processor)
    finally:
        model.attn_implementation = "eager"


def _long_text_equals_alone(model, processor):
    count = lambda s: len(processor.tokenizer.encode(s, add_special_tokens=False).ids)  # noqa: E731
    assert count(TEXT) > 256 and count(SENTENCES[5]) > 256
    voice = _voice()
    audio, pieces = _synthesize(model, TEXT, processor=processor, voice=voice, batch_size=4, pause=0.1,
                                    return_pieces=True, semantic_max_new_tokens=SEMANTIC_TOKENS)
    # every sentence is covered, in order; the overlong one in pieces cut after its commas, each within 256 tokens
    assert " ".join(p.text for p in pieces) == TEXT
    assert len(pieces) > len(SENTENCES) and all(count(p.text) <= 256 for p in pieces)
    assert [p.text for p in pieces if p.text in SENTENCES] == [s for s in SENTENCES if s != SENTENCES[5]]
    assert [p.index for p in pieces] == list(range(len(pieces))) and pieces[-1].last
    lengths = {p.semantic.shape[0] for p in pieces}
    assert len(lengths) > 2 and 0 < min(lengths), f"expected ragged rows, got semantic lengths {lengths}"
    assert {p.batch_rows for p in pieces} == {4, len(pieces) % 4 or 4}
    # each piece: the tokens (and audio) of that piece generated alone with the same voice
    for piece in pieces:
        _assert_piece_equals_alone(model, processor, piece, voice)
    # the recording: the pieces in order with 0.1 s of silence between them, nothing else
    gap = np.zeros(2400, dtype=np.float32)
    expected = np.concatenate([x for p in pieces for x in (gap, p.audio)][1:])
    assert audio.dtype == np.float32 and np.array_equal(audio, expected)


def test_stream_yields_in_order_as_soon_as_ready(tiny):
    _, model, processor = tiny
    log = []

    def on_event(event):
        if event.stage == "semantic" and event.kind == "start":
            log.append(("chunk", event.rows))

    pieces = _stream(model, SENTENCES[:5], processor=processor, voice=_voice(), batch_size=2,
                         callback=on_event, semantic_max_new_tokens=6)
    assert len(pieces) == 5 and pieces.texts == SENTENCES[:5] and pieces.text_indices == [0, 1, 2, 3, 4]
    for piece in pieces:
        log.append(("piece", piece.index))
    # chunk 1 (pieces 0, 1) is handed out before chunk 2 starts, and so on
    assert log == [("chunk", 2), ("piece", 0), ("piece", 1), ("chunk", 2), ("piece", 2), ("piece", 3),
                   ("chunk", 1), ("piece", 4)]


def test_length_order_groups_similar_pieces_and_changes_nothing_else(tiny):
    _, model, processor = tiny
    kwargs = dict(processor=processor, voice=_voice(), batch_size=4, semantic_max_new_tokens=SEMANTIC_TOKENS)
    by_length = _stream(model, TEXT, order="length", **kwargs)
    by_text = _stream(model, TEXT, **kwargs)
    assert by_text.chunks == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9, 10, 11], [12]]
    sizes = [len(t) for t in by_length.texts]
    flat = [i for c in by_length.chunks for i in c]
    assert sorted(flat) == list(range(len(sizes))) and [sizes[i] for i in flat] == sorted(sizes, reverse=True)
    for a, b in zip(by_length, by_text, strict=True):  # greedy: a piece does not depend on its chunk
        assert a.index == b.index and np.array_equal(a.semantic, b.semantic) and np.array_equal(a.fine, b.fine)
        assert a.audio.shape == b.audio.shape
    with pytest.raises(ValueError, match="order"):
        _stream(model, TEXT, order="random", **kwargs)


def test_previous_piece_continuity(tiny):
    _, model, processor = tiny
    voice = _voice()
    texts = [" ".join(SENTENCES[:3]), " ".join(SENTENCES[6:8])]
    log = []
    audios, pieces = _synthesize(model, texts, processor=processor, voice=voice, continuity="previous",
                                     batch_size=8, pause=0.0, return_pieces=True,
                                     callback=lambda e: log.append(e.rows) if e.stage == "codec" and
                                     e.kind == "start" else None, semantic_max_new_tokens=SEMANTIC_TOKENS)
    assert [(p.text_index, p.piece_index) for p in pieces] == [(0, 0), (0, 1), (0, 2), (1, 0), (1, 1)]
    assert log == [2, 2, 1]  # piece k of both texts together: 3 sequential rounds, not 5 calls
    assert len(audios) == 2 and np.array_equal(audios[1], np.concatenate([pieces[3].audio, pieces[4].audio]))
    # each piece equals that piece alone, conditioned on the previous piece's generation (the first: on the voice)
    _assert_piece_equals_alone(model, processor, pieces[0], voice)
    _assert_piece_equals_alone(model, processor, pieces[2], pieces[1].voice())
    _assert_piece_equals_alone(model, processor, pieces[4], pieces[3].voice())


def test_preset_continuity_without_voice_uses_the_first_piece(tiny):
    _, model, processor = tiny
    pieces = list(_stream(model, " ".join(SENTENCES[:3]), processor=processor, batch_size=4,
                              semantic_max_new_tokens=SEMANTIC_TOKENS))
    assert [p.batch_rows for p in pieces] == [1, 2, 2]  # the first alone, then the rest together
    _assert_piece_equals_alone(model, processor, pieces[0], None)
    _assert_piece_equals_alone(model, processor, pieces[2], pieces[0].voice())


def test_voice_round_trip_conditions_like_the_arrays(tiny, tmp_path):
    _, model, processor = tiny
    recorder = VoiceRecorder(model)
    enc = processor(["A voice to keep."])
    model.generate(enc["input_ids"], attention_mask=enc["attention_mask"], history_prompt=bark_tiny.as_torch_preset(
        _voice()), semantic_max_new_tokens=SEMANTIC_TOKENS, callback=recorder)
    voice = recorder.voice(0)
    assert set(voice) == {"semantic_prompt", "coarse_prompt", "fine_prompt"}
    assert voice["coarse_prompt"].shape[0] == 2 and voice["fine_prompt"].shape[0] == 8
    assert np.array_equal(voice["coarse_prompt"], voice["fine_prompt"][:2])  # the fine stage starts from them
    path = save_voice(tmp_path / "me", voice)
    assert path.endswith("me.npz") and not [p for p in os.listdir(tmp_path) if p.endswith(".tmp")]
    with np.load(path, allow_pickle=False) as data:  # suno's layout: exactly these three arrays
        assert sorted(data.files) == ["coarse_prompt", "fine_prompt", "semantic_prompt"]
    loaded = load_voice(path)
    for key, value in voice.items():
        assert loaded[key].dtype == np.int64 and np.array_equal(loaded[key], value)
    # a later generation conditioned on the file (by path) is exactly the one conditioned on the arrays
    by_path = _synthesize(model, "Then a new sentence.", processor=processor, voice=path,
                              semantic_max_new_tokens=SEMANTIC_TOKENS)
    by_arrays = _synthesize(model, "Then a new sentence.", processor=processor, voice=voice,
                                semantic_max_new_tokens=SEMANTIC_TOKENS)
    direct = model.generate(**processor(["Then a new sentence."], voice_preset=path),
                            semantic_max_new_tokens=SEMANTIC_TOKENS)[0].numpy()
    assert by_path.size and np.array_equal(by_path, by_arrays) and np.array_equal(by_path, direct)
    # a piece's voice is the same thing
    piece = next(iter(_stream(model, "A voice to keep.", processor=processor, voice=_voice(),
                                  semantic_max_new_tokens=SEMANTIC_TOKENS)))
    for key in voice:
        assert np.array_equal(piece.voice()[key], voice[key])


def test_coarse_codebooks_inverts_the_prompt_reading(tiny):
    from bark.generation import _coarse_history

    gen = tiny[1].generation_config
    codes = np.random.default_rng(0).integers(0, 1024, size=(2, 50))
    voice = {"semantic_prompt": torch.zeros(200, dtype=torch.long), "coarse_prompt": torch.from_numpy(codes),
             "fine_prompt": torch.zeros(8, 50, dtype=torch.long)}
    interleaved = (torch.from_numpy(codes) + torch.tensor([[0], [1024]])).T.reshape(-1) + 10_000
    assert np.array_equal(coarse_codebooks(interleaved, gen), codes)
    read_back = _coarse_history(voice, gen, "cpu")[1]  # the ids generation conditions on: a tail of the stream
    assert read_back.shape[0] > 50 and torch.equal(read_back, interleaved[-read_back.shape[0] - 2:-2])
    with pytest.raises(ValueError, match="multiple of 2"):
        coarse_codebooks(interleaved[:-1], gen)


def test_offload_without_cuda_is_a_no_op_that_says_so(tiny, monkeypatch, caplog):
    _, model, processor = tiny
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    kwargs = dict(processor=processor, voice=_voice(), semantic_max_new_tokens=6)
    with caplog.at_level("WARNING", logger="bark.longform"):
        pieces = list(_stream(model, SENTENCES[:2], offload=True, **kwargs))
    assert "no CUDA device" in caplog.text and any("a no-op" in n for n in pieces[0].notes)
    plain = list(_stream(model, SENTENCES[:2], **kwargs))
    assert all(np.array_equal(a.audio, b.audio) for a, b in zip(pieces, plain, strict=True))


def test_offloaded_stand_in_moves_one_sub_model_at_a_time(tiny, monkeypatch):
    """The stand-in's bookkeeping on CPU (device 'cpu' allowed here): one sub-model resident at a time, the evicted
    causal model's pooled sessions dropped, the same tokens as the model itself, the weights put back."""
    from bark import offload, session

    _, model, processor = tiny
    monkeypatch.setattr(offload, "offload_reason", lambda model, device=None: None)
    enc = processor(["Offload me."])
    history = bark_tiny.as_torch_preset(_voice())
    ref = model.generate(enc["input_ids"], attention_mask=enc["attention_mask"], history_prompt=history,
                         semantic_max_new_tokens=SEMANTIC_TOKENS)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    resident = []
    with offload.Offloaded(model, "cpu") as stand_in:
        original_bring = stand_in._bring

        def bring(name):
            original_bring(name)
            resident.append(name)
            if name == "fine_acoustics":
                assert model.semantic not in session._POOLS and model.coarse_acoustics not in session._POOLS

        stand_in._bring = bring
        out = stand_in.generate(enc["input_ids"], attention_mask=enc["attention_mask"], history_prompt=history,
                                semantic_max_new_tokens=SEMANTIC_TOKENS)
    assert torch.equal(out, ref)
    assert [r for i, r in enumerate(resident) if i == 0 or resident[i - 1] != r][-3:] == [
        "coarse_acoustics", "fine_acoustics", "codec_model"]
    assert stand_in.loads >= 4
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


@pytest.mark.gpu
def test_offload_on_gpu_same_audio_less_memory(tiny):
    path, _, processor = tiny
    model = bark.BarkModel.from_pretrained(path, attn_implementation="sdpa")  # on the CPU: offload's use
    kwargs = dict(processor=processor, voice=_voice(), batch_size=4, semantic_max_new_tokens=SEMANTIC_TOKENS)
    torch.cuda.reset_peak_memory_stats()
    off = _synthesize(model, TEXT, offload=True, **kwargs)
    peak_off = torch.cuda.max_memory_allocated()
    assert model.device.type == "cpu"  # put back where it was
    on_gpu = bark.BarkModel.from_pretrained(path, attn_implementation="sdpa", device="cuda")
    torch.cuda.reset_peak_memory_stats()
    on = _synthesize(on_gpu, TEXT, **kwargs)
    peak_on = torch.cuda.max_memory_allocated()
    assert off.shape == on.shape and np.allclose(off, on, atol=1e-4)
    assert peak_off < peak_on


def _read_wav(path):
    with wave.open(str(path), "rb") as w:
        assert (w.getnchannels(), w.getsampwidth(), w.getframerate()) == (1, 2, 24_000)
        return np.frombuffer(w.readframes(w.getnframes()), dtype="<i2")


def test_wav_appender_is_valid_after_every_piece(tmp_path):
    path = tmp_path / "grow.wav"
    path.write_bytes(b"an older file")
    rng = np.random.default_rng(0)
    parts = [rng.uniform(-1.2, 1.2, n).astype(np.float32) for n in (320, 0, 640)]
    expected = np.zeros(0, dtype="<i2")
    with WavAppender(path, 24_000) as wav:
        for i, part in enumerate(parts):
            wav.append(part, pause=0.01)
            if i:
                expected = np.concatenate([expected, np.zeros(240, dtype="<i2")])
            expected = np.concatenate([expected, to_pcm16(part)])
            assert np.array_equal(_read_wav(path), expected)  # complete and readable after each append
            assert wav.samples == expected.shape[0]
    # a run killed between an append's data and its header patch: extra bytes after the data, still the old file
    with open(path, "ab") as f:
        f.write(b"\x01\x02" * 100)
    assert np.array_equal(_read_wav(path), expected)
    assert struct.unpack("<I", path.read_bytes()[40:44])[0] == 2 * expected.shape[0]
    assert not [p for p in os.listdir(tmp_path) if p.endswith(".tmp")]
