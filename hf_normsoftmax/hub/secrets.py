"""Keep access tokens out of every file hf_normsoftmax writes or uploads.

Values are scanned, not only key names: a file is refused (or a card value withheld) when it contains

* a string shaped like a Hugging Face access token (``hf_`` followed by 30 or more letters and digits), or
* the text of a token in use here: the ``token`` argument of the call, ``HF_TOKEN`` / ``HUGGING_FACE_HUB_TOKEN``,
  the token huggingface_hub would use (environment or the saved login), and the other saved tokens.

Messages name the file and what was found, never the token itself.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable
from pathlib import Path

__all__ = ["SECRET_KEY_PATTERN", "TOKEN_PATTERN", "find_secret", "is_secret_key", "known_tokens", "looks_secret",
           "redact"]

#: A Hugging Face user access token ("hf_" + letters and digits; real ones have 34).
TOKEN_PATTERN = re.compile(r"hf_[A-Za-z0-9]{30,}")
_TOKEN_PATTERN_BYTES = re.compile(rb"hf_[A-Za-z0-9]{30,}")
#: A key name that holds a credential (its value is never shown or pickled, whatever it looks like).
SECRET_KEY_PATTERN = re.compile(r"token|secret|passw|api[_-]?key|(^|_)auth($|_)|credential", re.I)
# shorter strings would match ordinary text: a "token" that short is not scanned for by value
_MIN_TOKEN_LENGTH = 8
_TOKEN_ENVIRONMENT = ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN")


def known_tokens(*extra) -> tuple:
    """The token texts in use: ``extra`` (strings; others are ignored), the token environment variables, the token
    huggingface_hub would send and every saved token. Longest first."""
    found = {t.strip() for t in extra if isinstance(t, str)}
    found.update(os.environ.get(name, "").strip() for name in _TOKEN_ENVIRONMENT)
    try:
        from huggingface_hub import get_token

        found.add((get_token() or "").strip())
    except Exception:  # noqa: BLE001 - an unreadable token file holds nothing to scan for
        pass
    try:
        from huggingface_hub.utils import get_stored_tokens

        found.update(str(t).strip() for t in (get_stored_tokens() or {}).values())
    except Exception:  # noqa: BLE001 - as above; older huggingface_hub versions lack the function
        pass
    return tuple(sorted((t for t in found if len(t) >= _MIN_TOKEN_LENGTH), key=len, reverse=True))


def is_secret_key(key) -> bool:
    """Whether a key name (a card table row, a ``TrainingArguments`` field) names a credential."""
    return bool(SECRET_KEY_PATTERN.search(str(key)))


def looks_secret(value, tokens: Iterable[str] = ()) -> bool:
    """Whether ``value`` (a string, or any value through ``str``) holds a token-shaped string or a known token."""
    text = value if isinstance(value, str) else str(value)
    return TOKEN_PATTERN.search(text) is not None or any(t in text for t in tokens)


def redact(text: str, tokens: Iterable[str] = (), replacement: str = "<redacted>") -> str:
    """``text`` with every known token and token-shaped string replaced."""
    for token in tokens:
        text = text.replace(token, replacement)
    return TOKEN_PATTERN.sub(replacement, text)


def find_secret(data: bytes | str | Path, tokens: Iterable[str] = ()) -> str | None:
    """What secret ``data`` (bytes, text, or a file's bytes) holds, as a noun phrase that does not show the token
    ("the access token's text", "a string shaped like ..."), or None."""
    if isinstance(data, Path):
        data = data.read_bytes()
    if isinstance(data, str):
        data = data.encode("utf-8")
    for token in tokens:
        if token.encode("utf-8") in data:
            return "the access token's text"
    if _TOKEN_PATTERN_BYTES.search(data):
        return "a string shaped like a Hugging Face access token (hf_ followed by 30+ letters and digits)"
    return None
