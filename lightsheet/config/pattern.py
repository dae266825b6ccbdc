"""The file-name ``pattern``: groups, and matching bounded in time."""

from __future__ import annotations

import re
import signal
import threading
from typing import Any

from lightsheet.errors import ConfigError

__all__ = [
    "DEFAULT_PATTERN",
    "PATTERN_GROUPS",
    "PATTERN_TIMEOUT_S",
    "PROBE_LENGTH",
    "check_pattern",
    "compile_pattern",
    "search_name",
]

#: Lattice light-sheet style names, e.g.
#: ``ex6-2_CamA_ch1_CAM1_stack0000_560nm_0000000msec_0001291795msecAbs_000x_001y_000z_0000t.tif``
DEFAULT_PATTERN = r"_ch(?P<c>\d+)_.*_(?P<x>\d+)x_(?P<y>\d+)y_(?P<z>\d+)z_(?P<t>\d+)t\.tiff?$"
PATTERN_GROUPS = ("c", "t", "z", "y", "x", "plane")

#: Longest time one file name may take to match ``pattern`` (`search_name`).
PATTERN_TIMEOUT_S = 1.0
#: Length of the probe strings `check_pattern` matches: exponential backtracking on them
#: takes about 2**PROBE_LENGTH steps, far beyond the time limit.
PROBE_LENGTH = 48


def check_pattern(pattern: str) -> None:
    r"""Refuse a ``pattern`` whose matching can take exponential time.

    Two checks: a repetition whose whole body is itself an unbounded repetition (``(a+)+``,
    ``(\d*)*``: it matches nothing more than the inner one, in exponentially many ways),
    and probe strings (each character the pattern names, repeated `PROBE_LENGTH` times, then
    one that cannot follow) that must each match within `PATTERN_TIMEOUT_S`, with the
    ``regex`` module and (in the main thread) with ``re``.

    Raises
    ------
    ValueError
        Naming the part of the pattern, or the probe, that takes too long.
    """
    from re import _parser

    tree = _parser.parse(pattern)
    nested = _nested_repeat(tree)
    if nested:
        raise ValueError(
            f"pattern {pattern!r}: a repetition of a repetition ({nested}) can take exponential "
            "time to fail on a name; it matches the same as the inner repetition alone: drop "
            "the outer one"
        )
    rx, plain = compile_pattern(pattern), re.compile(pattern)
    for char in sorted(_literal_chars(tree) | {"0", "a", "_"}):
        probe = char * PROBE_LENGTH + "\x00"
        try:
            rx.search(probe, timeout=PATTERN_TIMEOUT_S)
            _limited_re_search(plain, probe)
        except TimeoutError:
            raise ValueError(
                f"pattern {pattern!r}: matching {char!r} * {PROBE_LENGTH} took longer than "
                f"{PATTERN_TIMEOUT_S:g} s (catastrophic backtracking); expected a pattern that "
                "matches a file name in linear time (avoid alternatives and repetitions that "
                "can match the same text)"
            ) from None


def _limited_re_search(rx: re.Pattern, text: str) -> None:
    """``rx.search(text)`` with the ``re`` module, stopped after `PATTERN_TIMEOUT_S`.

    ``re`` checks for signals while it matches, so a timer signal ends a runaway match; it
    can only be used in the main thread (elsewhere only the ``regex`` probe runs).
    """
    if threading.current_thread() is not threading.main_thread():
        return

    def expire(signum: int, frame: Any) -> None:
        raise TimeoutError

    previous = signal.signal(signal.SIGALRM, expire)
    try:
        signal.setitimer(signal.ITIMER_REAL, PATTERN_TIMEOUT_S)
        rx.search(text)
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def compile_pattern(pattern: str) -> Any:
    """``pattern`` compiled by the ``regex`` module (``re``-compatible, supports timeouts)."""
    import regex

    return regex.compile(pattern, flags=regex.VERSION0)


def search_name(rx: Any, name: str, *, pattern: str | None = None) -> Any:
    """``rx.search(name)`` (a `compile_pattern` result) bounded by `PATTERN_TIMEOUT_S`.

    Raises
    ------
    ConfigError
        The match took longer than the limit (names the pattern and the file name).
    """
    try:
        return rx.search(name, timeout=PATTERN_TIMEOUT_S)
    except TimeoutError:
        raise ConfigError(
            f"pattern {pattern or rx.pattern!r}: matching the name {name!r} took longer than "
            f"{PATTERN_TIMEOUT_S:g} s; expected a pattern that matches in linear time"
        ) from None


def _nested_repeat(tree: Any) -> str | None:
    """A repeat whose body (through groups) is one unbounded repeat, described, or None."""
    from re import _constants as c

    repeats = (c.MAX_REPEAT, c.MIN_REPEAT, c.POSSESSIVE_REPEAT)
    for op, av in tree:
        if op in repeats:
            lo, hi, body = av
            inner = _sole_repeat(body)
            if hi > 1 and inner is not None and inner[1] == c.MAXREPEAT:
                return f"{{{lo},{'' if hi == c.MAXREPEAT else hi}}} of {{{inner[0]},}}"
            found = _nested_repeat(body)
        elif op == c.SUBPATTERN:
            found = _nested_repeat(av[-1])
        elif op == c.BRANCH:
            found = next((r for b in av[1] if (r := _nested_repeat(b))), None)
        elif op in (c.ASSERT, c.ASSERT_NOT):
            found = _nested_repeat(av[1])
        else:
            found = None
        if found:
            return found
    return None


def _sole_repeat(body: Any) -> tuple[int, int] | None:
    from re import _constants as c

    items = list(body)
    while len(items) == 1 and items[0][0] == c.SUBPATTERN:
        items = list(items[0][1][-1])
    if len(items) == 1 and items[0][0] in (c.MAX_REPEAT, c.MIN_REPEAT):
        return items[0][1][0], items[0][1][1]
    return None


def _literal_chars(tree: Any) -> set[str]:
    """Characters a parsed pattern names (literals, first of each range), for probes."""
    from re import _constants as c

    found: set[str] = set()
    for op, av in tree:
        if op == c.LITERAL:
            found.add(chr(av))
        elif op == c.IN:
            for kind, val in av:
                if kind == c.LITERAL:
                    found.add(chr(val))
                elif kind == c.RANGE:
                    found.add(chr(val[0]))
                elif kind == c.CATEGORY:
                    found |= {"0", "a", " "}
        elif op in (c.MAX_REPEAT, c.MIN_REPEAT, c.POSSESSIVE_REPEAT):
            found |= _literal_chars(av[2])
        elif op == c.SUBPATTERN:
            found |= _literal_chars(av[-1])
        elif op == c.BRANCH:
            for b in av[1]:
                found |= _literal_chars(b)
        elif op in (c.ASSERT, c.ASSERT_NOT):
            found |= _literal_chars(av[1])
    return {ch for ch in found if ch.isprintable()}
