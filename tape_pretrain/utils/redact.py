"""Redaction of secrets in anything written out: configs, metrics, wandb config, error messages."""

from __future__ import annotations

import re
from typing import Any

# Whole name parts: api_key, secret_access_key, hf_token, password; not global_batch_tokens.
_SECRET_KEY = re.compile(r"(^|_)(api_?key|key|secret|token|password|passwd|credentials?|auth)(_|$)", re.IGNORECASE)
# user[:password]@ — the password may hold '/' (AWS secret keys do), which is not URL-legal but what users write.
_URL_USERINFO = re.compile(r"(?P<scheme>[a-zA-Z][\w+.-]*://)(?P<info>[^/@\s:]+:[^@\s]+|[^/@\s]+)@")
REDACTED = "***"
_KNOWN_SECRETS: set[str] = set()
"""User-info seen in the URLs this process was given: libraries quote it out of URL form ('Invalid bucket name
"bob:PW@bkt"'), where the URL pattern no longer matches, so the literal strings are redacted too."""


def remember_secrets(value: Any) -> None:
    """Record the user-info of every URL in ``value`` (a string, or a mapping/list of them)."""
    if isinstance(value, dict):
        for item in value.values():
            remember_secrets(item)
    elif isinstance(value, list | tuple):
        for item in value:
            remember_secrets(item)
    elif isinstance(value, str):
        for match in _URL_USERINFO.finditer(value):
            info = match.group("info")
            _KNOWN_SECRETS.add(info)
            password = info.partition(":")[2]
            if len(password) >= 3:
                _KNOWN_SECRETS.add(password)


def redact_text(text: str) -> str:
    """Drop user-info from URLs (s3://KEY:SECRET@bucket -> s3://***@bucket), and any known user-info string."""
    text = _URL_USERINFO.sub(lambda m: f"{m.group('scheme')}{REDACTED}@", text)
    for secret in sorted(_KNOWN_SECRETS, key=len, reverse=True):  # the whole user:password before its password
        if secret in text:
            text = text.replace(secret, REDACTED)
    return text


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
