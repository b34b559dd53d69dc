"""The worked examples in the docstrings are true: each module's doctests pass."""
import doctest

import pytest

import ascl
import scoring
import guard
import decoding
import ifpo
import plumbing
import refine
import sources
import train


@pytest.mark.parametrize("module", [ifpo, ascl, decoding, guard, plumbing, sources, train, scoring, refine], ids=lambda m: m.__name__)
def test_docstring_examples_hold(module):
    result = doctest.testmod(module, optionflags=doctest.NORMALIZE_WHITESPACE)
    assert result.attempted > 0 and result.failed == 0
