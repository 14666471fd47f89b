"""Size sweeps: `1K:64M` (powers of two), `4K`, `1K,3K,1M`, `1000:9000:2` (factor)."""

from __future__ import annotations

import re

_UNITS = {"": 1, "B": 1, "K": 1 << 10, "KB": 1 << 10, "KIB": 1 << 10, "M": 1 << 20,
          "MB": 1 << 20, "MIB": 1 << 20, "G": 1 << 30, "GB": 1 << 30, "GIB": 1 << 30}
_SIZE = re.compile(r"^\s*(\d+)\s*([a-zA-Z]*)\s*$")


class SizeError(ValueError):
    pass


def parse_size(text: str) -> int:
    match = _SIZE.match(text)
    if not match or match[2].upper() not in _UNITS:
        raise SizeError(f"bad size {text!r}: expected e.g. 1024, 4K, 64M, 1G")
    return int(match[1]) * _UNITS[match[2].upper()]


def parse_sizes(text: str) -> list[int]:
    """Sorted, de-duplicated byte sizes."""
    out: set[int] = set()
    for part in text.split(","):
        part = part.strip()
        if not part:
            continue
        if ":" in part:
            bits = part.split(":")
            if len(bits) not in (2, 3):
                raise SizeError(f"bad size range {part!r}: expected LO:HI or LO:HI:FACTOR")
            lo, hi = parse_size(bits[0]), parse_size(bits[1])
            factor = int(bits[2]) if len(bits) == 3 else 2
            if lo <= 0 or hi < lo or factor < 2:
                raise SizeError(f"bad size range {part!r}: need 0 < LO <= HI and FACTOR >= 2")
            size = lo
            while size <= hi:
                out.add(size)
                size *= factor
        else:
            out.add(parse_size(part))
    if not out:
        raise SizeError(f"no sizes in {text!r}")
    return sorted(out)


def format_size(nbytes: int) -> str:
    for unit, scale in (("G", 1 << 30), ("M", 1 << 20), ("K", 1 << 10)):
        if nbytes >= scale and nbytes % scale == 0:
            return f"{nbytes // scale}{unit}"
    return str(nbytes)
