"""What the hydra entry points share: our own errors end the run with one line, not a traceback."""

from __future__ import annotations

import contextlib
import sys
from typing import Iterator

from runtime.errors import TeaCacheError


@contextlib.contextmanager
def one_line_errors() -> Iterator[None]:
    """Turn a :class:`TeaCacheError` into ``error: <sentence>`` on stderr and exit status 2."""
    try:
        yield
    except TeaCacheError as exc:
        print(f"error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
