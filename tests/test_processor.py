"""bark.processor against transformers' BarkProcessor on a small local BERT vocab (no network)."""

from __future__ import annotations

import json
import logging

import numpy as np
import pytest
import torch

from bark.processor import BarkProcessor, validate_voice_preset

transformers = pytest.importorskip("transformers")

SPECIALS = ["[PAD]", "[unused1]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]  # [PAD] = 0 as in bert-base-multilingual-cased
WORDS = (
    "the a an of to and in is it that was for on are with as be at by this have from or had not but what all were "
    "when we there can your which their said if do will each about how up out them then she many some so these "
    "would other into has more her two like him see time could no make than first been its who now people my made "
    "over did down only way find use may water long little very after words called just where most know hello "
    "world speech bark model voice text sound Hello World The I He She It We They You Bark Paris"
).split()
PIECES = ["##s", "##ed", "##ing", "##er", "##ly", "##es", "##'", "##n", "##t", "##é", "##ü", "##ß", "##a", "##e"]
CHARS = list("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789")
CHARS += list(".,!?;:'\"-()[]…—♪") + list("éèàüöäßçñ") + ["日", "本", "語", "中", "文"]
CHARS += ["##" + c for c in "abcdefghijklmnopqrstuvwxyz0123456789"]
VOCAB = list(dict.fromkeys(SPECIALS + WORDS + PIECES + CHARS + ["café", "naïve", "über", "straße"]))

TEXTS = [
    "Hello, world!",
    "Hello world. The model speaks [laughs] — and sings ♪ la la ♪",
    "Café naïve über Straße, déjà vu: àèü",
    "qwxyzzy glorptastic blorfing Ωμέγα 🙂",  # unknown words: wordpieces and [UNK]
    "",
    "   \t\n  ",
    "日本語 and 中文 mixed",
    "We said [MASK] and [CLS] inside the text",
    "numbers 12345 and x2 y3",
    "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa",
]
LONG_TEXT = " ".join(["the bark model speaks words,"] * 80)  # > 256 tokens


def _write_vocab_dir(path, with_config=True):
    path.mkdir(parents=True, exist_ok=True)
    (path / "vocab.txt").write_text("\n".join(VOCAB) + "\n", encoding="utf-8")
    if with_config:  # like suno/bark's tokenizer_config.json: cased BERT
        (path / "tokenizer_config.json").write_text(
            json.dumps({"tokenizer_class": "BertTokenizer", "do_lower_case": False, "model_max_length": 512}),
            encoding="utf-8",
        )
    return path


def _write_presets(path, names=("v2/en_speaker_0", "announcer")):
    rng = np.random.default_rng(0)
    (path / "speaker_embeddings" / "v2").mkdir(parents=True, exist_ok=True)
    table = {"repo_or_path": "some/other-repo"}
    arrays = {}
    for i, name in enumerate(names):
        preset = {
            "semantic_prompt": rng.integers(0, 10_000, size=(40 + i,), dtype=np.int64),
            "coarse_prompt": rng.integers(0, 1024, size=(2, 30 + i), dtype=np.int64),
            "fine_prompt": rng.integers(0, 1024, size=(8, 30 + i), dtype=np.int64),
        }
        arrays[name] = preset
        table[name] = {}
        for key, value in preset.items():
            rel = f"speaker_embeddings/{name}_{key}.npy"
            np.save(path / rel, value)
            table[name][key] = rel
    (path / "speaker_embeddings_path.json").write_text(json.dumps(table), encoding="utf-8")
    return arrays


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    root = tmp_path_factory.mktemp("bark_ckpt")
    _write_vocab_dir(root)
    presets = _write_presets(root)
    return root, presets


@pytest.fixture(scope="module")
def hf_processor(checkpoint):
    root, _ = checkpoint
    return transformers.BarkProcessor.from_pretrained(str(root))


def _hf_encode(hf_processor, text, **kwargs):
    out = hf_processor(text, **kwargs)
    return {k: out[k] for k in ("input_ids", "attention_mask")}


def test_vocab_is_what_the_test_thinks(hf_processor):
    tok = hf_processor.tokenizer
    assert not tok.do_lower_case
    assert tok.pad_token_id == 0 and tok.convert_tokens_to_ids("[UNK]") == 2
    assert 200 <= len(VOCAB) <= 600


@pytest.mark.parametrize("text", TEXTS)
def test_single_text_matches_transformers(checkpoint, hf_processor, text):
    ours = BarkProcessor.from_pretrained(checkpoint[0])
    out = ours(text)
    ref = _hf_encode(hf_processor, text)
    assert set(out) == {"input_ids", "attention_mask"}
    assert out["input_ids"].shape == (1, 256) and out["input_ids"].dtype == torch.long
    assert out["attention_mask"].dtype == torch.long
    assert torch.equal(out["input_ids"], ref["input_ids"])
    assert torch.equal(out["attention_mask"], ref["attention_mask"])


def test_texts_exercise_unk_and_specials(checkpoint):
    ours = BarkProcessor.from_pretrained(checkpoint[0])
    ids = ours(TEXTS[3])["input_ids"][0]
    assert (ids == 2).any()  # [UNK]
    ids = ours(TEXTS[7])["input_ids"][0].tolist()
    assert VOCAB.index("[MASK]") in ids and VOCAB.index("[CLS]") in ids
    empty = ours("")
    assert empty["attention_mask"].sum() == 0 and empty["input_ids"].abs().sum() == 0


def test_batch_matches_transformers(checkpoint, hf_processor):
    ours = BarkProcessor.from_pretrained(checkpoint[0])
    batch = [TEXTS[1], TEXTS[2]]
    out = ours(batch)
    ref = _hf_encode(hf_processor, batch)
    assert out["input_ids"].shape == (2, 256)
    assert torch.equal(out["input_ids"], ref["input_ids"])
    assert torch.equal(out["attention_mask"], ref["attention_mask"])
    assert out["attention_mask"][0].sum() != out["attention_mask"][1].sum()


def test_long_text_truncated_to_256(checkpoint, hf_processor, caplog):
    ours = BarkProcessor.from_pretrained(checkpoint[0])
    with caplog.at_level(logging.WARNING, logger="bark.processor"):
        out = ours(LONG_TEXT)
    assert "truncated to max_length=256" in caplog.text
    # transformers does not truncate (it returns the longer row); Bark's semantic model reads the first 256.
    ref = _hf_encode(hf_processor, LONG_TEXT)
    assert ref["input_ids"].shape[1] > 256
    assert out["input_ids"].shape == (1, 256)
    assert torch.equal(out["input_ids"], ref["input_ids"][:, :256])
    assert torch.equal(out["attention_mask"], ref["attention_mask"][:, :256])
    # in a batch too (transformers needs truncation=True for that)
    out2 = ours([LONG_TEXT, "hello"])
    ref2 = _hf_encode(hf_processor, [LONG_TEXT, "hello"], truncation=True)
    assert torch.equal(out2["input_ids"], ref2["input_ids"])
    assert torch.equal(out2["attention_mask"], ref2["attention_mask"])
    with pytest.raises(ValueError, match="max_length=256"):
        ours(LONG_TEXT, truncation=False)


def test_tokenizer_json_checkpoint(tmp_path, hf_processor):
    # A checkpoint saved by transformers (tokenizer.json + tokenizer_config.json) loads the same tokenizer.
    hf_processor.tokenizer.save_pretrained(str(tmp_path))
    assert (tmp_path / "tokenizer.json").exists()
    (tmp_path / "vocab.txt").unlink(missing_ok=True)  # force the tokenizer.json path
    ours = BarkProcessor.from_pretrained(tmp_path, speaker_embeddings_dict_path=None)
    for text in TEXTS + [[TEXTS[0], TEXTS[6]]]:
        out = ours(text)
        ref = _hf_encode(hf_processor, text)
        assert torch.equal(out["input_ids"], ref["input_ids"]), text
        assert torch.equal(out["attention_mask"], ref["attention_mask"]), text


def test_voice_preset_by_name_matches_transformers(checkpoint, hf_processor):
    root, presets = checkpoint
    ours = BarkProcessor.from_pretrained(root)
    assert ours.available_voice_presets == ["announcer", "v2/en_speaker_0"]
    out = ours("hello", voice_preset="v2/en_speaker_0")
    ref = hf_processor("hello", voice_preset="v2/en_speaker_0")["history_prompt"]
    for key in ("semantic_prompt", "coarse_prompt", "fine_prompt"):
        got = out["history_prompt"][key]
        assert isinstance(got, torch.Tensor) and got.dtype == torch.int64
        assert torch.equal(got, ref[key])
        assert np.array_equal(got.numpy(), presets["v2/en_speaker_0"][key])


def test_voice_preset_from_npz(checkpoint, hf_processor, tmp_path):
    root, presets = checkpoint
    path = tmp_path / "my_voice.npz"
    np.savez(path, **presets["announcer"])
    ours = BarkProcessor.from_pretrained(root)
    for spec in (str(path), str(path)[: -len(".npz")]):  # ".npz" is appended when missing, as transformers
        out = ours(["a", "b"], voice_preset=spec)["history_prompt"]
        ref = hf_processor(["a", "b"], voice_preset=spec)["history_prompt"]
        for key in ("semantic_prompt", "coarse_prompt", "fine_prompt"):
            assert torch.equal(out[key], ref[key])
    # a dict of arrays works too
    out = ours("a", voice_preset=dict(presets["announcer"]))["history_prompt"]
    assert torch.equal(out["fine_prompt"], torch.from_numpy(presets["announcer"]["fine_prompt"]))


def test_bad_voice_presets(checkpoint, tmp_path):
    root, presets = checkpoint
    ours = BarkProcessor.from_pretrained(root)
    good = presets["announcer"]

    missing = tmp_path / "missing.npz"
    np.savez(missing, semantic_prompt=good["semantic_prompt"], coarse_prompt=good["coarse_prompt"])
    with pytest.raises(ValueError, match="missing 'fine_prompt'"):
        ours("a", voice_preset=str(missing))

    wrong_dims = tmp_path / "dims.npz"
    np.savez(wrong_dims, **{**good, "semantic_prompt": good["coarse_prompt"]})
    with pytest.raises(ValueError, match=r"semantic_prompt.*1D array.*\(2, 31\)"):
        ours("a", voice_preset=str(wrong_dims))

    wrong_rows = tmp_path / "rows.npz"
    np.savez(wrong_rows, **{**good, "fine_prompt": good["fine_prompt"][:7]})
    with pytest.raises(ValueError, match=r"fine_prompt.*\(8, X\)"):
        ours("a", voice_preset=str(wrong_rows))

    floats = tmp_path / "floats.npz"
    np.savez(floats, **{**good, "coarse_prompt": good["coarse_prompt"].astype(np.float32)})
    with pytest.raises(ValueError, match="coarse_prompt.*integer"):
        ours("a", voice_preset=str(floats))

    corrupt = tmp_path / "corrupt.npz"
    corrupt.write_bytes(b"not a zip file at all")
    with pytest.raises(ValueError, match="corrupt.npz"):
        ours("a", voice_preset=str(corrupt))

    with pytest.raises(ValueError, match="neither a known preset name nor an .npz file.*announcer"):
        ours("a", voice_preset="v2/no_such_speaker")
    with pytest.raises(TypeError, match="voice_preset"):
        ours("a", voice_preset=3)
    with pytest.raises(TypeError, match="semantic_prompt"):
        validate_voice_preset({**good, "semantic_prompt": [1, 2, 3]})


def test_named_preset_with_missing_file_or_escaping_path(tmp_path, caplog):
    root = _write_vocab_dir(tmp_path / "ckpt")
    table = {
        "gone": {k: f"speaker_embeddings/gone_{k}.npy" for k in ("semantic_prompt", "coarse_prompt", "fine_prompt")},
        "evil": {k: "../../etc/passwd" for k in ("semantic_prompt", "coarse_prompt", "fine_prompt")},
    }
    (root / "speaker_embeddings_path.json").write_text(json.dumps(table), encoding="utf-8")
    ours = BarkProcessor.from_pretrained(root)
    with pytest.raises(FileNotFoundError, match="gone.*semantic_prompt"):
        ours("a", voice_preset="gone")
    with pytest.raises(ValueError, match="evil.*inside the checkpoint"):
        ours("a", voice_preset="evil")

    bare = _write_vocab_dir(tmp_path / "bare")
    with caplog.at_level(logging.WARNING, logger="bark.processor"):
        plain = BarkProcessor.from_pretrained(bare)
    assert plain.available_voice_presets == [] and "speaker_embeddings_path.json" in caplog.text


def test_bad_arguments(checkpoint, tmp_path):
    ours = BarkProcessor.from_pretrained(checkpoint[0])
    with pytest.raises(TypeError, match="text"):
        ours(None)
    with pytest.raises(TypeError, match="text"):
        ours([])
    with pytest.raises(TypeError, match="text"):
        ours(["ok", 3])
    with pytest.raises(ValueError, match="max_length"):
        ours("a", max_length=0)
    with pytest.raises(FileNotFoundError, match="tokenizer.json or vocab.txt"):
        BarkProcessor.from_pretrained(tmp_path)
    assert ours("hello world", max_length=8)["input_ids"].shape == (1, 8)


def test_repo_id_through_local_hf_cache(tmp_path, monkeypatch, checkpoint, hf_processor):
    hub = pytest.importorskip("huggingface_hub")
    cache = tmp_path / "hub"
    snapshot = cache / "models--suno--bark-tiny" / "snapshots" / ("0" * 40)
    _write_vocab_dir(snapshot)
    _write_presets(snapshot)
    (cache / "models--suno--bark-tiny" / "refs").mkdir(parents=True)
    (cache / "models--suno--bark-tiny" / "refs" / "main").write_text("0" * 40)
    monkeypatch.setattr(hub.constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(hub.constants, "HF_HUB_OFFLINE", True)
    ours = BarkProcessor.from_pretrained("suno/bark-tiny")
    out = ours(TEXTS[1], voice_preset="announcer")
    assert torch.equal(out["input_ids"], _hf_encode(hf_processor, TEXTS[1])["input_ids"])
    assert out["history_prompt"]["coarse_prompt"].shape == (2, 31)
    with pytest.raises(FileNotFoundError, match="not in the local cache"):
        BarkProcessor.from_pretrained("suno/not-cached")


def test_random_strings_match_transformers(checkpoint, hf_processor):
    # Seeded fuzz over vocab pieces, whitespace, control / zero-width / combining characters and special tokens.
    import random

    ours = BarkProcessor.from_pretrained(checkpoint[0])
    rng = random.Random(0)
    alphabet = VOCAB + [
        " ",
        "  ",
        "\t",
        "\n",
        "\u200b",
        "\u0301",
        "e\u0301",
        "\x00",
        "\x07",
        "\ufeff",
        "🙂",
        "Ω",
        "İ",
        "ﬁ",
        "①",
        "[PAD]",
        "[SEP]",
        "##",
        "#",
        "...",
        "“",
        "”",
        "¿",
        "¡",
    ]
    texts = [
        "".join(rng.choice(alphabet) + rng.choice(["", " "]) for _ in range(rng.randint(0, 30))) for _ in range(300)
    ]
    for start in range(0, len(texts), 50):
        batch = texts[start : start + 50]
        out = ours(batch)
        ref = _hf_encode(hf_processor, batch, truncation=True)
        assert torch.equal(out["input_ids"], ref["input_ids"]), batch
        assert torch.equal(out["attention_mask"], ref["attention_mask"]), batch
