"""Reasoning I/O: prompt/path formats, answer extraction (strict and flexible), normalisation and correctness."""

import re

import pytest

from fedlada import reasoning
from fedlada.reasoning import (
    ANSWER_EXTRACTION_VERSION,
    extract_answer,
    format_path,
    format_prompt,
    grade,
    is_correct,
    last_number,
    normalize_answer,
    parse_number,
)


def test_prompt_and_path_formats():
    assert format_prompt("What is 2 + 3?") == "Question: What is 2 + 3?\nReasoning:\n"
    assert format_path("2 + 3 = 5", "5") == "2 + 3 = 5\nAnswer: 5"
    assert format_path("A tray holds 6 rolls.\n3 * 6 = 18\n", "18") == "A tray holds 6 rolls.\n3 * 6 = 18\nAnswer: 18"
    assert format_path(None, "Paris") == "Answer: Paris"
    assert format_path("  ", "7") == "Answer: 7"


def test_path_round_trips_through_strict_extraction():
    path = format_path("4 * 6 = 24\n24 + 5 = 29", "29")
    assert extract_answer(path, mode="strict") == "29"
    assert extract_answer(format_prompt("q") + path, mode="strict") == "29"


def test_version_is_a_nonempty_string():
    assert isinstance(ANSWER_EXTRACTION_VERSION, str) and ANSWER_EXTRACTION_VERSION.strip()


def test_regexes_are_module_constants():
    patterns = [name for name, value in vars(reasoning).items() if isinstance(value, re.Pattern)]
    assert {"ANSWER_LINE_RE", "NUMBER_RE", "ANSWER_IS_RE", "HASHES_RE"} <= set(patterns)


@pytest.mark.parametrize(
    "text, strict, flexible",
    [
        ("3 * 6 = 18\nAnswer: 18", "18", "18"),
        ("Answer: 18 eggs.\nmore text 99", "18 eggs.", "18 eggs."),
        ("Answer: 5\nAnswer: 7", "5", "5"),  # the first answer line counts
        ("  Answer:   42  \n", "42", "42"),
        ("Answer:\n1 + 1 = 2", None, "2"),  # an empty answer line is no answer
        ("3 * 6 = 18\n18 + 5 = 23", None, "23"),  # last number
        ("so 18-5 = 13", None, "13"),
        ("the total is 1,000 apples", None, "1,000"),
        ("it drops to -4 degrees", None, "-4"),
        ("We get 2.5 hours.", None, "2.5"),
        ("#### 72", None, "72"),
        ("x = 3\n#### 1,200\n", None, "1,200"),
        ("so it is \\boxed{\\frac{1}{2}} and 7", None, "\\frac{1}{2}"),
        ("$\\boxed{12}$ and then 99", None, "12"),
        ("The answer is 12. Then 7 more.", None, "12"),
        ("The final answer is: $5$.", None, "5"),
        ("The answer is (B).", None, "(B)"),
        ("the answer is 10. No, the answer is 11", None, "11"),  # the last one, also on one line
        ("the answer is 10 and then the answer is 11", None, "11"),
        ("no digits at all", None, None),
        ("", None, None),
    ],
)
def test_extract_answer(text, strict, flexible):
    assert extract_answer(text, mode="strict") == strict
    assert extract_answer(text, mode="flexible") == flexible
    assert extract_answer(text) == flexible  # flexible is the default


def test_extract_answer_rejects_unknown_mode():
    with pytest.raises(ValueError, match="strict"):
        extract_answer("Answer: 1", mode="loose")


@pytest.mark.parametrize(
    "answer, normal",
    [
        ("1000", "1000"),
        ("1,000", "1000"),
        ("1000.0", "1000"),
        ("1000.", "1000"),
        ("-3", "-3"),
        ("+3", "3"),
        ("-0", "0"),
        ("3/4", "0.75"),
        ("6/3", "2"),
        ("1/3", "1/3"),
        ("-1/8", "-0.125"),
        ("\\frac{3}{4}", "0.75"),
        ("\\boxed{12}", "12"),
        ("$5", "5"),
        ("$5.00", "5"),
        ("$ 1,234.50", "1234.5"),
        ("-$5", "-5"),
        ("\u22125", "-5"),  # a Unicode minus sign
        ("\u22121,000.5", "-1000.5"),
        (".5", "0.5"),
        ("  42 ", "42"),
        ("Paris", "paris"),
        ("  The   Eiffel Tower! ", "eiffel tower"),
        ("an apple", "apple"),
        ("(A)", "a"),  # an article alone is kept: it is the whole answer
        ("Yes.", "yes"),
        ("18 eggs.", "18 eggs"),
        ("1,00", "1,00"),  # not a number: text (punctuation between digits is kept)
    ],
)
def test_normalize_answer(answer, normal):
    assert normalize_answer(answer) == normal


@pytest.mark.parametrize(
    "text, value",
    [("1,000", 1000), ("-2.5", -2.5), ("3/4", 0.75), ("$7", 7), ("3/0", None), ("1e3", None), ("5 apples", None),
     ("--5", None), ("-$-5", None)],
)
def test_parse_number(text, value):
    parsed = parse_number(text)
    assert (parsed is None) if value is None else (float(parsed) == value)


@pytest.mark.parametrize(
    "pred, gold, strict, flexible",
    [
        ("1000", "1,000", True, True),
        ("1000.0", "1000", True, True),
        ("0.75", "3/4", True, True),
        ("$5", "5", True, True),
        ("-3", "-3", True, True),
        ("-3", "3", False, False),
        ("18", "18", True, True),
        ("18 eggs.", "18", False, True),
        ("$18 dollars", "18", False, True),
        ("18.", "18", True, True),
        ("18 + 5", "18", False, False),  # more arithmetic is not a unit
        ("18 eggs and 5 hens", "18", False, False),
        ("17 eggs", "18", False, False),
        ("eighteen", "18", False, False),
        ("Paris", "paris", True, True),
        ("the Paris.", "Paris", True, True),
        ("Lyon", "Paris", False, False),
        ("yes", "no", False, False),
        (None, "18", False, False),
        ("", "18", False, False),
        ("  ", "", False, False),
    ],
)
def test_is_correct(pred, gold, strict, flexible):
    assert is_correct(pred, gold, mode="strict") is strict
    assert is_correct(pred, gold, mode="flexible") is flexible
    assert is_correct(pred, gold) is flexible


def test_flexible_extraction_then_correctness_grades_free_text():
    outputs = {"Answer: 18 eggs.": True, "so she has 18 eggs left": True, "The answer is 17.": False, "": False}
    for text, expected in outputs.items():
        assert is_correct(extract_answer(text), "18") is expected, text


@pytest.mark.parametrize(
    "pred, gold, flexible",
    [  # answers that are not bare numbers or bare words: each verdict is the right one
        ("5 °C", "-5 °C", False),  # the sign and the decimal point of a number with a unit are kept
        ("-5 °C", "-5 °C", True),
        ("−5 °C", "-5 °C", True),  # U+2212
        ("-12 kg", "12 kg", False),
        ("3.4 kg", "3/4 kg", False),
        ("0.5 kg", "1/2 kg", True),
        ("1.200 kg", "1,200 kg", False),
        ("1200 kg", "1,200 kg", True),
        ("12.5 kg", "12.50 kg", True),
        ("12kg", "12 kg", True),
        ("12", "12 kg", True),  # the gold's number alone
        ("12 lb", "12 kg", False),  # another unit
        ("10", "10 years old", True),
        ("3.50", "3.50 €", True),
        ("Vitamin", "Vitamin A", False),  # "A" is a letter here, not an article
        ("Hepatitis A", "hepatitis a", True),
        ("A B", "B", False),  # a hedge between two choices
        ("A B", "A", False),
        ("C#", "C++", False),
        ("C", "C++", False),
        ("c++", "C++", True),
        ("U.S.A.", "USA", True),  # an abbreviation compares without its dots
        ("U.S.A.", "u.s.a", True),
        ("a cat", "cat", True),
        ("(C) Paris", "C", True),  # a choice letter with its option
        ("C) Paris", "C", True),
        ("B) 12", "B", True),
        ("option B", "B", True),
        ("(c)", "C", True),
        ("C", "(C) Paris", True),
        ("(B) Paris", "(C) Paris", False),
        ("D", "C", False),
        ("The answer is C", "C", True),  # "the answer is" inside an answer line
        ("the answer is 12.", "12", True),
        ("Ｂ", "B", True),  # full-width
        ("north-east", "North East", True),
        ("yes.", "Yes", True),
    ],
)
def test_is_correct_beyond_arithmetic(pred, gold, flexible):
    assert is_correct(pred, gold) is flexible


@pytest.mark.parametrize(
    "text, answer",
    [
        ("**Answer:** B", "B"),
        ("Final Answer: B", "B"),
        ("answer: B", "B"),
        ("ANSWER: yes", "yes"),
        ("- Answer: B", "B"),
        ("**Final Answer**: (C) Paris", "(C) Paris"),
        ("The answer is Dr. Smith. He wrote it.", "Dr. Smith"),  # abbreviations do not end the sentence
        ("I think the answer is St. Louis. Next question.", "St. Louis"),
        ("The answer is approx. 5 kg. Done", "approx. 5 kg"),
        ("The answer is U.S. Grant. Yes.", "U.S"),  # extraction cuts there; grade() tries "U.S. Grant" too
        ("The answer is 12. So we are done.", "12"),
    ],
)
def test_flexible_extraction_of_other_answer_spellings(text, answer):
    assert extract_answer(text, mode="flexible") == answer
    assert extract_answer("Answer: 7\n" + text, mode="flexible") == "7"  # a strict line still wins


@pytest.mark.parametrize(
    "text, gold, correct",
    [  # grade(): what an evaluation counts, on whole generated paths
        ("40 + 2 = 42.\n**Final Answer:**\n$\\boxed{42}$", "42", True),  # an empty markdown answer line
        ("**Answer:**\nThe answer is 42.", "42", True),
        ("**Answer:** \n42", "42", True),
        ("The answer is no. Fire is hot.", "no", True),  # a full stop that ends the answer
        ("The answer is vitamin C. It helps.", "vitamin C", True),
        ("The answer is -5 °C. That is cold.", "-5 °C", True),
        ("The answer is U.S. Grant. Yes.", "U.S. Grant", True),  # ... or belongs to it
        ("The answer is J. K. Rowling.", "J. K. Rowling", True),
        ("The answer is 10 a.m. The meeting starts then.", "10 a.m.", True),
        ("The answer is no. Fire is hot.", "yes", False),
        ("The answer is C. Paris is the capital.", "C", True),
        ("The answer is C. Paris is the capital.", "Paris", False),
        ("It dropped to −5 degrees", "-5", True),  # U+2212 in the last-number fallback
        ("Options 1 to 4; 3 is prime.\nFinal answer:\nC", "C", True),  # the answer alone below its marker
        ("Options 1 to 4; 3 is prime.\n**Final Answer:**\n\nC\n", "C", True),
        ("Options 1 to 4; 3 is prime.\nFinal answer:\nC", "3", False),  # not the last number before it
        ("Answer:\nIt is 7, I think, or\nmaybe 8", "8", True),  # only a last line right below the marker counts
        ("Answer:\nThe total is 12.", "12", True),  # a sentence below the marker is reasoning: its last number
        ("Final answer:\nShe has 12 apples left.", "12", True),
        ("answer:\nx is 5", "5", True),
        ("Final Answer:\nTherefore 12", "12", True),
        ("Final answer:\nx - 3 > 0 so 4", "4", True),
        ("Final answer:\n12 kg", "12 kg", True),  # a number with its unit, a name: the answer itself
        ("Final answer:\nParis", "Paris", True),
        ("**Final Answer:**\n(B)", "B", True),
    ],
)
def test_grade_reads_whole_paths(text, gold, correct):
    assert grade(text, gold) is correct


@pytest.mark.parametrize(
    "pred, gold, flexible",
    [  # signs, operators and choices the first version of rules 2 got wrong
        ("C. albicans", "C. elegans", False),  # a gold name with an initial is no choice letter
        ("E. faecalis", "E. coli", False),
        ("J. R. R. Tolkien", "J. K. Rowling", False),
        ("C", "C. elegans", False),
        ("(A) or (B)", "A", False),  # a prediction naming several choices
        ("(A), (B), (C) and (D)", "A", False),
        ("A) Rome B) Paris C) Lima", "A", False),
        ("c) Paris", "c", True),
        ("(c) Paris", "c", True),
        ("-5%", "5%", False),
        ("-50%", "50", False),
        ("50%", "50", True),
        (".5%", "5%", False),
        ("50 percent", "50%", True),
        ("(-5)", "5", False),
        ("(-5)", "-5", True),
        ("x = -5", "x = 5", False),
        ("x=5", "x = 5", True),
        ("(3, -4)", "(3, 4)", False),
        ("x > 5", "x < 5", False),
        ("A-", "A", False),
        ("A+", "A", False),
        ("100 km/h", "100", True),
        ("3", "3 m/s", True),
        ("A and B", "and B", False),
        ("north-east", "north east", True),
        ("2020-03-05", "2020-03-06", False),
    ],
)
def test_is_correct_keeps_signs_operators_and_single_choices(pred, gold, flexible):
    assert is_correct(pred, gold) is flexible


@pytest.mark.parametrize(
    "pred, gold, flexible",
    [
        # words after a number that change its value are not a unit, both ways
        ("12 thousand", "12", False), ("12 million", "12", False), ("12k", "12", False), ("12 dozen", "12", False),
        ("12 squared", "12", False), ("12x", "12", False), ("$12.5 million", "$12.5", False),
        ("3", "3 thousand", False), ("3", "3 or more", False), ("3", "3x", False),
        ("3 thousand", "3 thousand", True), ("12%", "12", True), ("12 times", "12", True), ("12 m", "12", True),
        # unicode: superscripts are powers, vulgar fractions are fractions
        ("10²", "102", False), ("10²", "10^2", True), ("½", "1/2", True), ("1½", "1.5", True),
        ("1½", "11/2", False),
        ("5 m²", "5 m^2", True),
        # LaTeX and variables
        ("\\boxed{\\text{B}}", "B", True), ("\\boxed{\\textbf{(B)}}", "B", True), ("\\boxed{\\$12.50}", "12.50", True),
        ("\\frac{-3}{4}", "-0.75", True), ("\\frac34", "0.75", True), ("x = -5", "-5", True), ("x = 5", "-5", False),
        # mixed numbers; abbreviations
        ("1 1/2", "3/2", True), ("-2 1/4", "-2.25", True), ("2 3", "23", False), ("U.S.", "US", True),
        ("B.C.", "BC", True), ("U.S. Grant", "US Grant", True),
        # value words still compare by value between two answers that have them; kelvin is not thousand
        ("1200 million", "1,200 million", True), ("1.5 million", "1.50 million", True), ("12 k", "12k", True),
        ("1/2 dozen", "0.5 dozen", True), ("300 K", "300", True), ("300", "300 K", True), ("12 k", "12", False),
        ("12π", "12", False), ("12\\pi", "12", False), ("12 pi", "12", False), ("12i", "12", False),
        ("12 x", "12", False), ("$12M", "12", False), ("12B", "12", False), ("12 and a half", "12", False),
        ("12 tenths", "12", False), ("12 lakh", "12", False), ("12万", "12", False), ("12 millones", "12", False),
        ("\\boxed{12\\text{ million}}", "12", False), ("\\boxed{12\\,\\text{k}}", "12", False),
        ("12", "12\\pi", False), ("12", "12i", False), ("12", "12 x", False), ("12 M", "12", True),
        # initials with or without blanks; unit powers
        ("J.R.R. Tolkien", "J. R. R. Tolkien", True), ("Washington, D.C.", "Washington D. C.", True),
        ("U.S.", "U. S.", True), ("The answer is J.R.R. Tolkien.", "J. R. R. Tolkien", True),
        ("5 m2", "5 m²", True), ("E = mc2", "E = mc²", True), ("25 m²", "25", True), ("25 cm^2", "25", True),
        ("25", "25 m²", True),
        # mixed numbers and LaTeX inside an answer; a variable on either side
        ("1½ cups", "1.5", True), ("1 1/2 hours", "1.5", True), ("1½ cups", "1.5 cups", True),
        ("12½%", "12.5%", True), ("2\\frac{1}{2}", "2.5", True), ("\\frac{1}{2} cup", "0.5 cup", True),
        ("\\frac 34", "0.75", True), ("\\frac{3}{-4}", "-0.75", True), ("\\boxed{12\\text{ cm}}", "12 cm", True),
        ("12\\,\\mathrm{km}", "12 km", True), ("-5", "x = -5", True), ("y = 5", "x = 5", False),
        ("x = 3, y = 4", "3", False),
        # signs and operators in text answers are kept
        ("-x", "x", False), ("-∞", "∞", False), ("-\\sqrt{3}", "\\sqrt{3}", False), ("1/x", "1-x", False),
        ("a/b", "a-b", False), ("2/x", "2*x", False), ("x-1", "x 1", False), ("north-east", "north east", True),
        # more value words, not units; a unit's power is 2 or 3 (12h30 is not 12 h)
        ("$12 M", "12", False), ("$12 B", "12", False), ("12 Mio", "12", False), ("12 grand", "12", False),
        ("2 and one half", "2", False), ("3 halves", "3", False), ("3 i", "3", False), ("12e3", "12", False),
        ("1999 BC", "1999", False), ("12h30", "12", False), ("5ft6in", "5", False), ("12kg500", "12", False),
        ("–5", "5", False), ("–5", "-5", True),
        # braced and negative powers, LaTeX thousands separators, pi, other currencies, lists, initials
        ("25 m^{2}", "25 m²", True), ("25\\text{ m}^2", "25 m²", True), ("10^{2}", "10^2", True),
        ("5 s⁻¹", "5 s^-1", True), ("9.8 m s⁻²", "9.8", True), ("\\boxed{10,\\!000}", "10000", True),
        ("10{,}000", "10000", True), ("12\\,000", "12000", True), ("3 pi", "3π", True), ("pi", "π", True),
        ("x = 3 cm", "3 cm", True), ("(3,4)", "(3, 4)", True), ("1,2,3", "1, 2, 3", True), ("¥1,000", "1000", True),
        ("₹500", "500", True), ("A. Lincoln", "Lincoln", False), ("1,00", "1,00", True),
        # intervals: a square bracket keeps every bracket
        ("(2, 3)", "[2, 3]", False), ("[2, 3)", "[2, 3]", False), ("[2,3]", "[2, 3]", True), ("(2,3)", "(2, 3)", True),
    ],
)
def test_is_correct_reads_values_not_look_alikes(pred, gold, flexible):
    """A number followed by a word that changes its value ("12 million") is not that number; ``10²`` is not ``102``;
    fractions, LaTeX wrappers and a variable's value read as what they say."""
    assert is_correct(pred, gold) is flexible


@pytest.mark.parametrize("text, number", [
    ("So the probability is $\\frac{3}{4}$.", "3/4"), ("Thus the area is $25\\text{ m}^2$.", "25"),
    ("It costs 12 million dollars.", "12 million"), ("12k a year", "12k"), ("2½ pizzas", "2 1/2"),
    ("The total is 42.", "42"), ("-7 degrees", "-7"), ("step2 gives 9", "9")])
def test_the_last_number_fallback_reads_math_as_the_comparisons_do(text, number):
    assert last_number(text) == number
