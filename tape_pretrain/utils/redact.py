"""Redaction of secrets in anything written out: configs, metrics, wandb config, error messages."""

from __future__ import annotations

import re
from typing import Any

# Whole name parts: api_key, secret_access_key, hf_token, password; not global_batch_tokens.
_SECRET_KEY = re.compile(r"(^|_)(api_?key|key|secret|token|password|passwd|credentials?|auth)(_|$)", re.IGNORECASE)
_URL_USERINFO = re.compile(r"(?P<scheme>[a-zA-Z][\w+.-]*://)[^/@\s]+@")
REDACTED = "***"


def redact_text(text: str) -> str:
    """Drop user-info from URLs (s3://KEY:SECRET@bucket -> s3://***@bucket)."""
    return _URL_USERINFO.sub(lambda m: f"{m.group('scheme')}{REDACTED}@", text)


def redact(value: Any, key: str = "") -> Any:
    """A copy with values under secret-looking keys replaced and URL user-info removed."""
    if isinstance(value, dict):
        return {k: redact(v, str(k)) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [redact(v, key) for v in value]
    if key and _SECRET_KEY.search(key) and value not in (None, "", False):
        return REDACTED
    if isinstance(value, str):
        return redact_text(value)
    return value


class RedactingStream:
    """A text stream that writes through ``redact_text`` (URLs are never split across one write: print, logging and
    traceback all write whole lines or messages)."""

    def __init__(self, inner):
        self._inner = inner

    def write(self, text: str) -> int:
        self._inner.write(redact_text(text))
        return len(text)

    def __getattr__(self, name):  # flush, isatty, fileno, encoding, buffer, ... of the real stream
        return getattr(self._inner, name)
