"""Request ownership: a request belongs to the client holding its owner secret.

Every :class:`~cosine.client.Client` holds a random secret (or one it is given, to share requests across
processes). Its request ids end in ``.{owner_tag}`` (a hash of the secret), and each request and cancel carries
the secret itself (the request and cancel streams are write-only for producers). A verifier

- serves a request whose id ends in an owner tag only if the secret it carries matches that tag, and otherwise
  dead-letters it without writing anywhere, so nobody can write into, resume or end another client's request;
- honours a cancellation (notice or marker) of such a request only with the matching secret;
- writes the output to ``out:{request}.{read_tag}``, where the read tag hashes the secret with the id, so
  knowing a request id (from a log or the dashboard) is not enough to read its output.

Ids without a tag (a producer writing raw messages) keep the old behaviour: their id is their only key.
"""

from __future__ import annotations

import hashlib
import re
import secrets

TAG_HEX = 16
_OWNED = re.compile(rf"\.[0-9a-f]{{{TAG_HEX}}}$")


def new_secret() -> str:
    return secrets.token_hex(16)


def _digest(*parts: str) -> str:
    return hashlib.blake2b("\x00".join(parts).encode(), digest_size=TAG_HEX // 2, person=b"cosine-owner").hexdigest()


def owner_tag(secret: str) -> str:
    """The part of a request id that names its owner (a hash: the id does not reveal the secret)."""
    return _digest("owner", secret)


def owned_id(base: str, secret: str) -> str:
    return f"{base}.{owner_tag(secret)}"


def is_owned(request_id: str) -> bool:
    return bool(_OWNED.search(request_id))


def may_act(request_id: str, secret: str | None) -> bool:
    """Whether the holder of ``secret`` may run, resume or cancel ``request_id``: an owned id needs its secret."""
    if not is_owned(request_id):
        return True
    return secret is not None and request_id.endswith("." + owner_tag(secret))


def output_name(request_id: str, secret: str | None) -> str:
    """The name the request's output stream is keyed by (``Keys.out``): the id alone for an unowned id (or
    without a secret); for an owned one the id and a read tag only its secret gives."""
    if secret is None or not is_owned(request_id):
        return request_id
    return f"{request_id}.{_digest('read', secret, request_id)}"
