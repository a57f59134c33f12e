"""Reasoning I/O: prompt and path formats, answer extraction, answer normalisation and correctness.

Everything here is a pure string function; the regular expressions are module constants so that the exact rules
can be read in one place. ``ANSWER_EXTRACTION_VERSION`` names the rules: bump it whenever extraction or
normalisation changes, and write it into every result that reports an accuracy.

The paper measures answer accuracy but does not publish its extraction rules; ours follow the common practice of
lm-evaluation-harness' GSM8K filters:

- ``extract_answer(mode="strict")``: the first ``Answer: X`` line (the format our paths are trained on).
- ``extract_answer(mode="flexible")``: strict; else ``#### X`` (GSM8K); else the last ``\\boxed{X}``; else the last
  "the answer is X"; else the last number in the text. The contract names only strict and the last number; the
  middle three make instruct models that answer in their own style gradable and never change a strict hit.
- ``normalize_answer``: numbers compare by value (``1,000`` = ``1000`` = ``1000.0``, ``3/4`` = ``0.75``, ``$5`` =
  ``5``, ``\\frac{3}{4}`` = ``3/4``), exact rational arithmetic, no float tolerance; other text is lower-cased,
  stripped of punctuation and of the articles a/an/the (unless nothing else is left), whitespace collapsed.
- ``is_correct(mode="flexible")`` also accepts a number followed by words or punctuation (``18 eggs.``) when the gold
  answer is a number. ``mode`` is a keyword the contract did not name; the default keeps the contract's behaviour.
"""

from __future__ import annotations

import re
import string
import unicodedata
from decimal import Decimal
from fractions import Fraction
from typing import Literal

ANSWER_EXTRACTION_VERSION = "1"

Mode = Literal["strict", "flexible"]

PROMPT_TEMPLATE = "Question: {question}\nReasoning:\n"
ANSWER_PREFIX = "Answer:"

# "Answer: X" at the start of a line (leading blanks allowed); X is the rest of the line.
ANSWER_LINE_RE = re.compile(r"^[ \t]*Answer:[ \t]*(\S[^\n]*?)[ \t]*$", re.MULTILINE)
# GSM8K's final-answer marker.
HASHES_RE = re.compile(r"^[ \t]*####[ \t]*(\S[^\n]*?)[ \t]*$", re.MULTILINE)
# Where a \boxed{...} begins; the braces are matched by hand (they nest: \boxed{\frac{1}{2}}).
BOXED_START_RE = re.compile(r"\\boxed\s*\{")
# "The answer is X" / "the final answer is: X"; X runs to the end of the line (a lookahead, so every occurrence on
# a line is found and the last one can win).
ANSWER_IS_RE = re.compile(r"\banswer\s+is\s*:?[ \t]*(?=(\S[^\n]*))", re.IGNORECASE)
# The end of a sentence inside a line: a full stop, question or exclamation mark, then a blank.
SENTENCE_END_RE = re.compile(r"[.!?]\s")
# A number inside running text: 1,000  -3  2.5  3/4 ; a minus counts only when not glued to a word ("18-5").
NUMBER_RE = re.compile(r"(?:(?<![\w)])-)?\d+(?:,\d{3})*(?:\.\d+)?(?:/\d+(?!\.\d))?")
# A whole string that is one number, with an optional sign and currency symbol.
_NUM_CORE = r"(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?|\.\d+"
NUMBER_FULL_RE = re.compile(
    rf"^(?P<sign1>[-+]?)[ \t]*[$€£]?[ \t]*(?P<sign2>[-+]?)(?P<num>{_NUM_CORE})$"
)
FRACTION_FULL_RE = re.compile(r"^(?P<sign>[-+]?)[ \t]*(?P<num>\d+)[ \t]*/[ \t]*(?P<den>\d+)$")
# Flexible correctness: a number, then words/punctuation only (units, a full stop), no further arithmetic.
LEADING_NUMBER_RE = re.compile(
    rf"^(?P<number>[-+]?[ \t]*[$€£]?[ \t]*[-+]?(?:{_NUM_CORE})(?:[ \t]*/[ \t]*\d+)?)"
    r"(?P<rest>[^\d=+*/×÷^<>]*)$"
)
# LaTeX fractions of integers, \frac{3}{4} (also \dfrac, \tfrac), read as 3/4.
LATEX_FRACTION_RE = re.compile(r"^(?P<sign>-?)\\[dt]?frac\{(?P<num>\d+)\}\{(?P<den>\d+)\}$")
ARTICLES_RE = re.compile(r"\b(?:a|an|the)\b")
_WRAPPERS = (("$", "$"), ("\\(", "\\)"), ("**", "**"))
_PUNCT = set(string.punctuation)


def format_prompt(question: str) -> str:
    """The plain prompt for base and tiny models: ``"Question: {q}\\nReasoning:\\n"``."""
    return PROMPT_TEMPLATE.format(question=question.strip())


def format_path(rationale: str | None, answer: str) -> str:
    """A path: the rationale lines as given, then ``"Answer: {answer}"`` on its own line."""
    answer = answer.strip()
    if rationale is None or not rationale.strip():
        return f"{ANSWER_PREFIX} {answer}"
    return f"{rationale.strip(chr(10)).rstrip()}\n{ANSWER_PREFIX} {answer}"


def boxed_contents(text: str) -> list[str]:
    """The contents of every ``\\boxed{...}`` in ``text`` (nested braces matched), in order."""
    found = []
    for match in BOXED_START_RE.finditer(text):
        depth, start = 1, match.end()
        for i in range(start, len(text)):
            if text[i] == "{":
                depth += 1
            elif text[i] == "}":
                depth -= 1
                if depth == 0:
                    found.append(text[start:i].strip())
                    break
    return found


def clean_answer_span(span: str) -> str:
    """Trim what surrounds an extracted answer: blanks, a final full stop, ``$...$``/``\\boxed{}``/bold wrappers."""
    span = span.strip()
    boxed = boxed_contents(span)
    if boxed:
        span = boxed[-1]
    changed = True
    while changed and span:
        changed = False
        for left, right in _WRAPPERS:
            if len(span) > len(left) + len(right) and span.startswith(left) and span.endswith(right):
                span, changed = span[len(left) : -len(right)].strip(), True
        if span.endswith(".") and not span.endswith(".."):
            span, changed = span[:-1].rstrip(), True
    return span


def answer_is_span(match: re.Match) -> str:
    """The cleaned answer of an ``ANSWER_IS_RE`` match, cut at the end of its sentence."""
    span = match.group(1)
    end = SENTENCE_END_RE.search(span)
    return clean_answer_span(span[: end.start()] if end else span)


def last_number(text: str) -> str | None:
    """The last number in running text (``NUMBER_RE``), or None."""
    numbers = NUMBER_RE.findall(text)
    return numbers[-1] if numbers else None


def extract_answer(text: str, *, mode: Mode = "flexible") -> str | None:
    """The final answer in a generated path, or None when there is none.

    strict: the first ``Answer: X`` line, X returned as written (stripped).
    flexible: strict; else ``#### X``; else the last ``\\boxed{X}``; else the last "the answer is X"; else the last
    number. A span found by the last three is cleaned with ``clean_answer_span``.
    """
    if mode not in ("strict", "flexible"):
        raise ValueError(f"mode must be 'strict' or 'flexible', got {mode!r}")
    match = ANSWER_LINE_RE.search(text)
    if match:
        return match.group(1)
    if mode == "strict":
        return None
    match = HASHES_RE.search(text)
    if match:
        return clean_answer_span(match.group(1)) or None
    boxed = [b for b in boxed_contents(text) if b]
    if boxed:
        return clean_answer_span(boxed[-1]) or None
    spans = [answer_is_span(m) for m in ANSWER_IS_RE.finditer(text)]
    spans = [s for s in spans if s]
    if spans:
        return spans[-1]
    return last_number(text)


def parse_number(text: str) -> Fraction | None:
    """The exact value of a string that is one number (``-1,000.50``, ``$5``, ``3/4``, ``\\frac{3}{4}``), else
    None. A Unicode minus sign (U+2212) reads as ``-``."""
    text = text.strip().replace("\u2212", "-")
    latex = LATEX_FRACTION_RE.match(text)
    if latex:
        text = f"{latex.group('sign')}{latex.group('num')}/{latex.group('den')}"
    match = NUMBER_FULL_RE.match(text)
    if match:
        if match.group("sign1") and match.group("sign2"):
            return None
        value = Fraction(match.group("num").replace(",", ""))
        return -value if "-" in (match.group("sign1") + match.group("sign2")) else value
    match = FRACTION_FULL_RE.match(text)
    if match and int(match.group("den")) != 0:
        value = Fraction(int(match.group("num")), int(match.group("den")))
        return -value if match.group("sign") == "-" else value
    return None


def format_number(value: Fraction) -> str:
    """Canonical text of an exact number: ``1000``, ``0.75``, ``-3``; ``1/3`` when no finite decimal exists."""
    if value.denominator == 1:
        return str(value.numerator)
    den = value.denominator
    for p in (2, 5):
        while den % p == 0:
            den //= p
    if den != 1:
        return f"{value.numerator}/{value.denominator}"
    text = format(Decimal(value.numerator) / Decimal(value.denominator), "f")
    return text.rstrip("0").rstrip(".") if "." in text else text


def _normalize_text(text: str) -> str:
    chars = [" " if ch in _PUNCT or unicodedata.category(ch).startswith("P") else ch for ch in text.lower()]
    words = " ".join("".join(chars).split())
    without_articles = " ".join(ARTICLES_RE.sub(" ", words).split())
    return without_articles or words


def normalize_answer(ans: str) -> str:
    """Canonical form of an answer: numbers by value (``format_number``), other text lower-cased without
    punctuation, articles or repeated whitespace. ``"1,000" == "1000" == "1000.0"``, ``"3/4" == "0.75"``."""
    span = clean_answer_span(ans)
    value = parse_number(span)
    if value is not None:
        return format_number(value)
    return _normalize_text(span)


def is_correct(pred: str | None, gold: str, *, mode: Mode = "flexible") -> bool:
    """Whether the predicted answer equals the gold answer after ``normalize_answer``.

    flexible (the default) also accepts, for a numeric gold answer, a prediction that is a number followed only by
    words or punctuation (``"18 eggs."``), but not one followed by more arithmetic (``"18 + 5"``).
    """
    if mode not in ("strict", "flexible"):
        raise ValueError(f"mode must be 'strict' or 'flexible', got {mode!r}")
    if pred is None or not pred.strip():
        return False
    if normalize_answer(pred) == normalize_answer(gold):
        return True
    if mode == "strict":
        return False
    gold_value = parse_number(clean_answer_span(gold))
    if gold_value is None:
        return False
    match = LEADING_NUMBER_RE.match(clean_answer_span(pred))
    if not match:
        return False
    value = parse_number(match.group("number"))
    return value is not None and value == gold_value
