"""Text of any length -> pieces Bark can speak: sentences, and sentences too long for Bark split further.

    from bark.text import split_sentences, split_text
    split_sentences('Dr. Smith paid $3.50, e.g. for tea... Then he left! "Why?" she asked. 你好。再见！')
    # ['Dr. Smith paid $3.50, e.g. for tea...', 'Then he left!', '"Why?" she asked.', '你好。', '再见！']
    split_text(long_text, max_tokens=256, count_tokens=lambda s: len(tokenizer.encode(s).ids))

Sentence boundaries (rules, no model; see :func:`split_sentences`):

* Latin ``.``, ``!``, ``?`` end a sentence when whitespace or the end of the text follows (so ``3.14``, ``e.g``
  inside ``e.g.``, ``example.com`` never split); closing quotes and brackets after them stay with the sentence;
* a period after a known abbreviation does not end a sentence: titles and Latin short forms (``Dr.``, ``Mr.``,
  ``St.``, ``e.g.``, ``i.e.``, ``vs.``, ``approx.`` ...) never do; others (``etc.``, ``Inc.``, ``a.m.``, ``U.S.``,
  month names ...) only when the next word starts with a capital letter; single capital initials (``J. K.``) never;
* an ellipsis (``...``, ``…``, spaced ``. . .``) ends a sentence only when the next word does not start in lower
  case or a digit;
* a next word in lower case continues the sentence after ``!``, ``?``, an ellipsis or a closing quote
  (``"Stop!" he said.``, ``Yahoo! in``), and after a period that follows a word of at most 5 letters (an unlisted
  abbreviation: ``Admón. es``); ``“`` and ``‘`` right after a terminator close a quote (German ``„so.“``);
* single capital initials of any script never end a sentence; a fullwidth period between digits is a decimal point;
* CJK and other scripts' terminators (``。！？``, fullwidth ``．``, Arabic ``؟ ۔``, Devanagari ``। ॥``, Ethiopic
  ``።``, Armenian ``։``, Burmese ``။``, Tibetan ``།``, Greek ``;``) end a sentence with or without a following space;
* a blank line always ends one; single line breaks are spaces (wrapped text).

A sentence of more than ``max_tokens`` tokens (Bark reads at most 256) is split at clause marks (``, ; : — –`` and
``， 、 ； ：``) into pieces as even as the clauses allow, and a clause still too long at word boundaries (spaces;
between CJK characters, which are words to Bark's tokenizer). A single word longer than ``max_tokens`` tokens is the
only thing ever cut inside (a warning says so).
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable

__all__ = ["split_sentences", "split_text", "split_long_sentence", "ABBREVIATIONS_NEVER_FINAL",
           "ABBREVIATIONS_MAYBE_FINAL"]

logger = logging.getLogger(__name__)

# A period after these (lower-cased, without the period) never ends a sentence: a name or a number follows.
ABBREVIATIONS_NEVER_FINAL = frozenset("""
    mr mrs ms mx dr prof st sr sra srta mme mlle messrs rev hon gen col capt cpt lt sgt cmdr adm gov pres sen rep
    supt insp mt e.g eg i.e ie cf vs v viz approx ca
    lic dra ing avv dott dir sig sigg z.b u.a
    проф ул пгт кв
""".split())
# A period after these ends a sentence only when the next word starts with a capital letter.
ABBREVIATIONS_MAYBE_FINAL = frozenset("""
    etc inc ltd co corp llc plc jr bros esp al a.m p.m u.s u.k u.n e.u u.s.a b.c a.d ph.d m.d b.a m.a
    no nos vol vols p pp ch sec art fig figs op ed eds ref refs dept univ ft
    jan feb mar apr jun jul aug sep sept oct nov dec mon tue tues wed thu thur thurs fri sat sun
    ave blvd rd hwy min max est
""".split())

# Terminators that end a sentence in any context (scripts that do not, or need not, put a space after them).
_STRONG = "\u3002\uff01\uff1f\uff61\uff0e\u061f\u06d4\u0964\u0965\u1362\u0589\u104b\u0f0d\u037e\u203c\u2047\u2048\u2049"
_LATIN = ".!?"
_ELLIPSIS = "\u2026"
_TERMINATORS = _STRONG + _LATIN + _ELLIPSIS
# (\u201c and \u2018 open a quote in English but close one in German: „so“; after a terminator they close)
_CLOSERS = "\"'\u201d\u2019\u201c\u2018\u00bb\u203a)]}\u300d\u300f\uff09\u300b\u3009\u3011\uff3d\uff63"
_OPENERS = "\"'\u201c\u2018\u00ab\u2039([{\u300c\u300e\uff08\u300a\u3008\u3010\uff3b\uff62"
# a run of terminators (a spaced ellipsis ". . ." is one run), then any closing quotes/brackets
_RUN = re.compile(f"(?:\\.(?: \\.)+|[{re.escape(_TERMINATORS)}])+[{re.escape(_CLOSERS)}]*")
_PARAGRAPH = re.compile(r"\n[ \t\r\f\v]*\n\s*")
_SPACE = re.compile(r"\s+")
_SHORT_WORD = 5  # a word this short before a period and a lower-case next word: an abbreviation
_INITIAL = re.compile(r"^(?!I$)[^\W\d_]$")  # one letter (capital: checked by the caller), not "I", a word
_DOTTED = re.compile(r"^[^\W\d_]{1,3}(?:\.[^\W\d_]{1,3})+$")  # U.S, e.g, a.m, Ph.D, Л.Н (letters of any script)


def _first_letter(text: str) -> str:
    """The first character of the next word in ``text`` (leading spaces and opening quotes/brackets skipped)."""
    for ch in text:
        if ch.isspace() or ch in _OPENERS:
            continue
        return ch
    return ""


def _starts_sentence(ch: str) -> bool:
    """A capital letter, or a letter of a script without case (CJK, Arabic, Devanagari ...)."""
    return ch.isupper() or (ch.isalpha() and not ch.islower())


def _is_boundary(text: str, start: int, end: int) -> bool:
    """Whether the terminator run text[start:end] (terminators, then any closing quotes/brackets) ends a sentence."""
    run = text[start:end]
    terms = run.rstrip(_CLOSERS)
    closed = len(terms) < len(run)
    after = text[end:]
    nxt = _first_letter(after)
    if not nxt:
        return True  # the end of the text (or only spaces and openers follow)
    if any(ch in _STRONG for ch in terms):
        return not (terms == "\uff0e" and after[:1].isdigit())  # fullwidth decimals: ３．２９
    if after[:1] and not after[:1].isspace():
        return False  # 3.14, e.g. inside e.g., example.com, "?!" followed by a letter ...
    if nxt.islower() and (closed or "." not in terms or terms.count(".") >= 2):
        return False  # '"Stop!" he said.', 'She works at Yahoo! in ...', 'then ... and': a new sentence is capitalised
    if terms.count(".") >= 2 or _ELLIPSIS in terms:
        return not nxt.islower() and not nxt.isdigit()  # an ellipsis: a pause unless a new sentence starts
    if "!" in terms or "?" in terms:
        return True
    # a single period: the word before it decides
    word = text[:start].rsplit(None, 1)[-1] if text[:start].strip() else ""
    word = word.lstrip(_OPENERS)
    low = word.lower()
    if low in ABBREVIATIONS_NEVER_FINAL or (_INITIAL.match(word) and word.isupper()):
        return False
    if nxt.islower() and len(word) <= _SHORT_WORD:
        return False  # an abbreviation we do not list: 'Admón. es', 'Núm. de'; a long word ends a sentence anyway
    if low in ABBREVIATIONS_MAYBE_FINAL or _DOTTED.match(word):
        return nxt.isupper()
    return True


def _split_paragraph(paragraph: str) -> list[str]:
    sentences = []
    begin = 0
    for match in _RUN.finditer(paragraph):
        if _is_boundary(paragraph, match.start(), match.end()):
            sentences.append(paragraph[begin:match.end()])
            begin = match.end()
    sentences.append(paragraph[begin:])
    return [s for s in (_SPACE.sub(" ", s).strip() for s in sentences) if s]


def split_sentences(text: str) -> list[str]:
    """``text`` -> its sentences, in order, whitespace collapsed (see the module docstring for the rules)."""
    if not isinstance(text, str):
        raise TypeError(f"text: expected a str, got {type(text).__name__}")
    out: list[str] = []
    for paragraph in _PARAGRAPH.split(text):
        out.extend(_split_paragraph(paragraph))
    return out


# ----------------------------------------------------------------------------------------------------------------------
# sentences longer than Bark reads

_CLAUSE = re.compile(r"(?<=[,;:\u2014\u2013])\s+|(?<=[\uff0c\u3001\uff1b\uff1a\u060c\u061b])\s*"
                     r"|(?<=\S[\u2014\u2013])(?=\S)")
# a word: a run of non-space characters outside CJK, or one CJK character (Bark's BERT tokenizer splits them apart)
_CJK = "\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\uac00-\ud7af\u3000-\u303f\uff00-\uffef"
_WORD = re.compile(f"[{_CJK}][^\\s{_CJK}]*?(?=[{_CJK}]|\\s|$)|[^\\s{_CJK}]+")


def _join(parts: list[str]) -> str:
    """Rejoin pieces of one sentence: a space between them unless either side is CJK (which has no spaces)."""
    out = ""
    for part in parts:
        if out and not (re.match(f"[{_CJK}]", part[:1]) or re.match(f"[{_CJK}]", out[-1:])):
            out += " "
        out += part
    return out


def _greedy(costs: list[int], cap: int) -> list[int]:
    """Run boundaries (start indices) filling runs up to ``cap`` in order; a unit costlier than cap runs alone."""
    starts, used = [0], 0
    for i, c in enumerate(costs):
        if i > 0 and used + c > cap:
            starts.append(i)
            used = 0
        used += c
    return starts


def _pack(units: list[str], count: Callable[[str], int], max_tokens: int) -> list[list[str]]:
    """Group consecutive units into as few runs of at most max_tokens tokens as possible, and among those the most
    even (the smallest largest run: a binary search on the cap). A unit longer than max_tokens is a run alone."""
    costs = [count(u) for u in units]
    for i in range(len(units) - 1):  # what joining adds (a space counts for a byte-level count, not for WordPiece)
        costs[i] += max(0, count(_join(units[i:i + 2])) - costs[i] - count(units[i + 1]))
    fewest = len(_greedy(costs, max_tokens))
    lo, hi = min(max(costs), max_tokens), max_tokens
    while lo < hi:
        mid = (lo + hi) // 2
        if len(_greedy(costs, mid)) <= fewest:
            hi = mid
        else:
            lo = mid + 1
    starts = _greedy(costs, lo) + [len(units)]
    runs = [units[a:b] for a, b in zip(starts, starts[1:], strict=False)]
    out: list[list[str]] = []
    for run in runs:  # costs are added up; a tokenizer that is not additive gets its overlong runs halved again
        if len(run) > 1 and count(_join(run)) > max_tokens:
            half = len(run) // 2
            out.extend(_pack(run[:half], count, max_tokens) + _pack(run[half:], count, max_tokens))
        else:
            out.append(run)
    return out


def _cut_word(word: str, count: Callable[[str], int], max_tokens: int) -> list[str]:
    """A single word longer than max_tokens tokens, cut into the longest prefixes that fit (the only cut inside a
    word; Bark could not read it whole)."""
    logger.warning("bark.text: a single word of %d tokens is longer than max_tokens=%d; it is cut inside",
                   count(word), max_tokens)
    out = []
    while word:
        lo, hi = 1, len(word)
        while lo < hi:  # the longest prefix within max_tokens (at least one character)
            mid = (lo + hi + 1) // 2
            if count(word[:mid]) <= max_tokens:
                lo = mid
            else:
                hi = mid - 1
        out.append(word[:lo])
        word = word[lo:]
    return out


def split_long_sentence(sentence: str, max_tokens: int, count_tokens: Callable[[str], int]) -> list[str]:
    """One sentence -> pieces of at most ``max_tokens`` tokens each: at clause marks first, then at word boundaries,
    as even as those allow; a sentence that fits is returned whole."""
    if count_tokens(sentence) <= max_tokens:
        return [sentence]
    pieces: list[str] = []
    clauses = [c for c in _CLAUSE.split(sentence) if c and c.strip()]
    for run in _pack(clauses, count_tokens, max_tokens):
        text = _join(run)
        if count_tokens(text) <= max_tokens:
            pieces.append(text)
            continue
        words: list[str] = []
        for word in _WORD.findall(text):
            words.extend([word] if count_tokens(word) <= max_tokens else _cut_word(word, count_tokens, max_tokens))
        pieces.extend(_join(r) for r in _pack(words, count_tokens, max_tokens))
    return [p.strip() for p in pieces if p.strip()]


def split_text(text: str, max_tokens: int = 256, count_tokens: Callable[[str], int] | None = None) -> list[str]:
    """``text`` -> the pieces to speak, in order: its sentences (:func:`split_sentences`), each longer than
    ``max_tokens`` tokens split further (:func:`split_long_sentence`). ``count_tokens(text) -> int`` is the model's
    tokenizer (default: one token per UTF-8 byte, an upper bound for Bark's WordPiece on Latin text)."""
    if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 1:
        raise ValueError(f"max_tokens: expected an int >= 1, got {max_tokens!r}")
    count = count_tokens if count_tokens is not None else (lambda s: len(s.encode("utf-8")))
    pieces: list[str] = []
    for sentence in split_sentences(text):
        pieces.extend(split_long_sentence(sentence, max_tokens, count))
    return pieces
