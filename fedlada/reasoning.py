"""Reasoning I/O: prompt and path formats, answer extraction, answer normalisation and correctness.

Everything here is a pure string function; the regular expressions are module constants so that the exact rules
can be read in one place. ``ANSWER_EXTRACTION_VERSION`` names the rules: bump it whenever extraction or
normalisation changes, and write it into every result that reports an accuracy.

The paper measures answer accuracy but does not publish its extraction rules; ours follow the common practice of
lm-evaluation-harness' GSM8K filters:

- ``extract_answer(mode="strict")``: the first ``Answer: X`` line (the format our paths are trained on).
- ``extract_answer(mode="flexible")``: strict; else the last answer line in another spelling (``answer: X``,
  ``**Answer:** X``, ``Final Answer: X``); else ``#### X`` (GSM8K); else the last ``\\boxed{X}``; else the last
  "the answer is X"; else an answer marker ending its line with the answer alone on the last line
  (``Final answer:\\nC``, version "4"); else the last number in the text. The contract names only strict and the last number; the
  others make instruct models that answer in their own style gradable and never change a strict hit.
- ``normalize_answer`` (after Unicode NFKC, so a full-width ``Ｂ`` is ``B``): numbers compare by value (``1,000`` =
  ``1000`` = ``1000.0``, ``3/4`` = ``0.75``, ``$5`` = ``5``, ``\\frac{3}{4}`` = ``3/4``), exact rational arithmetic,
  no float tolerance; a number followed by a unit keeps its value and sign (``-5 °C``, ``12kg`` = ``12 kg``,
  ``1,200 kg`` = ``1200 kg``, ``1/2 kg`` = ``0.5 kg``); other text is lower-cased, its punctuation dropped except
  between digits (``3.4``) and a ``+``/``#`` after a letter (``C++``, ``C#``), the articles an/the dropped, and
  a leading "a" dropped only before a longer word (``a cat`` = ``cat``, but ``Vitamin A`` and ``A B`` keep theirs),
  single letters with full stops read without them and the blanks between them (``U.S.A.`` = ``USA``, ``J. R. R.``
  = ``J.R.R.``), whitespace collapsed. Before that, superscripts after a digit read as powers (``10²`` = ``10^2``)
  and after a letter as a unit's digit (``m²`` = ``m^2`` = ``m2``), vulgar fractions as fractions (``1½`` =
  ``1 1/2`` = ``3/2``), ``\\text{..}``-style wrappers and LaTeX spacing and escaped ``\\$`` are undone, LaTeX
  fractions anywhere read as ``a/b`` (``2\\frac{1}{2}`` = ``2 1/2``, ``\\frac{3}{-4}``, ``\\frac34``).
- ``is_correct(mode="flexible")`` also accepts a number followed by words or punctuation (``18 eggs.``, ``18%``) when
  the gold answer is a number, but not by words that change its value (``18 million``, ``18k``, ``18 dozen``,
  ``18 squared``, ``18x``, ``18 or more``: ``VALUE_WORDS_RE``), a variable's value (``x = 18``), and the gold's
  number alone when the gold is a number with a unit (``12`` for ``12 kg``, but not ``12 lb``); a multiple-choice
  letter by itself or with its option (gold ``C`` or ``(C) Paris``: ``C``, ``(C)``, ``C) Paris``, ``option C``); and
  the "the answer is X" inside an answer line. ``mode`` is a keyword the contract did not name; the default keeps
  the contract's behaviour.
- "the answer is X" ends at the end of its sentence, not at an abbreviation's or an initial's full stop (``Dr.
  Smith``, ``St. Louis``, ``U.S. Grant``).
"""

from __future__ import annotations

import re
import string
import unicodedata
from decimal import Decimal
from fractions import Fraction
from typing import Literal

ANSWER_EXTRACTION_VERSION = "4"

Mode = Literal["strict", "flexible"]

PROMPT_TEMPLATE = "Question: {question}\nReasoning:\n"
ANSWER_PREFIX = "Answer:"

# "Answer: X" at the start of a line (leading blanks allowed); X is the rest of the line.
ANSWER_LINE_RE = re.compile(r"^[ \t]*Answer:[ \t]*(\S[^\n]*?)[ \t]*$", re.MULTILINE)
# An answer line in another spelling (flexible mode only): any case, markdown bold or a list dash around it, "Final".
LOOSE_ANSWER_LINE_RE = re.compile(
    r"^[ \t>*_#-]*(?:the[ \t]+)?(?:final[ \t]+)?answer[ \t]*[*_]*[ \t]*:[ \t]*[*_]*[ \t]*((?![*_]+[ \t]*$)\S[^\n]*?)"
    r"[ \t]*$",
    re.MULTILINE | re.IGNORECASE)
# An answer marker ending its line and the answer alone on the text's last line ("Final answer:\nC"; flexible only);
# a last line with an equation is working ("Answer:\n1 + 1 = 2"), left to the last-number rule.
ANSWER_BELOW_RE = re.compile(
    r"^[ \t>*_#-]*(?:the[ \t]+)?(?:final[ \t]+)?answer[ \t]*[*_]*[ \t]*:[ \t]*[*_]*[ \t]*\n(?:[ \t]*\n)?"
    r"[ \t]*((?![^\n]*=)\S[^\n]*?)[ \t]*\s*\Z", re.MULTILINE | re.IGNORECASE)
# GSM8K's final-answer marker.
HASHES_RE = re.compile(r"^[ \t]*####[ \t]*(\S[^\n]*?)[ \t]*$", re.MULTILINE)
# Where a \boxed{...} begins; the braces are matched by hand (they nest: \boxed{\frac{1}{2}}).
BOXED_START_RE = re.compile(r"\\boxed\s*\{")
# "The answer is X" / "the final answer is: X"; X runs to the end of the line (a lookahead, so every occurrence on
# a line is found and the last one can win).
ANSWER_IS_RE = re.compile(r"\banswer\s+is\s*:?[ \t]*(?=(\S[^\n]*))", re.IGNORECASE)
# The end of a sentence inside a line: a full stop, question or exclamation mark, then a blank (a full stop after
# an abbreviation or an initial is not one: see ``sentence_end``).
SENTENCE_END_RE = re.compile(r"[.!?]\s")
# Abbreviations that stand before a name or a number and so never end a sentence ("Dr. Smith", "St. Louis",
# "approx. 5 kg"); a single letter ("vitamin C. It ...") or "no." ("no. Fire is hot.") may, so they are not listed.
ABBREVIATIONS = frozenset("dr mr mrs ms prof st mt jr sr vs approx e.g i.e".split())
_WORD_BEFORE_RE = re.compile(r"([A-Za-z][A-Za-z.]*)$")
# A number inside running text: 1,000  -3  2.5  3/4 ; a minus counts only when not glued to a word ("18-5").
NUMBER_RE = re.compile(r"(?:(?<![\w)])-)?\d+(?:,\d{3})*(?:\.\d+)?(?:/\d+(?!\.\d))?")
# A whole string that is one number, with an optional sign and currency symbol.
_NUM_CORE = r"(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?|\.\d+"
NUMBER_FULL_RE = re.compile(
    rf"^(?P<sign1>[-+]?)[ \t]*[$€£¥₹]?[ \t]*(?P<sign2>[-+]?)(?P<num>{_NUM_CORE})(?:[ \t]*[€£$¥₹])?$"
)
FRACTION_FULL_RE = re.compile(r"^(?P<sign>[-+]?)[ \t]*(?P<num>\d+)[ \t]*/[ \t]*(?P<den>\d+)$")
# Flexible correctness: a number, then words/punctuation only (units, a full stop), no further arithmetic.
LEADING_NUMBER_RE = re.compile(
    rf"^(?P<number>[-+]?[ \t]*[$€£¥₹]?[ \t]*[-+]?(?:\d+[ \t]+\d+[ \t]*/[ \t]*\d+|(?:{_NUM_CORE})(?:[ \t]*/[ \t]*\d+)?))"
    # a "/" in a unit (km/h), not a fraction's; a unit's power right after its letter (m2, cm3, s^-1; not 12h30)
    r"(?P<rest>(?:[^\d=+*/×÷^<>]|/(?![ \t]*\d)|(?<=[^\W\d_])(?:\^-?\d|-?[23](?!\d)))*)$"
)
# LaTeX fractions of integers, \frac{3}{4} (also \dfrac, \tfrac), read as 3/4.
LATEX_FRACTION_RE = re.compile(r"^(?P<sign>-?)\\[dt]?frac(?:\{(?P<sign2>-?)(?P<num>\d+)\}\{(?P<den>\d+)\}|"
                               r"(?P<num1>\d)(?P<den1>\d))$")  # also \frac{-3}{4} and the short \frac34
# A mixed number, 1 1/2 (also 1½, written so by _prepared).
MIXED_NUMBER_RE = re.compile(r"^(?P<sign>[-+]?)[ \t]*(?P<whole>\d+)[ \t]+(?P<num>\d+)[ \t]*/[ \t]*(?P<den>\d+)$")
# Words right after a number that change its value, so that it is no longer that number with a unit: "12 million",
# "12k", "12 dozen", "12 squared", "3 or more", "12x" (a variable).
VALUE_WORDS_RE = re.compile(
    r"^[ \t]*(?i:(?:hundreds?|thousands?|millions?|billions?|trillions?|dozens?|squared|cubed|lakhs?|lacs?|crores?"
    r"|tenths?|hundredths?|thousandths?|millones?|millionen|milliarden?|milliards?|mio|mrd|grand|thou|pi|π|万|亿"
    r"|halves|half|thirds?|quarters?|fourths?|fifths?|sixths?|sevenths?|eighths?|ninths?|bce?)(?![^\W\d_])"
    r"|and[ \t]+(?:a|one|two|three)?[ \t]*(?:half|quarters?|thirds?)\b"
    r"|e[-+]?\d"  # 12e3
    r"|i[ \t]*$"  # 3 i
    r"|or[ \t]+(?:more|less|fewer|greater|higher|lower|above|below|over|under)\b"
    r"|[xyz][ \t]*$)"  # "12 x": a variable
    r"|^[ \t]*(?:k|bn|mn)(?![^\W\d_])"  # 12 k (but "300 K" is kelvin, "12 M" molar)
    # attached only: 12k and $12K, 12M, 12B (thousand, million, billion), 12x, 12i, 12n
    r"|^(?:[kKMB]|[xyzin])(?![^\W\d_])")
# last_number's numbers: a mixed number (2 1/2) whole; not a unit's power (m2) or a word's digit
_RUNNING_NUMBER_RE = re.compile(r"(?<![^\W\d_])(?:(?:(?<![\w)])-)?\d+[ \t]+\d+/\d+(?![\d.])|" + NUMBER_RE.pattern + ")")
_MONEY_SCALE_RE = re.compile(r"[ \t]*[MBK](?![^\W\d_])")  # $12 M, $12 B: money, a million and a billion


def _changes_value(match: re.Match) -> bool:
    """Whether what follows the number of a ``LEADING_NUMBER_RE`` match changes its value (``VALUE_WORDS_RE``; after
    a currency amount also a spaced M, B or K)."""
    rest = match.group("rest")
    return VALUE_WORDS_RE.match(rest) is not None or (
        any(c in match.group("number") for c in "$€£¥₹") and _MONEY_SCALE_RE.match(rest) is not None)


# A variable's value, "x = -5": the value is the answer (flexible mode).
VARIABLE_VALUE_RE = re.compile(r"^[ \t]*([A-Za-z])[ \t]*=[ \t]*(?P<value>[^=,;]+)$")
# LaTeX text wrappers, around an answer or in it: \text{B}, \textbf{(B)}, 12\,\mathrm{cm}; LaTeX spacing; \pi.
LATEX_TEXT_RE = re.compile(r"\\(?:text|textbf|textit|textrm|mathrm|mathbf|mbox|operatorname)\s*\{(?P<inner>[^{}]*)\}")
_LATEX_SPACE_RE = re.compile(r"\\[,;:! ]|\\q?quad\b|~")
# LaTeX fractions anywhere, \frac{1}{2} cup, 2\frac{1}{2}, \frac34, \frac{3}{-4}: written as 1/2 (2 1/2).
_LATEX_FRAC_ANY_RE = re.compile(r"(\d?)[ \t]*\\[dt]?frac[ \t]*(?:\{[ \t]*(-?)[ \t]*(\d+)[ \t]*\}[ \t]*\{[ \t]*(-?)[ \t]*(\d+)[ \t]*\}"
                                r"|(\d)[ \t]*(\d))")
# Superscript digits (10², m³), read as ^2, and vulgar fractions (½, 1½), read as 1/2 and 1 1/2.
_SUPERSCRIPTS = str.maketrans("⁰¹²³⁴⁵⁶⁷⁸⁹⁻", "0123456789-")
_SUPERSCRIPT_RE = re.compile(r"(.?)([⁰¹²³⁴⁵⁶⁷⁸⁹⁻]+)")
_UNIT_POWER_RE = re.compile(r"(?<=[^\W\d_])\^(?=-?\d)")
_BRACED_POWER_RE = re.compile(r"\^\{[ \t]*(-?\d+)[ \t]*\}")
_LATEX_GROUPED_RE = re.compile(r"(?<=\d)\\,(?=\d{3}(?!\d))")
_PI_WORD_RE = re.compile(r"(?<![^\W\d_])pi(?![^\W\d_])", re.IGNORECASE)
_DASHES = str.maketrans({"\u2212": "-", "\u2010": "-", "\u2011": "-", "\u2012": "-", "\u2013": "-"})
_VULGAR_RE = re.compile(r"(\d?)([\u00bc-\u00be\u2150-\u215e])")
# Single letters with full stops, U.S., B.C., J. R. R.: initials or an abbreviation, compared without dots and the
# blanks between them (J.R.R. Tolkien = J. R. R. Tolkien).
_DOTTED_RE = re.compile(r"(?<![\w.])([^\W\d_]\.(?:[ \t]?[^\W\d_](?:\.|(?![\w.])))+)")
ARTICLES_RE = re.compile(r"\b(?:an|the)\b")
LEADING_A_RE = re.compile(r"^a (?!and\b|or\b)(?=\w\w)")
# A multiple-choice answer: "C", "(C)", "(C) Paris", "C) Paris", "option C", "choice (C)"; in a prediction also
# "C. Paris" and "C: Paris" (a capital: in a gold answer "C. elegans" is a name, not a choice).
CHOICE_RE = re.compile(r"^(?:(?:option|choice)[ \t]+)?(?:\((?P<p>[A-Za-z])\)(?:\W.*)?|(?P<b>[A-Za-z])\)(?:\s.*)?|"
                       r"(?P<u>[A-Za-z])[.:](?:\s.*)?|(?P<s>[A-Za-z]))$", re.IGNORECASE | re.DOTALL)
# Choice markers anywhere in a prediction: "(A) or (B)" and "A) Rome B) Paris" name several
CHOICE_MARK_RE = re.compile(r"\(([A-Za-z])\)|(?:^|\s)([A-Za-z])\)")
_PARENS_RE = re.compile(r"^\((.*)\)$", re.DOTALL)
_CURRENCY = set("$€£¥₹")
_PERCENT_RE = re.compile(r"\bper ?cent\b")
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
    span = span.replace("\\$", "$").replace("\\%", "%")  # LaTeX-escaped signs: \boxed{\$12.50}
    changed = True
    while changed and span:
        changed = False
        text = LATEX_TEXT_RE.fullmatch(span)  # a wrapper around the whole span
        if text:
            span, changed = text.group("inner").strip(), True
        for left, right in _WRAPPERS:
            if len(span) > len(left) + len(right) and span.startswith(left) and span.endswith(right):
                span, changed = span[len(left) : -len(right)].strip(), True
        if span.endswith(".") and not span.endswith(".."):
            span, changed = span[:-1].rstrip(), True
    return span


def sentence_end(text: str) -> int | None:
    """Where the first sentence of ``text`` ends (the index of its full stop, question or exclamation mark), or None.
    A full stop right after an abbreviation of ``ABBREVIATIONS`` (``Dr.``, ``St.``, ``approx.``) does not end one."""
    for match in SENTENCE_END_RE.finditer(text):
        if text[match.start()] == ".":
            word = _WORD_BEFORE_RE.search(text[: match.start()])
            if word and word.group(1).lower() in ABBREVIATIONS:
                continue
        return match.start()
    return None


def sentence_prefixes(text: str) -> list[str]:
    """``text`` cut at each of its sentence ends in turn, then whole, each cleaned (``clean_answer_span``): the
    readings of a "the answer is X. More text" span, where a full stop may end X or belong to it (``U.S. Grant``,
    ``vitamin C. It ...``)."""
    cuts = [m.start() for m in SENTENCE_END_RE.finditer(text)] + [len(text)]
    out: list[str] = []
    for cut in cuts:
        span = clean_answer_span(text[:cut])
        if span and span not in out:
            out.append(span)
    return out


def answer_is_span(match: re.Match) -> str:
    """The cleaned answer of an ``ANSWER_IS_RE`` match, cut at the end of its sentence (``sentence_end``)."""
    span = match.group(1)
    end = sentence_end(span)
    return clean_answer_span(span[:end] if end is not None else span)


def last_number(text: str) -> str | None:
    """The last number in running text (``NUMBER_RE``, after ``_plain_math``: ``$\\frac{3}{4}$`` is 3/4, a U+2212
    minus reads as ``-``), with a word after it that changes its value (``12 million``), or None."""
    text = _plain_math(text)
    numbers = list(_RUNNING_NUMBER_RE.finditer(text))
    if not numbers:
        return None
    last = numbers[-1]
    scale = VALUE_WORDS_RE.match(text[last.end():])
    return last.group(0) + (scale.group(0).rstrip() if scale else "")


def extract_answer(text: str, *, mode: Mode = "flexible") -> str | None:
    """The final answer in a generated path, or None when there is none.

    strict: the first ``Answer: X`` line, X returned as written (stripped).
    flexible: strict; else the last answer line in another spelling (``LOOSE_ANSWER_LINE_RE``); else ``#### X``;
    else the last ``\\boxed{X}``; else the last "the answer is X"; else a bare answer marker with the answer alone on
    the last line (``ANSWER_BELOW_RE``); else the last number. A span found by the
    others than strict is cleaned with ``clean_answer_span``.
    """
    return _extract(text, mode)[0]


def _extract(text: str, mode: Mode) -> tuple[str | None, re.Match | None]:
    """``extract_answer``'s answer, and the "the answer is" match it came from (None when it came from elsewhere)."""
    if mode not in ("strict", "flexible"):
        raise ValueError(f"mode must be 'strict' or 'flexible', got {mode!r}")
    match = ANSWER_LINE_RE.search(text)
    if match:
        return match.group(1), None
    if mode == "strict":
        return None, None
    loose = [clean_answer_span(m.group(1)) for m in LOOSE_ANSWER_LINE_RE.finditer(text)]
    loose = [a for a in loose if any(ch.isalnum() for ch in a)]  # "**Answer:**" alone: the answer is elsewhere
    if loose:
        return loose[-1], None
    match = HASHES_RE.search(text)
    if match:
        return clean_answer_span(match.group(1)) or None, None
    boxed = [b for b in boxed_contents(text) if b]
    if boxed:
        return clean_answer_span(boxed[-1]) or None, None
    spans = [(answer_is_span(m), m) for m in ANSWER_IS_RE.finditer(text)]
    spans = [(s, m) for s, m in spans if s]
    if spans:
        return spans[-1]
    below = ANSWER_BELOW_RE.search(text)
    if below and is_short_answer(below.group(1)):
        return clean_answer_span(below.group(1)), None
    return last_number(text), None


def is_short_answer(line: str) -> bool:
    """Whether a line below a bare answer marker reads as the answer itself: a choice letter, a number, a number with
    a unit of a word or two, or a short text without digits (``Paris``, ``yes``); a sentence (``The total is 12.``,
    ``Therefore 12``) is reasoning, left to the last-number rule."""
    span = clean_answer_span(line)
    if not span:
        return False
    if choice_letter(span) is not None or parse_number(span) is not None:
        return True
    with_unit = _number_and_unit(span)
    if with_unit is not None and LEADING_NUMBER_RE.match(span) and len(with_unit[1].split()) <= 2:
        return True
    return not any(ch.isdigit() for ch in span) and len(span.split()) <= 3


def grade(text: str, gold: str) -> bool:
    """Whether a generated path's answer is the gold one: ``is_correct(extract_answer(text), gold)``, where an answer
    taken from "the answer is X. More text" is also tried at its other sentence ends (``sentence_prefixes``), as a
    full stop may end X or belong to it (``U.S. Grant``; ``vitamin C. It ...``). What the evaluation counts."""
    answer, match = _extract(text, "flexible")
    if answer is not None and is_correct(answer, gold):
        return True
    return match is not None and any(is_correct(x, gold) for x in sentence_prefixes(match.group(1)))


def parse_number(text: str) -> Fraction | None:
    """The exact value of a string that is one number (``-1,000.50``, ``$5``, ``3/4``, ``\\frac{3}{4}``), else
    None. A Unicode minus sign (U+2212) reads as ``-``."""
    text = text.strip().replace("\u2212", "-")
    latex = LATEX_FRACTION_RE.match(text)
    if latex:
        num, den = latex.group("num") or latex.group("num1"), latex.group("den") or latex.group("den1")
        text = f"{'-' if (latex.group('sign') == '-') != (latex.group('sign2') == '-') else ''}{num}/{den}"
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
    match = MIXED_NUMBER_RE.match(text)
    if match and 0 < int(match.group("num")) < int(match.group("den")):
        value = int(match.group("whole")) + Fraction(int(match.group("num")), int(match.group("den")))
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


def _is_punct(ch: str) -> bool:
    return ch in _PUNCT or unicodedata.category(ch).startswith("P")


def _normalize_text(text: str) -> str:
    initial_a = re.match(r"[ \t]*a\.", text, re.IGNORECASE) is not None  # "A. Lincoln": an initial, not "a"
    text = _DOTTED_RE.sub(lambda m: re.sub(r"[.\s]", "", m.group(1)) + " ", text.lower())  # U.S. = US
    chars = []
    bracketed = text.lstrip()[:1] in ("(", "[", "{")
    interval = "[" in text or "]" in text  # [2, 3) is not (2, 3]: brackets kept where a square one is written
    for i, ch in enumerate(text):
        prev, nxt = text[i - 1] if i else "", text[i + 1] if i + 1 < len(text) else ""
        if ch == "," and prev.isdigit() and (re.match(r"\d(?!\d)", text[i + 1:i + 3])
                                             or bracketed and not re.match(r"\d{3}(?!\d)", text[i + 1:i + 5])):
            chars.append(" ")  # a list, (3,4) = (3, 4), 1,2,3 = 1, 2, 3; 1,200 and 1,00 keep their comma
        elif prev.isdigit() and nxt.isdigit() and _is_punct(ch):
            chars.append(ch)  # inside a number or a date: 3.4, 1,200, 3/4, 10:30, 2020-03-05
        elif ch in _CURRENCY or ch.isspace():
            chars.append(" ")
        elif ch in "%+#<>=^|~" or unicodedata.category(ch)[0] == "S":
            chars.append(f" {ch} ")  # a sign that means something: 50 %, c++, c#, x > 5, 10^3, °c
        elif ch == "-" and ((not prev.isalnum() and nxt.strip() and nxt != "-")
                            or (prev.isalnum() and not nxt.isalnum()) or (prev.isdigit() or nxt.isdigit())):
            chars.append(f" {ch} ")  # a minus sign (x = -5, -x, -\\infty, x-1) or a grade's minus (A-); "north-east"
        elif interval and ch in "()[]":
            chars.append(f" {ch} ")
        elif ch in "*/" and (prev.isalnum() or prev in ")}") and (nxt.isalnum() or nxt in "({\\"):
            chars.append(f" {ch} ")  # an operator between terms: 1/x is not 1-x
        elif _is_punct(ch):
            chars.append(" ")
        else:
            chars.append(ch)
    words = " ".join("".join(chars).split())
    without_articles = " ".join(ARTICLES_RE.sub(" ", words).split())
    if not initial_a:
        without_articles = LEADING_A_RE.sub("", without_articles)
    return without_articles or words


def _prepared(ans: str) -> str:
    """An answer as the comparisons read it (``_plain_math``), cleaned (``clean_answer_span``)."""
    return clean_answer_span(_plain_math(ans))


def _plain_math(ans: str) -> str:
    """Text with its math written one way: superscripts as ``^`` powers (``10²`` = ``10^2``) or a unit's digit
    (``m²`` = ``m2``), vulgar fractions as ``1/2`` (``1½`` = ``1 1/2``), LaTeX text wrappers, spacing, thousands
    separators (``10,\\!000``, ``12\\,000``) and fractions undone, ``\\pi`` and the word pi as π, NFKC (full-width
    letters and digits), U+2212 and the dashes U+2010-U+2013 as ``-``."""
    ans = _LATEX_GROUPED_RE.sub("", ans.replace("{,}", ",").replace("\\!", ""))  # 12\,000 = 12000
    ans = _BRACED_POWER_RE.sub(r"^\1", ans)  # x^{2} = x^2
    # before NFKC makes ² a 2: a power of a number (10² = 10^2), a unit's digit after a letter (m² = m2)
    ans = _SUPERSCRIPT_RE.sub(lambda m: m.group(1) + ("^" if m.group(1).isdigit() or m.group(1) in ")}" else "")
                              + m.group(2).translate(_SUPERSCRIPTS), ans)
    ans = _VULGAR_RE.sub(lambda m: (m.group(1) + " " if m.group(1) else "")
                         + unicodedata.normalize("NFKC", m.group(2)).replace("\u2044", "/"), ans)
    ans = LATEX_TEXT_RE.sub(lambda m: " " + m.group("inner") + " ", _LATEX_SPACE_RE.sub(" ", ans)).replace("\\pi", "π")
    ans = _PI_WORD_RE.sub("π", _LATEX_FRAC_ANY_RE.sub(_latex_fraction, ans))
    ans = _UNIT_POWER_RE.sub("", re.sub(r"[ \t]+\^", "^", ans))  # m^2 = m ^2 = m2 = m²
    ans = unicodedata.normalize("NFKC", ans).replace("\u2044", "/").translate(_DASHES)
    return " ".join(ans.split(" ")).strip()


def _latex_fraction(m: re.Match) -> str:
    whole, s1, num, s2, den = m.group(1), m.group(2), m.group(3) or m.group(6), m.group(4), m.group(5) or m.group(7)
    sign = "-" if (s1 == "-") != (s2 == "-") else ""
    return f"{whole} {sign}{num}/{den}" if whole else f"{sign}{num}/{den}"


def _number_and_unit(span: str) -> tuple[Fraction, str] | None:
    """``(value, normalised unit)`` of a number followed by words (``-5 °C``, ``12kg``, ``$3.50 each``), else None."""
    match = LEADING_NUMBER_RE.match(span)
    if not match:
        return None
    value, unit = parse_number(match.group("number")), _PERCENT_RE.sub("%", _normalize_text(match.group("rest")))
    return (value, unit) if value is not None and unit else None


def normalize_answer(ans: str) -> str:
    """Canonical form of an answer (module docstring): numbers by value (``format_number``), a number with a unit as
    its value and the unit's text, other text lower-cased without punctuation, articles or repeated whitespace.
    ``"1,000" == "1000" == "1000.0"``, ``"3/4" == "0.75"``, ``"-5 °C" != "5 °C"``."""
    span = _prepared(ans)
    inner = _PARENS_RE.match(span)
    value = parse_number(span) if inner is None else (parse_number(inner.group(1)) or parse_number(span))
    if value is not None:
        return format_number(value)
    with_unit = _number_and_unit(span)
    if with_unit is not None:
        return f"{format_number(with_unit[0])} {with_unit[1]}"
    return _normalize_text(span)


def choice_letter(ans: str, *, gold: bool = False) -> str | None:
    """The letter of a multiple-choice answer (``C``, ``(C) Paris``, ``C) Paris``, ``option C``; for a prediction
    also ``C. Paris``/``C: Paris`` with a capital), upper-case, or None. A prediction that names several choices
    (``(A) or (B)``) has none; a gold ``C. elegans`` is a name."""
    span = _prepared(ans)
    match = CHOICE_RE.match(span)
    if not match:
        return None
    if match.group("u") is not None and (gold or not match.group("u").isupper()):
        return None
    if len({(a or b).upper() for a, b in CHOICE_MARK_RE.findall(span)}) > 1:
        return None
    return next(g for g in match.group("p", "b", "u", "s") if g is not None).upper()


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
    inner = list(ANSWER_IS_RE.finditer(pred))  # "Answer: the answer is C"
    if inner and any(is_correct(x, gold, mode="flexible") for x in sentence_prefixes(inner[-1].group(1))):
        return True
    gold_letter = choice_letter(gold, gold=True)
    if gold_letter is not None:
        return choice_letter(pred) == gold_letter
    pred_span, gold_span = _prepared(pred), _prepared(gold)
    variables = [VARIABLE_VALUE_RE.match(s) for s in (pred_span, gold_span)]  # "x = -5": its value
    if variables[0] and variables[1] and variables[0].group(1).lower() != variables[1].group(1).lower():
        return False  # y = 5 is not x = 5
    pred_span, gold_span = (v.group("value").strip() if v else s for v, s in zip(variables, (pred_span, gold_span)))
    gold_value = parse_number(gold_span)
    if gold_value is None:  # gold "12 kg": its number alone ("12") is accepted, another unit ("12 lb") is not
        if any(variables) and normalize_answer(pred_span) == normalize_answer(gold_span):
            return True  # x = 3 cm
        match = LEADING_NUMBER_RE.match(gold_span)
        if not match or _changes_value(match):  # gold "3 thousand", "12π": not 3, 12
            return normalize_answer(pred_span) == normalize_answer(gold_span)
        gold_unit = _number_and_unit(gold_span)
        return gold_unit is not None and parse_number(pred_span) == gold_unit[0]
    match = LEADING_NUMBER_RE.match(pred_span)
    if not match or _changes_value(match):  # "12 million" is not 12
        return False
    value = parse_number(match.group("number"))
    return value is not None and value == gold_value
