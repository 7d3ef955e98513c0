"""User-facing errors and the wrapper every stage's ``main()`` runs under.

A ``UserError`` is a mistake the user can fix (bad param, malformed CSV,
corrupt archive, missing upstream output). It is reported as one line naming
the file, row or key, with no traceback, and the process exits non-zero.
Anything else is a bug in vlmpipe and keeps its traceback.
"""
from __future__ import annotations

import functools
import logging
import sys
import unicodedata
from typing import Callable


def one_line(text: str) -> str:
    """``text`` with every control, format and line-separator character escaped (``\\n``, ``\\u202e``):
    a key, a cell or a file name quoted in a message cannot break it into lines or reorder it."""
    out = []
    for ch in text:
        if unicodedata.category(ch) in ("Cc", "Cf", "Zl", "Zp"):
            out.append(ch.encode("unicode_escape").decode("ascii"))
        else:
            out.append(ch)
    return "".join(out)


class UserError(Exception):
    """A problem with the user's input, reported as one line (made one line here, whatever it quotes)."""

    def __init__(self, message: object = "") -> None:
        super().__init__(one_line(str(message)))


EXIT_USER_ERROR = 2


class _Without(logging.Filter):
    """Drops the records whose message contains ``text``."""

    def __init__(self, text: str) -> None:
        super().__init__()
        self.text = text

    def filter(self, record: logging.LogRecord) -> bool:
        return self.text not in record.getMessage()


# Warnings that say nothing the user can act on, by logger. bitsandbytes 0.50, imported on a CPU with
# AVX512-BF16, tries to fetch a 4-bit kernel from the Hugging Face Hub (the `kernels` package, which
# downloads code and is not installed) and warns in every process that it uses its own torch kernel,
# the one every other CPU runs.
QUIET = {"bitsandbytes.backends.cpu.ops": "Failed to load CPU gemm_4bit_forward from kernels-community"}


def setup_logging(level: int = logging.INFO) -> None:
    logging.basicConfig(
        level=level,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
        stream=sys.stderr,
    )
    # Third-party libraries are chatty at INFO; keep the stage's own log readable.
    for noisy in ("urllib3", "botocore", "filelock", "httpx", "alembic", "mlflow", "matplotlib"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    for name, text in QUIET.items():
        logger = logging.getLogger(name)
        if not any(isinstance(f, _Without) and f.text == text for f in logger.filters):
            logger.addFilter(_Without(text))


def stage_entry(fn: Callable[..., object]) -> Callable[..., int]:
    """Run ``fn`` as a command-line stage: one-line errors, exit codes."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs) -> int:
        setup_logging()
        try:
            rc = fn(*args, **kwargs)
        except UserError as e:
            print(f"error: {e}", file=sys.stderr)
            return EXIT_USER_ERROR
        except KeyboardInterrupt:
            print("interrupted", file=sys.stderr)
            return 130
        return rc if isinstance(rc, int) else 0

    return wrapper
