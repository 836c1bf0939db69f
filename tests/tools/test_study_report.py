"""The miniature study's statistics: Wilson intervals and reading the letter of a reply."""
import pytest

from swift_sophia.tools.study_report import letter, wilson


def test_wilson_interval_known_values():
    lo, hi = wilson(7, 48)  # 0.146: Wilson's interval is about [0.072, 0.272]
    assert lo == pytest.approx(0.0724, abs=5e-4) and hi == pytest.approx(0.2716, abs=5e-4)
    assert wilson(0, 10)[0] == 0.0 and 0.25 < wilson(0, 10)[1] < 0.35
    assert wilson(10, 10)[1] == pytest.approx(1.0) and 0.65 < wilson(10, 10)[0] < 0.75
    assert wilson(0, 0) == (0.0, 1.0)


def test_letter_of_a_reply():
    assert letter("ANSWER: C") == "C" and letter("ANSWER:(B)") == "B" and letter("answer: c") is None
    assert letter("ANSWE") is None and letter(None) is None and letter("I think ANSWER: D\n") == "D"
