"""Prefect's console log handler, with expected errors in one line instead of a traceback.

The ``lightsheet`` command selects it through Prefect's own logging settings
(``PREFECT_LOGGING_HANDLERS_CONSOLE_CLASS``, `lightsheet.cli`), which processes started for
the run (Dask workers) inherit. A record whose exception is an expected one (bad input or
settings, a damaged or busy output: `EXPECTED`) is printed without its traceback; anything
else (a bug) keeps it. Only the console changes: the records sent to the Prefect API, which
the UI shows, keep their tracebacks.
"""

from __future__ import annotations

import logging

from prefect.logging.handlers import PrefectConsoleHandler
from pydantic import ValidationError

from lightsheet.errors import LightsheetError

#: Exceptions printed without a traceback (as `lightsheet.cli.main` reports them).
EXPECTED = (LightsheetError, OSError, ValidationError)


class OneLineConsoleHandler(PrefectConsoleHandler):
    """`PrefectConsoleHandler` that leaves the traceback of `EXPECTED` errors out."""

    def emit(self, record: logging.LogRecord) -> None:
        """Print ``record``; without its traceback when its exception is expected."""
        exc = record.exc_info[1] if record.exc_info else None
        if not isinstance(exc, EXPECTED):
            super().emit(record)
            return
        saved = record.exc_info, record.exc_text
        record.exc_info, record.exc_text = None, None
        try:
            super().emit(record)
        finally:
            record.exc_info, record.exc_text = saved
