"""bark.text: the sentence splitter (abbreviations, quotes, ellipses, decimals, non-Latin scripts, paragraphs) and the
further split of sentences longer than Bark reads (clauses, then words, never inside a word)."""

from __future__ import annotations

import logging
import re

import pytest

from bark.text import split_long_sentence, split_sentences, split_text


@pytest.mark.parametrize("text, sentences", [
    ("Dr. Smith paid $3.50, e.g. for tea. Then he left.",
     ["Dr. Smith paid $3.50, e.g. for tea.", "Then he left."]),
    ("Mr. and Mrs. Jones met Prof. Lee at St. Mary's, i.e. the church. It was 3.14 km away, vs. 2.5 before.",
     ["Mr. and Mrs. Jones met Prof. Lee at St. Mary's, i.e. the church.", "It was 3.14 km away, vs. 2.5 before."]),
    ("He moved to the U.S. Then he worked at Acme Inc. in Boston. The U.S. government agreed.",
     ["He moved to the U.S.", "Then he worked at Acme Inc. in Boston.", "The U.S. government agreed."]),
    ("J. R. R. Tolkien wrote it in 1954. See Fig. 3 for details. No. I refuse.",
     ["J. R. R. Tolkien wrote it in 1954.", "See Fig. 3 for details.", "No.", "I refuse."]),
    ("We met at 5 p.m. and talked, etc. then left at 6 a.m. Nobody saw us.",
     ["We met at 5 p.m. and talked, etc. then left at 6 a.m.", "Nobody saw us."]),
    ('"Stop!" he said. She replied, "No." Then silence.',
     ['"Stop!" he said.', 'She replied, "No."', "Then silence."]),
    ("Wait... what was that? Then silence... and more silence\u2026 The end.",
     ["Wait... what was that?", "Then silence... and more silence\u2026", "The end."]),
    ("Really?! Yes!!! (This is it.) [Truly.] Visit example.com today. Version 2.0.1 is out.",
     ["Really?!", "Yes!!!", "(This is it.)", "[Truly.]", "Visit example.com today.", "Version 2.0.1 is out."]),
    ("\u00bfQu\u00e9 pasa? Nada. Das ist gut. Wirklich? \u00abOui.\u00bb Non.",
     ["\u00bfQu\u00e9 pasa?", "Nada.", "Das ist gut.", "Wirklich?", "\u00abOui.\u00bb", "Non."]),
])
def test_latin_sentences(text, sentences):
    assert split_sentences(text) == sentences


@pytest.mark.parametrize("text, sentences", [
    ("\u4ed6\u8bf4\uff1a\u201c\u8d70\u5427\u3002\u201d\u7136\u540e\u6211\u4eec\u8d70\u4e86\u2026\u2026\u4ed6\u4eec"
     "\u6ca1\u6709\u8ddf\u6765\u3002\u771f\u7684\u5417\uff1f\u662f\u7684\uff01",
     ["\u4ed6\u8bf4\uff1a\u201c\u8d70\u5427\u3002\u201d", "\u7136\u540e\u6211\u4eec\u8d70\u4e86\u2026\u2026\u4ed6"
      "\u4eec\u6ca1\u6709\u8ddf\u6765\u3002", "\u771f\u7684\u5417\uff1f", "\u662f\u7684\uff01"]),  # Chinese
    ("\u3053\u308c\u306f\u30da\u30f3\u3067\u3059\u3002\u3042\u308c\u306f\u4f55\u3067\u3059\u304b\uff1f"
     "\u300c\u306f\u3044\u3002\u300d\u308f\u304b\u308a\u307e\u305b\u3093\uff01",
     ["\u3053\u308c\u306f\u30da\u30f3\u3067\u3059\u3002", "\u3042\u308c\u306f\u4f55\u3067\u3059\u304b\uff1f",
      "\u300c\u306f\u3044\u3002\u300d", "\u308f\u304b\u308a\u307e\u305b\u3093\uff01"]),  # Japanese, corner quotes
    ("\u0645\u0631\u062d\u0628\u0627 \u0628\u0643\u061f \u0643\u064a\u0641 \u062d\u0627\u0644\u0643\u06d4 "
     "\u0623\u0646\u0627 \u0628\u062e\u064a\u0631.",
     ["\u0645\u0631\u062d\u0628\u0627 \u0628\u0643\u061f", "\u0643\u064a\u0641 \u062d\u0627\u0644\u0643\u06d4",
      "\u0623\u0646\u0627 \u0628\u062e\u064a\u0631."]),  # Arabic question mark and full stop
    ("\u092f\u0939 \u090f\u0915 \u0935\u093e\u0915\u094d\u092f \u0939\u0948\u0964 \u092f\u0939 \u0926\u0942"
     "\u0938\u0930\u093e \u0939\u0948\u0965 \u0924\u0940\u0938\u0930\u093e\u0964",
     ["\u092f\u0939 \u090f\u0915 \u0935\u093e\u0915\u094d\u092f \u0939\u0948\u0964", "\u092f\u0939 \u0926\u0942"
      "\u0938\u0930\u093e \u0939\u0948\u0965", "\u0924\u0940\u0938\u0930\u093e\u0964"]),  # Devanagari dandas
    ("\uc548\ub155\ud558\uc138\uc694. \ubc18\uac11\uc2b5\ub2c8\ub2e4!",
     ["\uc548\ub155\ud558\uc138\uc694.", "\ubc18\uac11\uc2b5\ub2c8\ub2e4!"]),  # Korean (Latin punctuation)
    ("\u0391\u03c5\u03c4\u03cc \u03b5\u03af\u03bd\u03b1\u03b9 \u03ba\u03b1\u03bb\u03cc. \u03a4\u03b9 "
     "\u03ba\u03ac\u03bd\u03b5\u03b9\u03c2\u037e \u039a\u03b1\u03bb\u03ac.",
     ["\u0391\u03c5\u03c4\u03cc \u03b5\u03af\u03bd\u03b1\u03b9 \u03ba\u03b1\u03bb\u03cc.",
      "\u03a4\u03b9 \u03ba\u03ac\u03bd\u03b5\u03b9\u03c2\u037e", "\u039a\u03b1\u03bb\u03ac."]),  # Greek ";"
])
def test_non_latin_sentences(text, sentences):
    assert split_sentences(text) == sentences


def test_paragraphs_and_line_breaks():
    text = "Line one wraps\nonto line two. Next.\n\n  A heading without a stop\n\nLast   words"
    assert split_sentences(text) == ["Line one wraps onto line two.", "Next.", "A heading without a stop",
                                     "Last words"]
    assert split_sentences("   \n\n ") == []
    with pytest.raises(TypeError, match="text"):
        split_sentences(b"bytes")


def _words(text: str) -> list[str]:
    return text.split()


def test_long_sentence_splits_at_clauses_evenly():
    sentence = ", ".join(f"clause number {i} has some words in it" for i in range(30)) + "."
    count = lambda s: len(s.split())  # noqa: E731 - one token per word
    pieces = split_long_sentence(sentence, 60, count)
    assert [count(p) for p in pieces] == [48] * 5  # 240 words: 4 pieces would need 60 each, clauses give 5 x 48
    assert all(p.endswith(",") or p.endswith(".") for p in pieces)  # every cut after a clause mark
    assert _words(" ".join(pieces)) == _words(sentence)
    assert split_long_sentence("short one.", 60, count) == ["short one."]


def test_long_clause_splits_at_words_never_inside():
    sentence = " ".join(f"w{i}x" for i in range(130)) + "."  # no clause mark at all
    count = lambda s: len(s.encode())  # noqa: E731 - byte-level tokens: a word is several
    pieces = split_text(sentence, 100, count)
    assert all(count(p) <= 100 for p in pieces)
    assert _words(" ".join(pieces)) == _words(sentence)  # whole words, in order, none lost or cut
    assert max(map(count, pieces)) - min(map(count, pieces)) <= 12  # even, not greedy (greedy leaves a stub)


def test_cjk_long_sentence_and_overlong_word(caplog):
    cjk = "\u6211\u4eec" * 150 + "\u3002"  # 301 characters, no spaces: each character is a word to Bark's BERT
    pieces = split_text(cjk, 256, len)
    assert [len(p) for p in pieces] == [151, 150] and "".join(pieces) == cjk
    with caplog.at_level(logging.WARNING, logger="bark.text"):
        pieces = split_text("a" * 600 + " end.", 256, len)
    assert pieces == ["a" * 256, "a" * 256, "a" * 88 + " end."]
    assert "cut inside" in caplog.text  # the only cut inside a word is said out loud


def test_split_text_with_a_real_wordpiece_tokenizer():
    tokenizers = pytest.importorskip("tokenizers")
    from tokenizers import normalizers, pre_tokenizers
    from tokenizers.models import WordPiece

    letters = "abcdefghijklmnopqrstuvwxyz"
    vocab = ["[PAD]", "[UNK]"] + list(letters) + ["##" + c for c in letters] + list(".,;:!?")
    tok = tokenizers.Tokenizer(WordPiece({t: i for i, t in enumerate(vocab)}, unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    count = lambda s: len(tok.encode(s, add_special_tokens=False).ids)  # noqa: E731
    sentence = "; ".join("the quick brown fox jumps over the lazy dog" for _ in range(12)) + "."
    pieces = split_text(sentence + " A short one.", 100, count)
    assert count(sentence) > 300 and all(count(p) <= 100 for p in pieces)
    assert pieces[-1] == "A short one."
    assert _words(" ".join(pieces)) == _words(sentence + " A short one.")
    assert all(re.search(r"[;.]$", p) for p in pieces)  # clause-level cuts were enough here
    with pytest.raises(ValueError, match="max_tokens"):
        split_text("hi", 0)


@pytest.mark.parametrize("text, sentences", [
    # a handful of pysbd's golden rules (benchmarks/sentence_split.py scores all of them; docs/longform.md)
    ("She works at Yahoo! in the accounting department.", ["She works at Yahoo! in the accounting department."]),
    ("„Ich habe heute keine Zeit“, sagte die Frau und flüsterte leise: „Und auch keine Lust.“ Wir haben 1.000.000 "
     "Euro.", ["„Ich habe heute keine Zeit“, sagte die Frau und flüsterte leise: „Und auch keine Lust.“",
               "Wir haben 1.000.000 Euro."]),
    ("引き下げ幅は３．２９％以上を目指す。今後も続く。", ["引き下げ幅は３．２９％以上を目指す。", "今後も続く。"]),
    ("Д-р наук А. И. Семенов выступал. Кв. 234 находится на 4 этаже.",
     ["Д-р наук А. И. Семенов выступал.", "Кв. 234 находится на 4 этаже."]),
    ("It was weakened . . . and then gone. Next sentence.", ["It was weakened . . . and then gone.",
                                                            "Next sentence."]),
    ("Hola Srta. Ledesma. Buenos días, soy el Lic. Naser Pastoriza.",
     ["Hola Srta. Ledesma.", "Buenos días, soy el Lic. Naser Pastoriza."]),
])
def test_golden_rule_cases(text, sentences):
    assert split_sentences(text) == sentences
