"""The benchmark suite runs and checks its books (sizes tiny; nothing here times anything)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests import pgbouncer
from tokendb.testing import test_server_url as server_url

ROOT = Path(__file__).resolve().parent.parent


def bench(*args: str, module: str = "bench") -> subprocess.CompletedProcess[str]:
    """``python -m module *args`` in the project's root (``bench`` or one of its modules)."""
    return subprocess.run(
        [sys.executable, "-m", module, *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )


def test_help_names_every_size_and_an_example() -> None:
    result = bench("--help")
    assert result.returncode == 0, result.stderr
    for option in ("--quick", "--duration", "--rounds", "--users", "--history-rows", "--only"):
        assert option in result.stdout
    assert "python -m bench --quick" in result.stdout


def test_fewer_than_three_rounds_is_refused() -> None:
    result = bench("--rounds", "2")
    assert result.returncode != 0 and "at least 3" in result.stderr


def test_the_readme_links_the_benchmark_write_up() -> None:
    readme = (ROOT / "README.md").read_text()
    section = readme[readme.index("\n## Performance\n") :]
    assert "python -m bench" in section and "(bench/README.md)" in section
    write_up = (ROOT / "bench" / "README.md").read_text()
    for command in ("python -m bench --quick", "python -m bench.calls", "bench/RESULTS.md"):
        assert command in write_up, command


@pytest.mark.parametrize(
    "scenarios",
    [
        "charge-users,coalesced-hot,charge-many,verify,add-message,list-small",
        pytest.param(
            "verify-off,pgbouncer-charge,pgbouncer-verify-cached",
            marks=pytest.mark.skipif(pgbouncer.binary() is None, reason="no pgbouncer"),
        ),
    ],
)
def test_a_tiny_run_writes_the_table_and_its_books_balance(
    tmp_path: Path, pytestconfig: pytest.Config, scenarios: str
) -> None:
    markdown, results = tmp_path / "RESULTS.md", tmp_path / "results.json"
    result = bench(
        "--duration",
        "0.1",
        "--warmup",
        "0.05",
        "--rounds",
        "3",
        "--concurrency",
        "8",
        "--users",
        "20",
        "--batch",
        "8",
        "--small-history-rows",
        "200",
        "--only",
        scenarios,
        "--server-url",
        server_url(pytestconfig),
        "--markdown",
        str(markdown),
        "--json",
        str(results),
    )
    assert result.returncode == 0, result.stderr[-3000:]
    header = [cell.strip() for cell in result.stdout.splitlines()[0].split("|")]
    assert header[:5] == ["scenario", "callers", "tokendb ops/s", "raw ops/s", "ratio"]
    data = json.loads(results.read_text())
    assert [r["key"] for r in data["results"]] == scenarios.split(",")
    for row in data["results"]:
        assert row["problems"] == [], row
        assert row["tokendb"]["ops_per_s"] > 0 and row["raw"]["ops_per_s"] > 0
    assert "tokendb benchmark results" in markdown.read_text()


TINY_AUDIT = ("--rows", "2000", "--users", "20", "--samples", "10", "--full-runs", "1")


def test_the_audit_benchmark_seeds_valid_chains_and_times_every_audit() -> None:
    """`python -m bench.audit` at a tiny size: its seeded ledger audits clean (it
    exits 1 otherwise) and it reports each audit, incremental ones included."""
    result = bench("--server-url", server_url(), *TINY_AUDIT, module="bench.audit")
    assert result.returncode == 0, result.stderr
    for audit in ("`audit_ledger(user=…)`", "`audit_ledger()`", "1% new rows", "nothing new"):
        assert audit in result.stdout, audit
    assert "python -m bench.audit" in (ROOT / "bench" / "README.md").read_text()


def test_the_cpu_benchmark_compares_both_operations_against_raw() -> None:
    """`python -m bench.cpu` at a tiny size prints a line per operation with both sides."""
    result = bench("5", module="bench.cpu")
    assert result.returncode == 0, result.stderr
    for operation in ("list_transactions, 50-row page", "charge_many, 64 items"):
        (line,) = [line for line in result.stdout.splitlines() if line.startswith(operation)]
        assert "tokendb" in line and "raw" in line, line
    assert "python -m bench.cpu" in (ROOT / "bench" / "README.md").read_text()
