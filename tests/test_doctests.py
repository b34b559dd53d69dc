"""The worked examples in the docstrings are true: each module's doctests pass."""

import doctest

import pytest

import ascl
import fast
import guard
import ifpo
import plumbing
import refine
import scoring
import sources
import train


@pytest.mark.parametrize(
    "module", [ifpo, ascl, fast, guard, plumbing, sources, train, scoring, refine], ids=lambda m: m.__name__
)
def test_docstring_examples_hold(module):
    result = doctest.testmod(module, optionflags=doctest.NORMALIZE_WHITESPACE)
    assert result.attempted > 0 and result.failed == 0
