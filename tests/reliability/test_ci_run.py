""".ci/run counts tests from pytest's JUnit XML reports, never from pytest's text output.

Each test copies .ci/run into a throwaway repository whose README test command is a fake
"nox" that prints nox's session lines and writes JUnit reports where noxfile's _pytest would.
"""

from __future__ import annotations

import shutil
import subprocess
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
MARKER = "<!-- test command: .ci/run runs the line below -->"


def junit(tests: int, failures: int = 0, errors: int = 0, skipped: int = 0) -> str:
    return (
        f'<?xml version="1.0"?><testsuites><testsuite name="pytest" tests="{tests}" failures="{failures}" '
        f'errors="{errors}" skipped="{skipped}"></testsuite></testsuites>'
    )


def run_ci(tmp_path: Path, script: str) -> subprocess.CompletedProcess[str]:
    repo = tmp_path / "repo"
    (repo / ".ci").mkdir(parents=True)
    shutil.copy(ROOT / ".ci" / "run", repo / ".ci" / "run")
    (repo / "fake_nox.sh").write_text(textwrap.dedent(script))
    (repo / "README.md").write_text(f"# x\n\n{MARKER}\n```sh\nbash fake_nox.sh\n```\n")
    return subprocess.run(["bash", ".ci/run"], cwd=repo, capture_output=True, text=True, timeout=120)


def test_counts_come_from_junit_xml_not_pytest_text(tmp_path: Path) -> None:
    done = run_ci(
        tmp_path,
        f"""\
        echo "nox > Running session core"
        echo "==== 999 passed in 1.0s ===="   # a misleading text summary: must not be counted
        echo '{junit(10, skipped=2)}' > "$CONVERSION_CORE_JUNIT_DIR/core-1.xml"
        echo "nox > Session core was successful in 1 seconds."
        echo "nox > Running session plugin-bf16"
        echo '{junit(5, failures=0)}' > "$CONVERSION_CORE_JUNIT_DIR/plugin-bf16-1.xml"
        echo '{junit(4, errors=0, skipped=1)}' > "$CONVERSION_CORE_JUNIT_DIR/plugin-bf16-2.xml"
        echo "nox > Session plugin-bf16 was successful in 1 seconds."
        """,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    lines = done.stdout.splitlines()
    assert lines[-1] == "total: 16 passed, 0 failed, 3 skipped"
    row = next(line for line in lines if line.startswith("ci: plugin-bf16 "))
    assert row.split()[2:8] == ["ok", "8", "0", "0", "1", "2"]


def test_failures_and_a_session_that_passed_no_test_fail_ci(tmp_path: Path) -> None:
    done = run_ci(
        tmp_path,
        f"""\
        echo "nox > Running session core"
        echo '{junit(3, failures=1, errors=1)}' > "$CONVERSION_CORE_JUNIT_DIR/core-1.xml"
        echo "nox > Session core was successful in 1 seconds."
        echo "nox > Running session all"
        echo '{junit(2, skipped=2)}' > "$CONVERSION_CORE_JUNIT_DIR/all-1.xml"
        echo "nox > Session all was successful in 1 seconds."
        """,
    )
    assert done.returncode != 0
    assert "<- ran no test" in next(line for line in done.stdout.splitlines() if line.startswith("ci: all "))
    assert done.stdout.splitlines()[-1] == "total: 1 passed, 2 failed, 2 skipped"


@pytest.mark.parametrize("exit_code", [0, 3])
def test_no_report_at_all_fails_ci(tmp_path: Path, exit_code: int) -> None:
    done = run_ci(tmp_path, f'echo "==== 5 passed in 1.0s ===="\nexit {exit_code}\n')
    assert done.returncode != 0
    assert done.stdout.splitlines()[-1] == "total: 0 passed, 0 failed, 0 skipped"


def test_noxfile_pytest_writes_junit_reports_per_session_and_run() -> None:
    text = (ROOT / "noxfile.py").read_text()
    assert "--junitxml=" in text and "CONVERSION_CORE_JUNIT_DIR" in text
