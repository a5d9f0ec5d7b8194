"""The console's `vsa: ` lines and secret masking."""

from __future__ import annotations

import io
import logging

import pytest

from appliance.console import Console, RedactingFilter, mask_perscode, redact, register_secret


def test_lines_are_prefixed_and_flushed() -> None:
    class Recorder(io.StringIO):
        flushes = 0

        def flush(self) -> None:
            self.flushes += 1
            super().flush()

    stream = Recorder()
    console = Console(stream)
    console.say("vsa 0.1.0 starting")
    console.say("two\nlines")
    assert stream.getvalue() == "vsa: vsa 0.1.0 starting\nvsa: two\nvsa: lines\n"
    assert stream.flushes == 2


def test_registered_secrets_never_reach_the_console() -> None:
    register_secret("hunter2-proxy-pw")
    stream = io.StringIO()
    Console(stream).say("proxy jdoe:hunter2-proxy-pw@10.0.0.1:3128 refused")
    assert "hunter2-proxy-pw" not in stream.getvalue()
    assert "jdoe:***@10.0.0.1:3128" in stream.getvalue()


def test_multiline_secret_is_scrubbed_line_by_line() -> None:
    pem = "-----BEGIN OPENSSH PRIVATE KEY-----\nb3BlbnNzaC1rZXktdjEAAAAABG5vbmU\n-----END OPENSSH PRIVATE KEY-----\n"
    register_secret(pem)
    assert "b3BlbnNzaC1rZXktdjEAAAAABG5vbmU" not in redact(
        "key line b3BlbnNzaC1rZXktdjEAAAAABG5vbmU leaked"
    )


def test_longer_secret_replaced_whole() -> None:
    register_secret("abcd")
    register_secret("abcdefgh")
    assert redact("x abcdefgh y") == "x *** y"


@pytest.mark.parametrize(
    ("code", "shown"), [("12345678901234", "****1234"), ("ABCDEFGH", "****"), (None, "(none)")]
)
def test_perscode_shows_at_most_last_four(code: str | None, shown: str) -> None:
    assert mask_perscode(code) == shown


def test_logging_filter_scrubs_messages_and_tracebacks() -> None:
    register_secret("SeCrEt-value-42")
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.addFilter(RedactingFilter())
    logger = logging.getLogger("test.redaction")
    logger.addHandler(handler)
    logger.propagate = False
    try:
        logger.warning("password is %s", "SeCrEt-value-42")
        try:
            raise ValueError("bad SeCrEt-value-42")
        except ValueError:
            logger.exception("failed")
    finally:
        logger.removeHandler(handler)
    text = stream.getvalue()
    assert "SeCrEt-value-42" not in text
    assert "password is ***" in text
    assert "ValueError: bad ***" in text
