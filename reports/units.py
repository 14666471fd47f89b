"""Human units for sizes and times, shared by figures, page and Markdown so they agree."""

from __future__ import annotations

from topocoll.benchmarks.sizes import format_size


def size_label(nbytes: int | float) -> str:
    """`4096` -> `4K`, `67108864` -> `64M`; sizes that are not whole units keep 3 digits."""
    n = int(nbytes)
    if (n == nbytes and format_size(n) != str(n)) or n < 1024:
        return format_size(n)
    for unit, scale in (("G", 1 << 30), ("M", 1 << 20), ("K", 1 << 10)):
        if n >= scale:
            return f"{n / scale:.3g}{unit}"
    return str(n)


def range_label(lo: int, hi: int | None) -> str:
    """A half-open byte range [lo, hi) as the page shows it: `[4K, 64K)`, `>= 16M`."""
    if hi is None:
        return f">= {size_label(lo)}"
    return f"[{size_label(lo)}, {size_label(hi)})"


def sizes_label(lo: int, hi: int) -> str:
    """Measured sizes from lo to hi, both included: `4K..1M`, or `64M` for one size."""
    return size_label(lo) if lo == hi else f"{size_label(lo)}..{size_label(hi)}"


def time_label(us: float | None) -> str:
    """Microseconds in the unit a reader expects: `850 us`, `12.3 ms`, `1.04 s`."""
    if us is None:
        return "-"
    if us >= 1e6:
        return f"{us / 1e6:.3g} s"
    if us >= 1e3:
        return f"{us / 1e3:.3g} ms"
    return f"{us:.3g} us"


def ratio_label(ratio: float | None) -> str:
    return "-" if ratio is None else f"{ratio:.2f}x"


def percent_label(fraction: float | None) -> str:
    return "-" if fraction is None else f"{fraction * 100:+.1f}%"
