"""Byte quantities as people write them (``512MiB``, ``2GB``, ``1073741824``) and as they read them."""

from __future__ import annotations

import re

from cosine.errors import InvalidParameterError

_UNITS = {
    "": 1, "b": 1,
    "k": 1000, "kb": 1000, "m": 1000**2, "mb": 1000**2, "g": 1000**3, "gb": 1000**3, "t": 1000**4, "tb": 1000**4,
    "kib": 1024, "mib": 1024**2, "gib": 1024**3, "tib": 1024**4,
}
_PATTERN = re.compile(r"^\s*(\d+(?:\.\d*)?|\.\d+)\s*([a-zA-Z]*)\s*$")


def parse_bytes(text: str | int, field: str = "kv_memory") -> int:
    """Bytes in ``text``: a plain number of bytes or a number with a unit (decimal ``kB``/``MB``/``GB``/``TB``,
    binary ``KiB``/``MiB``/``GiB``/``TiB``; case does not matter). At least one byte."""
    if isinstance(text, bool):
        raise InvalidParameterError(field, f"expected a size such as 512MiB or 2GB, got {text!r}")
    if isinstance(text, int):
        value = text
    else:
        match = _PATTERN.match(str(text))
        unit = match.group(2).lower() if match else None
        if match is None or unit not in _UNITS:
            raise InvalidParameterError(field, f"expected a size such as 512MiB, 2GB or a plain number of bytes, "
                                               f"got {text!r}")
        value = int(float(match.group(1)) * _UNITS[unit])
    if value < 1:
        raise InvalidParameterError(field, f"must be at least one byte, got {text!r}")
    return value


def human_bytes(n: int | float | str | None) -> str:
    """``n`` bytes in binary units, about three significant digits (``1.50 GiB``, ``512 MiB``); '' for nothing."""
    if n is None or n == "":
        return ""
    try:
        value = float(n)
    except (TypeError, ValueError):
        return str(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(value) < 1024:
            if unit == "B":
                return f"{int(value)} B"
            digits = 0 if value >= 100 else 1 if value >= 10 else 2
            return f"{value:.{digits}f} {unit}"
        value /= 1024
    return f"{value:.2f} TiB"
