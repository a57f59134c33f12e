"""Converters from the supported record layouts onto the data contract, and per-file format detection.

Formats (one JSON object each):

- ``fedlada``: the contract itself, ``id``, ``question``, ``answer``, optional ``rationale`` and ``domain``;
  any other key is a problem (it is most likely a misspelt field).
- ``gsm8k``: ``question``; ``answer`` holds the rationale, then ``#### <answer>`` on the last line. The
  calculator annotations (``<<48/2=24>>``) are stripped from the rationale.
- ``mathinstruct``: ``instruction`` is the question (an Alpaca-style non-empty ``input`` is appended to it on a
  new line); the answer is taken from ``output`` ("The answer is X",
  else the last ``\\boxed{X}``, else the last number) and the rest of ``output`` is the rationale. Program-of-thought
  records (``source`` naming PoT) hold code, not a rationale, and are reported as problems.
- ``cot`` (CoT-Collection): ``source`` is the question, ``rationale`` the rationale, ``target`` the answer.

Every format's final answer must be one line with a letter or digit in it. A rationale holds the reasoning only:
the path's ``Answer:`` line is made from the answer, so a rationale line that is an answer line is a problem, except
a last line that states the record's own answer, which is dropped as redundant. Formats without ids take the
caller's default id (``{file-stem}-{line}``) unless the object carries a string ``id``, and keep a string
``domain``; other keys are ignored. ``detect_format`` decides from one object's keys; the reader applies it to the
first object of a file. Converters never raise: they return the record (or None) and a list of (key, message).
"""

from __future__ import annotations

import re
from typing import Callable

from fedlada.data.records import OPTIONAL_KEYS, RECORD_KEYS, Record
from fedlada.errors import ConfigError
from fedlada.reasoning import (ANSWER_BELOW_RE, ANSWER_IS_RE, ANSWER_LINE_RE, LOOSE_ANSWER_LINE_RE, answer_is_span,
                               boxed_contents, clean_answer_span, is_correct, is_short_answer, last_number)

FORMATS = ("fedlada", "gsm8k", "mathinstruct", "cot")

GSM8K_CALCULATOR_RE = re.compile(r"<<[^<>\n]*>>")
GSM8K_ANSWER_MARK = "####"
# Where the sentence that holds "the answer is" begins: after the last full stop/line break before it.
SENTENCE_BREAK_RE = re.compile(r"(?:[.!?](?=\s)|\n)")

Issues = list[tuple[str | None, str]]
Converted = tuple[Record | None, Issues]


def describe_value(value) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return f"boolean {str(value).lower()}"
    if isinstance(value, (int, float)):
        return f"number {value!r}"
    if isinstance(value, list):
        return "a list"
    if isinstance(value, dict):
        return "an object"
    if isinstance(value, str):
        return "a string"
    return type(value).__name__


def _required_text(obj: dict, key: str, issues: Issues, *, integers: bool = False) -> str | None:
    """The non-empty string at ``key``; with ``integers`` an integer (not a boolean) is taken as its decimal text,
    so an id or a final answer stored as a number (``"answer": 42``, an int Parquet column) reads as ``"42"``."""
    if key not in obj:
        issues.append((key, "missing (expected a non-empty string)"))
        return None
    value = obj[key]
    if integers and isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    if not isinstance(value, str):
        hint = ((" (write the answer as text, e.g. \"yes\" or \"no\")" if isinstance(value, bool) else
                 " (an integer is taken as is; write other numbers as strings)") if integers else "")
        issues.append((key, f"expected a non-empty string, found {describe_value(value)}{hint}"))
        return None
    if not value.strip():
        issues.append((key, "empty (expected a non-empty string)"))
        return None
    return value


def _optional_text(obj: dict, key: str, issues: Issues) -> str | None:
    value = obj.get(key)
    if value is None:
        return None
    if not isinstance(value, str):
        issues.append((key, f"expected a string or null, found {describe_value(value)}"))
        return None
    return value if value.strip() else None


def _clean_lines(text: str | None) -> str | None:
    """Strip every line and drop blank ones; None when nothing is left."""
    if text is None:
        return None
    lines = [line.strip() for line in text.splitlines()]
    joined = "\n".join(line for line in lines if line)
    return joined or None


# A final answer that still carries its marker ("Answer: 5", "#### 5", "The answer is 5"): no path can match it.
# ("The answer is X" only where X is a number or a choice letter: "The answer is blowin' in the wind" is a title.)
_MARKED_ANSWER_RE = re.compile(
    r"^[ \t*_]*(?:####"
    r"|(?:the[ \t]+)?(?:final[ \t]+)?(?:answers?|ans\.?)[ \t]*[*_]*[ \t]*(?::|[-–—](?=[ \t])|(?<=\.)(?=[ \t]))[ \t*_:]*"
    r"|(?:the[ \t]+)?(?:final[ \t]+)?answer[ \t]+is[ \t]*:?[ \t]*"
    r"(?=[-+−$€£¥₹(\\]?[ \t]*(?:\d|[½¼¾⅓⅔⅛]|frac|boxed|[A-Za-z]\b\)?\.?$|(?:yes|no|true|false)\b\.?$))"
    r")[ \t]*(?P<rest>\S.*)$", re.IGNORECASE | re.DOTALL)


def _check_final_answer(answer: str, key: str, issues: Issues, *, several: str) -> None:
    """A final answer is one line (any line break: \\n, \\r, U+2028, ...) with a letter or digit in it (an answer of
    punctuation alone normalises to nothing and would match any such prediction), without an answer marker."""
    if len(answer.strip().splitlines()) > 1:
        issues.append((key, f"spans several lines; expected the final answer alone on one line ({several})"))
    elif not any(ch.isalnum() for ch in answer):
        issues.append((key, f"{answer.strip()!r} has no letter or digit; expected a final answer"))
    elif (marked := _MARKED_ANSWER_RE.match(answer.strip())) is not None:
        issues.append((key, f"{answer.strip()!r} starts with an answer marker; expected the final answer alone "
                            f"(here {marked.group('rest').strip()!r}: paths end with their own 'Answer:' line)"))


def _checked_rationale(rationale: str | None, answer: str, key: str, issues: Issues) -> str | None:
    """``rationale`` without a redundant last ``Answer:`` line; an issue for any other answer line in it (the path
    would carry two, and extraction and sampling stop at the first)."""
    if rationale is None:
        return None
    lines = rationale.split("\n")
    last = max((i for i, line in enumerate(lines) if line.strip()), default=None)
    match = ANSWER_LINE_RE.match(lines[last]) if last is not None else None
    if match and is_correct(match.group(1), answer):  # the same answer, as a grader reads it
        lines = lines[:last]
    elif not ANSWER_LINE_RE.search(rationale):
        return rationale
    for i, line in enumerate(lines):
        if ANSWER_LINE_RE.match(line):
            issues.append((key, f"line {i + 1} of the rationale is an answer line ({line.strip()!r}); the path's "
                                f"'Answer:' line is made from the answer ({answer!r}): leave it out of the rationale"))
            return None
    rest = "\n".join(lines).strip("\n")
    return rest if rest.strip() else None


def _domain(obj: dict) -> str | None:
    value = obj.get("domain")
    return value.strip() if isinstance(value, str) and value.strip() else None


def _foreign_id(obj: dict, default_id: str) -> str:
    value = obj.get("id")
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    return value if isinstance(value, str) and value.strip() else default_id


def convert_fedlada(obj: dict, *, default_id: str) -> Converted:
    """The contract itself; ``default_id`` is unused (ids are required)."""
    issues: Issues = []
    for key in obj:
        if key not in RECORD_KEYS:
            name = "" if str(key).strip() else " '' (a column without a name, e.g. a saved pandas index; drop it)"
            issues.append((key, f"unknown key{name} (allowed: {', '.join(RECORD_KEYS)})"))
    rid = _required_text(obj, "id", issues, integers=True)
    if rid is None and "id" not in obj and "question" in obj and "answer" in obj and "rationale" not in obj:
        issues[-1] = ("id", "missing (every record needs a unique 'id'; only a GSM8K-style record, whose 'answer' "
                            "ends with a '#### <answer>' line, may leave it out)")
    question = _required_text(obj, "question", issues)
    answer = _required_text(obj, "answer", issues, integers=True)
    if answer is not None:
        _check_final_answer(answer, "answer", issues, several="the reasoning goes in 'rationale'")
    optional = {key: _optional_text(obj, key, issues) for key in OPTIONAL_KEYS}
    if issues:
        return None, issues
    question = _unix_lines(question)
    rationale = _checked_rationale(_unix_lines(optional["rationale"]), answer, "rationale", issues)
    if issues:
        return None, issues
    return Record(rid, question, answer, rationale, optional["domain"]), issues


def _unix_lines(text: str | None) -> str | None:
    """``\r\n`` and lone ``\r`` line ends as ``\n`` (a CSV reader already does this; JSON strings keep them)."""
    return None if text is None else text.replace("\r\n", "\n").replace("\r", "\n")


def split_gsm8k_answer(text: str) -> tuple[str | None, str | None]:
    """(rationale without calculator annotations, final answer) of a GSM8K ``answer`` field."""
    if GSM8K_ANSWER_MARK not in text:
        return None, None
    body, _, final = text.rpartition(GSM8K_ANSWER_MARK)
    rationale = _clean_lines(GSM8K_CALCULATOR_RE.sub("", body))
    return rationale, final.strip() or None


def convert_gsm8k(obj: dict, *, default_id: str) -> Converted:
    issues: Issues = []
    question = _required_text(obj, "question", issues)
    raw = _required_text(obj, "answer", issues)
    rationale = answer = None
    if raw is not None:
        rationale, answer = split_gsm8k_answer(raw)
        if answer is None:
            issues.append(("answer", "expected the rationale, then '#### <answer>' with a non-empty answer"))
        else:
            _check_final_answer(answer, "answer", issues, several="nothing may follow the '#### <answer>' line")
    if not issues:
        rationale = _checked_rationale(rationale, answer, "answer", issues)
    if issues:
        return None, issues
    return Record(_foreign_id(obj, default_id), question.strip(), answer, rationale, _domain(obj)), issues


def split_mathinstruct_output(output: str) -> tuple[str | None, str | None]:
    """(rationale, answer) of a MathInstruct ``output``: "the answer is X", else ``\\boxed{X}``, else a final
    answer line ("Answer: X", "Final answer: X", "**Answer:** X"; text after it stays in the rationale), else a
    final answer marker with the answer alone on the last line ("Final answer:\\nC"), else the last number. The
    sentence or line stating the answer is cut from the rationale."""
    matches = list(ANSWER_IS_RE.finditer(output))
    if matches:
        match = matches[-1]
        answer = answer_is_span(match)
        breaks = [b.end() for b in SENTENCE_BREAK_RE.finditer(output, 0, match.start())]
        rationale = _clean_lines(output[: breaks[-1]]) if breaks else None
        if answer:
            return rationale, answer
    boxed = [b for b in boxed_contents(output) if b]
    if boxed:
        return _clean_lines(output), clean_answer_span(boxed[-1]) or None
    lines = list(LOOSE_ANSWER_LINE_RE.finditer(output))
    if lines and clean_answer_span(lines[-1].group(1)):
        line = lines[-1]  # text after the answer line is reasoning too: kept, before the answer
        rest = _clean_lines(output[line.end():])
        before = _clean_lines(output[: line.start()])
        return "\n".join(t for t in (before, rest) if t) or None, clean_answer_span(line.group(1))
    below = ANSWER_BELOW_RE.search(output)  # "Final answer:" with the answer alone on the last line
    if below and is_short_answer(below.group(1)):
        return _clean_lines(output[: below.start()]), clean_answer_span(below.group(1))
    return _clean_lines(output), last_number(output)


def convert_mathinstruct(obj: dict, *, default_id: str) -> Converted:
    issues: Issues = []
    question = _required_text(obj, "instruction", issues)
    extra = obj.get("input")  # Alpaca-style records put the problem itself in "input"
    if question is not None and isinstance(extra, str) and extra.strip():
        question = f"{question.strip()}\n{extra.strip()}"
    output = _required_text(obj, "output", issues)
    source = obj.get("source")
    rationale = answer = None
    if isinstance(source, str) and "PoT" in source:
        issues.append(("output", f"a program (source {source!r}), not a rationale with a final answer"))
    elif output is not None:
        rationale, answer = split_mathinstruct_output(output)
        if not answer:
            issues.append(("output", "no final answer found (expected 'The answer is X', \\boxed{X}, an 'Answer: X' "
                                     "line or a number)"))
        else:
            _check_final_answer(answer, "output", issues, several="its final answer")
    if not issues:
        rationale = _checked_rationale(rationale, answer, "output", issues)
    if issues:
        return None, issues
    return Record(_foreign_id(obj, default_id), question.strip(), answer, rationale, _domain(obj)), issues


def convert_cot(obj: dict, *, default_id: str) -> Converted:
    issues: Issues = []
    question = _required_text(obj, "source", issues)
    answer = _required_text(obj, "target", issues, integers=True)
    rationale = _optional_text(obj, "rationale", issues)
    if issues:
        return None, issues
    answer = " ".join(answer.split())  # a target broken over lines is still one final answer
    _check_final_answer(answer, "target", issues, several="")
    if not issues:
        rationale = _checked_rationale(_clean_lines(rationale), answer, "rationale", issues)
    if issues:
        return None, issues
    return Record(_foreign_id(obj, default_id), question.strip(), answer, rationale, _domain(obj)), issues


CONVERTERS: dict[str, Callable[..., Converted]] = {
    "fedlada": convert_fedlada,
    "gsm8k": convert_gsm8k,
    "mathinstruct": convert_mathinstruct,
    "cot": convert_cot,
}


def undetected_format(obj: dict) -> str:
    """Why a record's format cannot be told from its keys, with a hint where the keys look like one CSV column
    holding a whole header (a file separated by ';', tabs or '|')."""
    keys = sorted(obj)
    text = (f"cannot tell the format from the keys {keys}: expected one of id/question/answer (fedlada), "
            "question/answer with '####' (gsm8k), instruction/output (mathinstruct), source/rationale/target (cot)")
    glued = next((sep for sep in (";", "\t", "|") if any(sep in str(k) for k in keys)), None)
    if glued:
        text += (f" (a column name holds {glued!r}: a .csv file must be comma-separated; convert it, e.g. with "
                 f"pandas.read_csv(path, sep={glued!r}).to_csv(...))")
    return text


def detect_format(obj: dict) -> str | None:
    """The format whose keys ``obj`` has, or None. GSM8K is told from the contract by the ``####`` line in its
    ``answer`` and the absence of ``rationale`` (an ``id`` is allowed: it is kept); an object with ``id`` or
    ``question`` but missing fields counts as the contract, so that the missing fields are what gets reported."""
    if "instruction" in obj and "output" in obj:
        return "mathinstruct"
    if "source" in obj and "target" in obj:
        return "cot"
    answer = obj.get("answer")
    if "question" in obj and "rationale" not in obj and isinstance(answer, str) and GSM8K_ANSWER_MARK in answer:
        return "gsm8k"
    if "id" in obj or "question" in obj:
        return "fedlada"
    return None


def check_format(format: str) -> str:
    """``format`` if it is "auto" or one of ``FORMATS``; ConfigError otherwise."""
    if format != "auto" and format not in CONVERTERS:
        raise ConfigError(f"format must be 'auto' or one of {', '.join(FORMATS)}; got {format!r}")
    return format
