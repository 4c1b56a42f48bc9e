"""What the hydra entry points share: where their configs are, and our own errors ending the run with
one line, not a traceback.

The entry points (``calibrate.record``, ``fit``, ``sweep``) import only this, hydra and light modules at
their top; torch, diffusers and scipy load once the arguments and files have been checked.
"""

from __future__ import annotations

import contextlib
import importlib.resources
import os
import sys
from pathlib import Path
from typing import Iterator

from runtime.errors import TeaCacheError


def _conf_dir() -> Path:
    """The hydra configs: an installed wheel's package data (``calibrate/_conf``, mapped from ``conf/`` by
    pyproject.toml), else the checkout's ``conf/`` (a checkout or an editable install)."""
    packaged = importlib.resources.files(__package__) / "_conf"
    if packaged.is_dir():
        return Path(os.fspath(packaged))
    return Path(__file__).resolve().parent.parent / "conf"


#: Absolute, so ``@hydra.main(config_path=CONF_PATH)`` works from any working directory and install.
CONF_DIR = _conf_dir()
CONF_PATH = str(CONF_DIR)


@contextlib.contextmanager
def one_line_errors() -> Iterator[None]:
    """Turn a :class:`TeaCacheError` into ``error: <sentence>`` on stderr and exit status 2."""
    try:
        yield
    except TeaCacheError as exc:
        print(f"error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
