"""The command line: every subcommand has --help; bad arguments fail clearly, non-zero."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from topocoll.cli import build_parser, main

SUBCOMMANDS = ["bench", "pingpong", "cluster", "profile", "tune", "simulate", "report", "topo",
               "algorithms", "schedule"]


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "topocoll", *args], capture_output=True,
                          text=True, timeout=120)


def test_top_level_help_lists_every_subcommand():
    result = run_cli("--help")
    assert result.returncode == 0
    for name in SUBCOMMANDS:
        assert name in result.stdout, name


@pytest.mark.parametrize("name", SUBCOMMANDS)
def test_subcommand_help(name: str, capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main([name, "--help"])
    assert exit_info.value.code == 0
    assert "usage: topocoll" in capsys.readouterr().out


@pytest.mark.parametrize("action", ["up", "down", "status", "run"])
def test_cluster_action_help(action: str, capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["cluster", action, "--help"])
    assert exit_info.value.code == 0


@pytest.mark.parametrize("argv, needle", [
    (["bench", "--collective", "all_smash"], "invalid choice"),
    (["bench", "--transport", "carrier-pigeon"], "invalid choice"),
    (["bench", "--iters", "0"], "positive integer"),
    (["bench", "--dtype", "float8"], "invalid choice"),
    (["nonsense"], "invalid choice"),
    ([], "required"),
])
def test_bad_arguments_exit_non_zero(argv, needle, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    assert needle in capsys.readouterr().err


@pytest.mark.parametrize("argv, needle", [
    (["bench", "--sizes", "12Q"], "bad size"),
    (["bench", "--sizes", "1M:1K"], "bad size range"),
    (["bench", "--algorithm", "quantum"], "unknown algorithm 'quantum'"),
    (["bench", "--layout", "2,0"], "every node needs at least one rank"),
    (["bench", "-n", "4", "--layout", "2,3"], "does not match"),
    (["topo", "--layout", "abc"], "layout"),
    (["topo", "--preset", "nope"], "unknown preset"),
    (["schedule", "--algorithm", "ring", "--layout", "2,3", "--param", "oops"], "KEY=VALUE"),
    (["schedule", "--algorithm", "nope", "--layout", "2"], "no algorithm 'nope'"),
])
def test_bad_values_give_one_line_errors(argv, needle, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert needle in err
    assert "Traceback" not in err


@pytest.mark.parametrize("argv,needle", [
    (["tune"], "--out"),
    (["tune", "--show", "missing.json"], "missing.json"),
    (["tune", "--preset", "no-such", "--out", "t.json"], "unknown preset"),
    (["simulate", "--preset", "no-such"], "unknown preset"),
    (["simulate", "--profile", "missing.json"], "missing.json"),
    (["report", "missing.jsonl", "--out", "r"], "missing.jsonl"),
])
def test_tuning_commands_refuse_bad_input_in_one_line(argv, needle, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert needle in err, err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err


def test_topo_json(capsys):
    assert main(["topo", "--layout", "3,5:rails=2", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["layout"] == [3, 5] and data["rails"] == 2 and len(data["fingerprint"]) == 16


def test_schedule_verifies_and_prints(capsys):
    assert main(["schedule", "--algorithm", "hierarchical", "--layout", "3,5", "--count",
                 "101", "--param", "inter=rabenseifner", "--dtype", "bfloat16"]) == 0
    out = capsys.readouterr().out
    assert "verified" in out and "hierarchical" in out


def test_algorithms_lists_the_library(capsys):
    assert main(["algorithms"]) == 0
    out = capsys.readouterr().out
    for name in ("ring", "recursive_doubling", "rabenseifner", "tree", "hierarchical",
                 "hierarchical_leader", "pairwise", "bruck", "hierarchical_2d"):
        assert name in out


def test_parser_builds():
    assert build_parser().prog == "topocoll"


@pytest.mark.parametrize("soak, expected", [(None, "1"), ("0.1", None)])
def test_bench_times_mpi_natives_as_blocking_calls(soak, expected, monkeypatch):
    """The `native` baseline is MPI's blocking collective, as MPI users call it (the
    transport's bounded nonblocking form is 12-48% slower); the soak keeps the bound."""
    from topocoll.benchmarks.command import run_bench_command
    from topocoll.cli import build_parser
    from topocoll.comm import job as job_module
    from topocoll.comm.transports.mpi import BLOCKING_NATIVES_ENV

    seen = {}

    def fake_init_job(*args, **kwargs):
        seen["value"] = os.environ.get(BLOCKING_NATIVES_ENV)
        raise RuntimeError("stop here")

    monkeypatch.setenv(BLOCKING_NATIVES_ENV, "")  # recorded, so the bench's value is undone
    monkeypatch.delenv(BLOCKING_NATIVES_ENV)
    monkeypatch.setattr(job_module, "init_job", fake_init_job)
    argv = ["bench", "--launcher", "mpirun", "--transport", "mpi", "--collective",
            "all_reduce", "--algorithm", "native", "--sizes", "1K"]
    args = build_parser().parse_args(argv + (["--soak", soak] if soak else []))
    with pytest.raises(RuntimeError, match="stop here"):
        run_bench_command(args)
    assert seen == {"value": expected}
