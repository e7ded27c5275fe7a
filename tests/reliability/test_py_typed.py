"""Every package ships a py.typed marker, and the wheels include it."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = {
    ".": "conversion_core",
    "plugins/bf16": "conversion_core_bf16",
    "plugins/deepgemm_fp8": "conversion_core_deepgemm_fp8",
    "plugins/cutlass_fp8": "conversion_core_cutlass_fp8",
    "examples/third_party_plugin": "conversion_core_fp8_per_tensor",
}


@pytest.mark.parametrize(("project", "package"), PACKAGES.items())
def test_py_typed_in_source(project: str, package: str) -> None:
    assert (ROOT / project / package / "py.typed").is_file()


@pytest.mark.parametrize(("project", "package"), PACKAGES.items())
def test_py_typed_in_wheel(project: str, package: str, tmp_path: Path) -> None:
    pytest.importorskip("hatchling", reason="building a wheel offline needs hatchling installed")
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-w",
            str(tmp_path),
            str(ROOT / project),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    (wheel,) = tmp_path.glob("*.whl")
    assert f"{package}/py.typed" in zipfile.ZipFile(wheel).namelist()


@pytest.mark.parametrize("package", PACKAGES.values())
def test_py_typed_in_installed_package(package: str) -> None:
    """Under nox's `all` session the packages come from built wheels: this proves the wheel has it."""
    import importlib.resources
    import importlib.util

    if importlib.util.find_spec(package) is None:
        pytest.skip(f"{package} is not installed")
    assert importlib.resources.files(package).joinpath("py.typed").is_file()
