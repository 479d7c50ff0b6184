"""Device-check stand-in for PyPcre (gptqmodel's PCRE2 binding: an sdist that builds PCRE2 from a git clone, so it
cannot be installed on an offline GPU machine): the names gptqmodel uses, on Python's ``re``.  Used only by the
device run described in tests/device/test_cuda_kernels.py; gptqmodel's kernels do not match regular expressions."""

import enum
import re
from re import Pattern, escape, findall, fullmatch, match, search, split, sub  # noqa: F401


class Flag(enum.IntFlag):
    CASELESS = re.IGNORECASE
    MULTILINE = re.MULTILINE
    DOTALL = re.DOTALL
    VERBOSE = re.VERBOSE


def compile(pattern, flags=0):  # noqa: A001 - the name pcre exports
    return re.compile(pattern, int(flags))
