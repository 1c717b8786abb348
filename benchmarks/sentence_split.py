"""Score bark.text.split_sentences against pysbd's golden rules (and pysbd itself on the same cases).

    python benchmarks/sentence_split.py --pysbd-tests PATH/TO/pySBD/tests/lang [--json out.json]

The cases are the lists ``GOLDEN_<LANG>_RULES_TEST_CASES`` (and ``<LANG>_MORE_TEST_CASES`` where pysbd has them:
reported apart) of pysbd's test files (github.com/nipunsadvilkar/pySBD, tag v0.3.4, ``tests/lang/test_*.py``), for the
languages Bark speaks that pysbd covers: en, de, es, fr, hi, it, ja, pl, ru, zh (pysbd has no ko, pt or tr). The test
files are read as data (``ast.literal_eval`` of those list literals; nothing of them runs) from a checkout given with
``--pysbd-tests`` (or fetched at run time with ``--fetch``: a shallow git clone into a temporary directory); nothing
fetched is kept. The pypi sdists of pysbd do not ship these files.

A case counts as right when the splitter returns exactly the expected sentences (each compared with runs of whitespace
made one space, ends stripped). pysbd runs as its tests run it (``Segmenter(language=..., clean=False)``);
``pip install pysbd==0.3.4`` for its column (without it only ours is scored).
"""

from __future__ import annotations

import argparse
import ast
import json
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bark.text import split_sentences  # noqa: E402

FILES = {"en": "english", "de": "deutsch", "es": "spanish", "fr": "french", "hi": "hindi", "it": "italian",
         "ja": "japanese", "pl": "polish", "ru": "russian", "zh": "chinese"}
NOT_IN_PYSBD = ("ko", "pt", "tr")
REPO = "https://github.com/nipunsadvilkar/pySBD"
TAG = "v0.3.4"


def load_cases(tests_dir: Path, lang: str) -> dict[str, list[tuple[str, list[str]]]]:
    """{"golden": [(text, sentences)], "more": [...]} from pysbd's test file for ``lang`` (list literals only)."""
    source = (tests_dir / f"test_{FILES[lang]}.py").read_text(encoding="utf-8")
    found: dict[str, list] = {"golden": [], "more": []}
    code = lang.upper()
    for node in ast.parse(source).body:
        if not isinstance(node, ast.Assign) or len(node.targets) != 1 or not isinstance(node.targets[0], ast.Name):
            continue
        name = node.targets[0].id
        kind = ("golden" if name == f"GOLDEN_{code}_RULES_TEST_CASES"
                else "more" if name == f"{code}_MORE_TEST_CASES" else None)
        if kind is None:
            continue
        for element in node.value.elts:
            if isinstance(element, ast.Call):  # pytest.param(text, sentences, marks=...): the case, its mark aside
                element = ast.Tuple(elts=element.args[:2], ctx=ast.Load())
            text, sentences = ast.literal_eval(element)
            found[kind].append((text, list(sentences)))
    return found


def _norm(sentences) -> list[str]:
    return [" ".join(s.split()) for s in sentences if s.strip()]


def score(cases, split) -> tuple[int, list[tuple[str, list[str], list[str]]]]:
    right, wrong = 0, []
    for text, expected in cases:
        got = _norm(split(text))
        if got == _norm(expected):
            right += 1
        else:
            wrong.append((text, _norm(expected), got))
    return right, wrong


def _pysbd_splitter(lang: str):
    try:
        import pysbd
    except ImportError:
        return None
    segmenter = pysbd.Segmenter(language=lang, clean=False)
    return segmenter.segment


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pysbd-tests", type=Path, help="pySBD's tests/lang directory (a checkout of tag v0.3.4)")
    parser.add_argument("--fetch", action="store_true", help=f"git clone {REPO} ({TAG}) into a temporary directory")
    parser.add_argument("--json", type=Path, help="write the scores (and our failures) here")
    parser.add_argument("--show", action="store_true", help="print every case ours gets wrong")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        tests_dir = args.pysbd_tests
        if tests_dir is None:
            if not args.fetch:
                parser.error("give --pysbd-tests DIR or --fetch")
            subprocess.run(["git", "clone", "--quiet", "--depth", "1", "--branch", TAG, REPO, tmp], check=True)
            tests_dir = Path(tmp) / "tests" / "lang"
        rows = []
        for lang in FILES:
            cases = load_cases(tests_dir, lang)
            theirs = _pysbd_splitter(lang)
            for kind, items in cases.items():
                if not items:
                    continue
                ours_right, ours_wrong = score(items, split_sentences)
                pysbd_right = score(items, theirs)[0] if theirs is not None else None
                rows.append({"lang": lang, "set": kind, "cases": len(items), "ours": ours_right,
                             "pysbd": pysbd_right, "ours_wrong": ours_wrong})
    print(f"{'lang':5} {'set':7} {'cases':>5} {'ours':>5} {'pysbd':>6}")
    totals = {}
    for r in rows:
        p = "-" if r["pysbd"] is None else r["pysbd"]
        print(f"{r['lang']:5} {r['set']:7} {r['cases']:5d} {r['ours']:5d} {p:>6}")
        t = totals.setdefault(r["set"], [0, 0, 0])
        t[0] += r["cases"]
        t[1] += r["ours"]
        t[2] += r["pysbd"] or 0
    for kind, (n, ours, theirs) in totals.items():
        print(f"{'all':5} {kind:7} {n:5d} {ours:5d} {theirs:6d}")
    print(f"(pysbd has no golden rules for {', '.join(NOT_IN_PYSBD)})")
    if args.show:
        for r in rows:
            for text, expected, got in r["ours_wrong"]:
                print(f"\n[{r['lang']} {r['set']}] {text!r}\n  expected {expected}\n  ours     {got}")
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"pysbd_tests": TAG, "rows": rows, "totals": totals}, ensure_ascii=False,
                                        indent=1), encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
