"""The operator's voice, and secret masking in one place.

The serial console is the operator's only window into a fresh appliance
(RUNTIME.md, The serial console): every line starts with ``vsa: `` and is
flushed as it is written. Secrets never appear there, nor in the journal:
every secret the appliance learns is registered here with :func:`register_secret`,
and both the console and the logging filter scrub registered secrets from any
text before it leaves the process.
"""

from __future__ import annotations

import logging
import re
import sys
import threading
from typing import TextIO

CONSOLE_PREFIX = "vsa: "
MASK = "***"
# A secret shorter than this is not scrubbed by substring (it would mangle
# ordinary words); such values must be masked where they are formatted.
MIN_SCRUB_LENGTH = 4

_lock = threading.Lock()
_secrets: set[str] = set()
_pattern: re.Pattern[str] | None = None


def register_secret(value: str | bytes | None) -> None:
    """Remember a secret so that it is scrubbed from every console line and log record."""
    global _pattern
    if value is None:
        return
    text = value.decode("utf-8", "replace") if isinstance(value, bytes) else value
    candidates = {text}
    # Multi-line secrets (PEM keys) are scrubbed line by line too, so that a
    # traceback quoting one line of a key does not leak it.
    candidates.update(line.strip() for line in text.splitlines())
    with _lock:
        for candidate in candidates:
            if len(candidate) >= MIN_SCRUB_LENGTH:
                _secrets.add(candidate)
        # Longest first, so that a secret containing another is replaced whole.
        ordered = sorted(_secrets, key=len, reverse=True)
        _pattern = re.compile("|".join(re.escape(s) for s in ordered)) if ordered else None


def forget_secrets() -> None:
    """Drop every registered secret (tests use this between cases)."""
    global _pattern
    with _lock:
        _secrets.clear()
        _pattern = None


def redact(text: str) -> str:
    """Return ``text`` with every registered secret replaced by ``***``."""
    pattern = _pattern
    return pattern.sub(MASK, text) if pattern is not None else text


def mask_perscode(code: str | None) -> str:
    """A personalization code as it may be shown: at most its last 4 characters."""
    if not code:
        return "(none)"
    if len(code) <= 8:
        return "*" * 4
    return "*" * 4 + code[-4:]


class RedactingFilter(logging.Filter):
    """A logging filter that scrubs registered secrets from every record."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        scrubbed = redact(message)
        if record.exc_info and record.exc_info[1] is not None:
            # Exception text is rendered by the formatter; render it here,
            # scrubbed, and drop the raw exception so it cannot leak.
            formatter = logging.Formatter()
            scrubbed += "\n" + redact(formatter.formatException(record.exc_info))
            record.exc_info = None
            record.exc_text = None
        record.msg = scrubbed
        record.args = None
        return True


class Console:
    """Writes the operator's ``vsa: `` lines to a stream, flushed, secrets scrubbed."""

    def __init__(self, stream: TextIO | None = None) -> None:
        self._stream = stream
        self._log = logging.getLogger("vsa.console")

    def say(self, message: str) -> None:
        """Write one console line (several if ``message`` has newlines)."""
        stream = self._stream or sys.stdout
        clean = redact(message)
        with _lock:
            for line in clean.splitlines() or [""]:
                stream.write(CONSOLE_PREFIX + line + "\n")
            stream.flush()
        self._log.info("%s", clean)


def setup_logging(level: int = logging.INFO, stream: TextIO | None = None) -> None:
    """Send structured logs to standard error (the journal), scrubbed of secrets."""
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.addFilter(RedactingFilter())
    handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    for existing in list(root.handlers):
        root.removeHandler(existing)
    root.addHandler(handler)
    root.setLevel(level)
    # The console's own records would duplicate stdout on the journal.
    logging.getLogger("vsa.console").propagate = False
