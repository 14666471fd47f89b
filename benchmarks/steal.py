"""How much CPU time the hypervisor took from this machine while a sweep ran.

Why: on a virtual machine the host may run its vCPUs elsewhere for a while, and the
kernel counts that time as `steal` in /proc/stat. Every rank slows at once, and a sweep's
rows come out slow for a few seconds with nothing in them to say why: in one full run on
our 2-core VM every all-to-all algorithm at 1-2 MiB took 25-31% longer than in the same
sweep later in the run. This VM had 3,400 s of steal in its first ten hours (about 5%
of its CPU time), in bursts. A sweep's share of steal, printed beside its rows and
collected in the suite's summary, says when a row was the machine's and not ours.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

PROC_STAT = Path("/proc/stat")
STEAL_WARN = 0.02  # above 2% of the CPU time the rows of a sweep may be skewed


@dataclass(frozen=True)
class CpuTicks:
    """Clock ticks since boot over all CPUs: stolen, and all of them."""

    steal: int
    total: int


def read_ticks(text: str | None = None) -> CpuTicks | None:
    """The `cpu` line of /proc/stat (or `text`), or None where there is none (not Linux,
    or a kernel too old to count steal)."""
    if text is None:
        try:
            text = PROC_STAT.read_text()
        except OSError:
            return None
    for line in text.splitlines():
        fields = line.split()
        if fields and fields[0] == "cpu":
            try:
                ticks = [int(v) for v in fields[1:]]
            except ValueError:
                return None
            # user nice system idle iowait irq softirq steal [guest guest_nice]: the
            # guest times are already inside user and nice
            if len(ticks) < 8:
                return None
            return CpuTicks(steal=ticks[7], total=sum(ticks[:8]))
    return None


def steal_share(before: CpuTicks | None, after: CpuTicks | None) -> float | None:
    """Steal's share of the CPU time between two readings; None if either is missing or
    no time passed."""
    if before is None or after is None or after.total <= before.total:
        return None
    return max(after.steal - before.steal, 0) / (after.total - before.total)


def steal_line(sweep: str, share: float | None) -> str | None:
    """The line printed after a stage (a sweep, the profile): None where steal is
    unknown."""
    if share is None:
        return None
    line = f"# {sweep}: the hypervisor took {share:.1%} of the CPU time (steal)"
    if share > STEAL_WARN:
        line += "; the rows of this sweep may be slow for that reason, not ours"
    return line


def steal_summary(shares: dict[str, float]) -> str | None:
    """One summary table row naming the stages above `STEAL_WARN`, or saying there were
    none; None if steal was never known."""
    if not shares:
        return None
    worst = max(shares, key=lambda name: shares[name])
    above = [f"{name} {share:.1%}" for name, share in shares.items() if share > STEAL_WARN]
    detail = ", ".join(above) if above else f"none above {STEAL_WARN:.0%}"
    return (f"| CPU time taken by the hypervisor (steal), per stage | {detail} | | "
            f"worst {worst} {shares[worst]:.1%} |")
