"""The main job: benchmark our algorithms against the libraries' own on an emulated cluster.

    python -m topocoll.benchmarks.suite [--out results] [--quick] [--local]

As root (where network namespaces work) it brings up 2 nodes x 4 ranks with 1 Gbit/s
uplinks, runs the sweeps below through `cluster run` (torchrun for Gloo, mpirun for MPI),
then 2 rails, then uneven nodes (3 + 5), and always brings the cluster down. Elsewhere
it runs the same sweeps on localhost with the local launcher. Every row is also written
as JSON lines under --out, and a summary of the headline ratios (each against a peer
measured in the same run) is printed and saved as summary.md.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

BENCH = [sys.executable, "-m", "topocoll", "bench"]


@dataclass(frozen=True)
class Sweep:
    name: str
    transport: str
    collective: str
    algorithms: str
    sizes: str
    iters: int = 3
    check: bool = False


def sweeps(quick: bool) -> list[Sweep]:
    big = "16M" if quick else "16M,64M"
    return [
        Sweep("allreduce_small", "gloo", "all_reduce", "all,native", "4K,64K,1M", 3, True),
        Sweep("allreduce_large", "gloo", "all_reduce", "ring,hierarchical,native", big),
        Sweep("alltoall", "gloo", "all_to_all", "all,native", "8K,64K,512K", 5, True),
        Sweep("alltoallv", "gloo", "all_to_all_v", "all,native", "8K,512K", 3, True),
        Sweep("mpi_allreduce", "mpi", "all_reduce", "hierarchical,ring,native", big),
        Sweep("mpi_alltoall", "mpi", "all_to_all", "all,native", "8K,512K", 5, True),
    ]


RAIL_SWEEPS = [
    Sweep("rails2_allreduce", "gloo", "all_reduce", "hierarchical,native", "64M"),
    Sweep("rails2_mpi_allreduce", "mpi", "all_reduce", "hierarchical,native", "64M"),
    Sweep("rails2_alltoall", "mpi", "all_to_all", "hierarchical_2d,native", "512K", 5),
]
UNEVEN_SWEEPS = [
    Sweep("uneven_allreduce", "gloo", "all_reduce", "all", "4K,1M", 2, True),
    Sweep("uneven_alltoallv", "gloo", "all_to_all_v", "all", "8K,256K", 2, True),
]


def _bench_args(sweep: Sweep, launcher: str, json_path: Path) -> list[str]:
    args = ["--launcher", launcher, "--transport", sweep.transport,
            "--collective", sweep.collective, "--algorithm", sweep.algorithms,
            "--sizes", sweep.sizes, "--iters", str(sweep.iters), "--warmup", "1",
            "--json", str(json_path), "--timeout", "240"]
    return args + (["--check"] if sweep.check else [])


def run_sweep(sweep: Sweep, out: Path, tag: str, cluster: bool, layout: str) -> Path:
    json_path = out / f"{tag}{sweep.name}.jsonl"
    print(f"\n### {tag}{sweep.name}: {sweep.collective} over {sweep.transport}", flush=True)
    if cluster:
        from topocoll.topology.cluster import cluster_run

        launcher = "mpirun" if sweep.transport == "mpi" else "torchrun"
        with open(json_path, "w"):
            pass
        code = cluster_run(launcher, [*BENCH, *_bench_args(sweep, launcher, json_path)],
                           timeout=600)
    else:
        cmd = [*BENCH, *_bench_args(sweep, "local", json_path), "--layout", layout]
        code = subprocess.run(cmd, timeout=900).returncode
    if code:
        print(f"!!! {sweep.name} exited with {code}", flush=True)
    return json_path


def load_rows(paths: list[Path]) -> list[dict]:
    rows = []
    for path in paths:
        if path.exists():
            rows += [json.loads(line) | {"sweep": path.stem.removeprefix("local_")}
                     for line in
                     path.read_text().splitlines() if line.strip()]
    return rows


def _time(rows: list[dict], sweep: str, algorithm: str, nbytes: int) -> float | None:
    for row in rows:
        if row["sweep"] == sweep and row["algorithm"] == algorithm and row["bytes"] == nbytes:
            return row["time_us"]
    return None


def summarize(rows: list[dict]) -> str:
    """Headline ratios, each against a peer measured in the same run."""
    lines = ["| claim | ours | peer | ratio |", "|---|---|---|---|"]

    def ratio(label: str, sweep: str, ours: str, peer_sweep: str, peer: str, nbytes: int,
              invert: bool = False) -> None:
        a, b = _time(rows, sweep, ours, nbytes), _time(rows, peer_sweep, peer, nbytes)
        if a is None or b is None:
            return
        value = a / b if invert else b / a
        lines.append(f"| {label} | {ours} {a / 1e3:.1f} ms | {peer} {b / 1e3:.1f} ms | "
                     f"{value:.2f}x |")

    mib64 = 64 << 20
    ratio("64 MiB all-reduce, Gloo transport: hierarchical vs Gloo native", "allreduce_large",
          "hierarchical", "allreduce_large", "native", mib64)
    ratio("64 MiB all-reduce, Gloo transport: hierarchical vs our flat ring",
          "allreduce_large", "hierarchical", "allreduce_large", "ring", mib64)
    ratio("64 MiB all-reduce, MPI transport: hierarchical vs Open MPI native (speed ratio)",
          "mpi_allreduce", "hierarchical", "mpi_allreduce", "native", mib64)
    best = _best(rows, "alltoall", 8 << 10)
    if best:
        ratio(f"all-to-all 1 KiB per peer: {best} vs Gloo native", "alltoall", best,
              "alltoall", "native", 8 << 10)
    ratio("64 MiB hierarchical all-reduce: 2 rails vs 1 rail (Gloo)", "rails2_allreduce",
          "hierarchical", "allreduce_large", "hierarchical", mib64)
    ratio("64 MiB Gloo native all-reduce: 2 rails vs 1 rail", "rails2_allreduce", "native",
          "allreduce_large", "native", mib64)
    ratio("64 MiB Open MPI native all-reduce: 2 rails vs 1 rail", "rails2_mpi_allreduce",
          "native", "mpi_allreduce", "native", mib64)
    for row in rows:
        if row["algorithm"] == "hierarchical" and row["bytes"] == mib64 and row.get("bound_us"):
            share = 100 * row["bound_us"] / row["time_us"]
            lines.append(f"| {row['sweep']}: hierarchical at {share:.0f}% of the physical "
                         f"bound ({row['bound_us'] / 1e3:.0f} ms) | | | |")
    checked = [r for r in rows if r.get("wrong") is not None]
    wrong = sum(r["wrong"] for r in checked)
    lines.append(f"| verified rows (--check) | {len(checked)} rows | #wrong total {wrong} | |")
    return "\n".join(lines) + "\n"


def _best(rows: list[dict], sweep: str, nbytes: int) -> str | None:
    ours = [r for r in rows if r["sweep"] == sweep and r["bytes"] == nbytes
            and r["algorithm"] not in ("native", "tuned")]
    return min(ours, key=lambda r: r["time_us"])["algorithm"] if ours else None


def cluster_possible() -> bool:
    if os.geteuid() != 0:
        return False
    probe = subprocess.run(["ip", "netns", "add", "tc-probe"], capture_output=True)
    subprocess.run(["ip", "netns", "del", "tc-probe"], capture_output=True)
    return probe.returncode == 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="results")
    parser.add_argument("--quick", action="store_true", help="smaller sizes (CI smoke)")
    parser.add_argument("--local", action="store_true", help="no emulated cluster")
    parser.add_argument("--rate", default="1gbit")
    parser.add_argument("--burst", default="256kb")
    args = parser.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    paths: list[Path] = []
    use_cluster = not args.local and cluster_possible()
    if use_cluster:
        from topocoll.topology.cluster import cluster_down, cluster_up

        print(f"emulated cluster: 2 nodes x 4 ranks, {args.rate} uplinks", flush=True)
        try:
            cluster_up(2, 4, rate=args.rate, burst=args.burst)
            paths += [run_sweep(s, out, "", True, "4,4") for s in sweeps(args.quick)]
            if not args.quick:
                cluster_up(2, 4, rails=2, rate=args.rate, burst=args.burst)
                paths += [run_sweep(s, out, "", True, "4,4") for s in RAIL_SWEEPS]
            cluster_up(layout="3,5", rate=args.rate, burst=args.burst)
            paths += [run_sweep(s, out, "", True, "3,5") for s in UNEVEN_SWEEPS]
        finally:
            cluster_down()
    else:
        print("no emulated cluster (needs root and network namespaces): localhost, "
              "nodes of 2 and 3 ranks", flush=True)
        for sweep in sweeps(True)[:4] + UNEVEN_SWEEPS:
            paths.append(run_sweep(sweep, out, "local_", False, "2,3"))
    rows = load_rows(paths)
    summary = summarize(rows)
    (out / "summary.md").write_text(summary)
    print("\n" + summary)
    print(f"suite finished in {time.monotonic() - started:.0f} s; results in {out}/")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
