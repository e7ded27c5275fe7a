"""The ``conversion-core`` command as a user meets it.

``run`` starts the installed console script as a process (each start imports torch: seconds);
``run_here`` calls ``cli.main`` in this process for the many cases that only need its output and
exit code. Most cases use small throwaway plugin distributions (a real ``.dist-info`` with entry
points in a temporary directory on the path), selected with CONVERSION_CORE_PLUGINS, so they do
not depend on which built-in plugins are installed; cases about the built-ins skip without them.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from dataclasses import dataclass
from importlib.metadata import entry_points
from pathlib import Path

import pytest

from conversion_core.apps import cli
from conversion_core.loading import registry

SCRIPT = Path(sys.executable).with_name("conversion-core")
if not SCRIPT.exists():  # e.g. a venv whose scripts live elsewhere
    SCRIPT = Path(shutil.which("conversion-core") or SCRIPT)

WORKING = """
import torch
import conversion_core as cc

def _copy(src, out, scale_out):
    out.copy_(src)

def _raises(qc):
    raise RuntimeError("this predicate always raises")

@cc.hookimpl
def register_conversion():
    return cc.Conversion(
        name="cli_test_copy", fn=_copy, requires_scale=False, dst_dtype=torch.float32,
        compile_target="cli_test_target", compile_metadata={"layout": "plain", "block": (1, 2)},
    )

@cc.hookimpl
def default_rule():
    return [
        cc.Rule(conversion="cli_test_copy", predicate=_raises, priority=3, name="raising-rule"),
        cc.Rule(conversion="cli_test_copy", predicate=lambda qc: qc.get("quant_method") == "cli-test",
                priority=7, name="cli-test-rule"),
        cc.Rule(conversion="cli_test_copy", predicate=lambda qc: False, priority=-5, name="never-rule"),
    ]
"""

DUPLICATE = """
import torch
import conversion_core as cc

@cc.hookimpl
def register_conversion():
    return cc.Conversion(name="cli_test_copy", fn=lambda s, o, x: None, requires_scale=False)
"""

BROKEN = 'raise RuntimeError("cli_broken refuses to import")\n'

SUBCOMMAND = """
from conversion_core.errors import ConfigError

def _run(args):
    if args.fail:
        raise ConfigError("hello-subcommand was told to fail\\nsecond line of detail")
    print("hello", args.who)
    return 0

def add_parser(subparsers):
    p = subparsers.add_parser("hello-subcommand", help="says hello")
    p.add_argument("who")
    p.add_argument("--fail", action="store_true")
    p.set_defaults(func=_run)
"""


def _write_dist(site: Path, dist: str, version: str, module: str, source: str, entry_point: str) -> None:
    (site / f"{module}.py").write_text(textwrap.dedent(source))
    info = site / f"{dist.replace('-', '_')}-{version}.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: {version}\n")
    (info / "entry_points.txt").write_text(f"[conversion_core]\n{entry_point} = {module}\n")


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    site = tmp_path_factory.mktemp("site")
    _write_dist(site, "cli-test-plugin", "1.2.3", "cli_test_plugin", WORKING, "cli_test")
    _write_dist(site, "cli-dup-plugin", "0.0.1", "cli_dup_plugin", DUPLICATE, "cli_dup")
    _write_dist(site, "cli-broken-plugin", "0.9", "cli_broken_plugin", BROKEN, "cli_broken")
    return site


def run(
    args: list[str], site: Path | None = None, plugins: str | None = None, **env: str
) -> subprocess.CompletedProcess:
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("CONVERSION_CORE_")}
    full_env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", **env)
    if site is not None:
        full_env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(site), os.environ.get("PYTHONPATH")]))
    if plugins is not None:
        full_env["CONVERSION_CORE_PLUGINS"] = plugins
    return subprocess.run([str(SCRIPT), *args], capture_output=True, text=True, env=full_env, timeout=120)


@dataclass
class Result:
    returncode: int | str | None
    stdout: str
    stderr: str


@pytest.fixture
def run_here(site: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]):
    """``cli.main`` in this process, with the throwaway plugins importable and a fresh registry."""

    def _run(args: list[str], plugins: str | None = None, **env: str) -> Result:
        with monkeypatch.context() as mp:
            for key in [k for k in os.environ if k.startswith("CONVERSION_CORE_")]:
                mp.delenv(key)
            mp.setenv("HF_HUB_OFFLINE", "1")
            mp.setenv("TRANSFORMERS_OFFLINE", "1")
            if plugins is not None:
                mp.setenv("CONVERSION_CORE_PLUGINS", plugins)
            for key, value in env.items():
                mp.setenv(key, value)
            mp.syspath_prepend(str(site))
            mp.setattr(registry, "_cached", None)  # re-scan here; the previous registry comes back after
            capsys.readouterr()
            try:
                code: int | str | None = cli.main(args)
            except SystemExit as exc:  # argparse
                code = exc.code
            captured = capsys.readouterr()
        return Result(code, captured.out, captured.err)

    return _run


def one_line_error(proc: subprocess.CompletedProcess | Result) -> str:
    """The reason an exit-1 run gives: exactly one line on stderr, nothing on stdout."""
    assert proc.returncode == 1, (proc.returncode, proc.stdout, proc.stderr)
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert proc.stdout == ""
    return lines[0]


def test_console_script_is_installed() -> None:
    assert SCRIPT.exists(), f"the conversion-core console script is not installed next to {sys.executable}"


# --- plugins -------------------------------------------------------------------------------------


def test_plugins_json_reports_every_entry_point_with_what_became_of_it(run_here) -> None:
    proc = run_here(["plugins", "--json"], plugins="cli_test,cli_broken")
    assert proc.returncode == 0, proc.stderr
    records = {rec["name"]: rec for rec in json.loads(proc.stdout)}

    assert records["cli_test"] == {
        "name": "cli_test",
        "dist": "cli-test-plugin",
        "version": "1.2.3",
        "status": "loaded",
        "error": None,
        "conversions": [{"name": "cli_test_copy", "compile_target": "cli_test_target"}],
        "rules": [  # in the plugin's own order
            {"name": "raising-rule", "conversion": "cli_test_copy", "priority": 3, "conversion_registered": True},
            {"name": "cli-test-rule", "conversion": "cli_test_copy", "priority": 7, "conversion_registered": True},
            {"name": "never-rule", "conversion": "cli_test_copy", "priority": -5, "conversion_registered": True},
        ],
    }
    broken = records["cli_broken"]
    assert (broken["dist"], broken["version"], broken["status"]) == ("cli-broken-plugin", "0.9", "failed")
    assert "cli_broken refuses to import" in broken["error"]
    assert broken["conversions"] == [] and broken["rules"] == []
    # Not allowed by CONVERSION_CORE_PLUGINS: listed, never imported.
    assert records["cli_dup"]["status"] == "disabled"
    installed = {ep.name for ep in entry_points(group="conversion_core")}
    assert set(records) == installed | {"cli_test", "cli_broken", "cli_dup"}
    assert all(rec["status"] == "disabled" for name, rec in records.items() if name in installed)


def test_plugins_text_shows_status_error_targets_and_priorities(site: Path) -> None:
    proc = run(["plugins"], site, plugins="cli_test,cli_broken")
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout.splitlines()
    assert "cli_test  (cli-test-plugin 1.2.3)  loaded" in out
    assert "cli_broken  (cli-broken-plugin 0.9)  failed" in out
    assert "    error: RuntimeError: cli_broken refuses to import" in out
    assert "    conversion cli_test_copy  compile_target=cli_test_target" in out
    assert "    rule cli-test-rule -> cli_test_copy  priority=7" in out
    assert "cli_dup  (cli-dup-plugin 0.0.1)  disabled" in out
    # The skipped plugin is also reported once on stderr, naming it and its distribution.
    warnings = [line for line in proc.stderr.splitlines() if "cli_broken" in line]
    assert len(warnings) == 1 and "cli-broken-plugin" in warnings[0], proc.stderr


def test_plugins_strict_mode_turns_a_broken_plugin_into_exit_1(site: Path) -> None:
    reason = one_line_error(run(["plugins"], site, plugins="cli_test,cli_broken", CONVERSION_CORE_STRICT="1"))
    assert reason.startswith("conversion-core plugins: ")
    assert "cli_broken" in reason and "cli_broken refuses to import" in reason


def test_plugins_two_plugins_with_one_conversion_name_is_exit_1_naming_both(run_here) -> None:
    reason = one_line_error(run_here(["plugins"], plugins="cli_test,cli_dup"))
    assert "cli_test_copy" in reason
    assert "cli-test-plugin" in reason and "cli-dup-plugin" in reason
    assert "CONVERSION_CORE_PLUGINS" in reason


def test_plugins_with_every_plugin_disabled_lists_them_and_succeeds(run_here) -> None:
    proc = run_here(["plugins", "--json"], plugins="")
    assert proc.returncode == 0, proc.stderr
    assert {rec["status"] for rec in json.loads(proc.stdout)} == {"disabled"}


# --- resolve -------------------------------------------------------------------------------------


def test_resolve_config_json_prints_the_conversion_and_its_tags(site: Path, tmp_path: Path) -> None:
    config = tmp_path / "config.json"
    config.write_text(json.dumps({"model_type": "llama", "quantization_config": {"quant_method": "cli-test"}}))
    proc = run(["resolve", str(config), "--json"], site, plugins="cli_test")
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout) == {
        "conversion": "cli_test_copy",
        "plugin": "cli_test",
        "compile_target": "cli_test_target",
        "compile_metadata": {"layout": "plain", "block": [1, 2]},
    }


RULES = ("cli-test-rule", "raising-rule", "never-rule")


def test_resolve_model_directory_explain_lists_every_rule_in_priority_order(site: Path, tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text(json.dumps({"quantization_config": {"quant_method": "cli-test"}}))
    proc = run(["resolve", str(tmp_path), "--explain"], site, plugins="cli_test")
    assert proc.returncode == 0, proc.stderr
    lines = {name: line for line in proc.stdout.splitlines() for name in RULES if f" {name} " in line}
    assert sorted(lines, key=proc.stdout.index) == ["cli-test-rule", "raising-rule", "never-rule"]  # 7, 3, -5
    assert lines["cli-test-rule"].startswith("*") and lines["cli-test-rule"].endswith("  matched")
    assert lines["raising-rule"].endswith("  raised (RuntimeError: this predicate always raises)")
    assert lines["never-rule"].endswith("  no match") and not lines["never-rule"].startswith("*")
    assert "conversion:       cli_test_copy  (plugin cli_test)" in proc.stdout
    assert "compile_target:   cli_test_target" in proc.stdout


def test_resolve_no_match_is_exit_1_with_the_config_it_saw(site: Path, tmp_path: Path) -> None:
    config = tmp_path / "config.json"
    config.write_text(json.dumps({"quantization_config": {"quant_method": "int3-unheard-of"}}))
    reason = one_line_error(run(["resolve", str(config)], site, plugins="cli_test"))
    assert reason.startswith("conversion-core resolve: ")
    assert "int3-unheard-of" in reason


def _bad_json(directory: Path) -> str:
    (directory / "bad.json").write_text("{not json")
    return str(directory / "bad.json")


@pytest.mark.parametrize(
    ("make_arg", "expected"),
    [
        (lambda d: str(d / "missing" / "config.json"), "does not exist"),
        (_bad_json, "not valid JSON"),
        (lambda d: str(d), "has no config.json"),
        # neither a file nor a directory: a model name, which cannot be found offline
        (lambda d: "no-such-org-xyz/no-such-model-xyz", "no-such-org-xyz/no-such-model-xyz"),
    ],
    ids=["missing-path", "invalid-json", "directory-without-config", "unknown-model-name"],
)
def test_resolve_unreadable_config_is_exit_1_with_one_line(run_here, tmp_path: Path, make_arg, expected) -> None:
    reason = one_line_error(run_here(["resolve", make_arg(tmp_path)], plugins="cli_test"))
    assert reason.startswith("conversion-core resolve: ") and expected in reason


def test_usage_error_is_exit_2(site: Path) -> None:
    proc = run(["resolve"], site, plugins="")
    assert proc.returncode == 2, (proc.stdout, proc.stderr)
    assert "usage: conversion-core resolve" in proc.stderr


@pytest.mark.parametrize("args", [[], ["plugins", "--no-such-option"], ["no-such-command"]])
def test_more_usage_errors_are_exit_2(run_here, args: list[str]) -> None:
    proc = run_here(args, plugins="")
    assert proc.returncode == 2, (proc.stdout, proc.stderr)
    assert "usage: conversion-core" in proc.stderr


# --- the built-in plugins ------------------------------------------------------------------------

BUILTINS = "bf16,deepgemm_fp8,cutlass_fp8"
needs_builtins = pytest.mark.skipif(
    not set(BUILTINS.split(",")) <= {ep.name for ep in entry_points(group="conversion_core")},
    reason="needs the three built-in plugins installed",
)


@needs_builtins
def test_plugins_json_matches_the_design_table_for_the_builtins(run_here) -> None:
    proc = run_here(["plugins", "--json"], plugins=BUILTINS)
    assert proc.returncode == 0, proc.stderr
    records = {rec["name"]: rec for rec in json.loads(proc.stdout)}
    expected_dists = {
        "bf16": "conversion-core-bf16",
        "deepgemm_fp8": "conversion-core-deepgemm-fp8",
        "cutlass_fp8": "conversion-core-cutlass-fp8",
    }
    targets = {}
    for name, dist in expected_dists.items():
        assert (records[name]["dist"], records[name]["status"], records[name]["error"]) == (dist, "loaded", None)
        targets.update({c["name"]: c["compile_target"] for c in records[name]["conversions"]})
    assert {k: targets[k] for k in ("bf16_cast", "fp32_cast", "fp8_128x128", "cutlass_fp8_e4m3_per_channel")} == {
        "bf16_cast": "hf_raw",
        "fp32_cast": "hf_raw",
        "fp8_128x128": "deep_gemm_fp8",
        "cutlass_fp8_e4m3_per_channel": "cutlass_fp8",
    }
    priorities = {(r["conversion"], r["priority"]) for rec in records.values() for r in rec["rules"]}
    assert {("fp8_128x128", 200), ("cutlass_fp8_e4m3_per_channel", 100), ("bf16_cast", 0)} <= priorities


def _config_dir(tmp_path: Path, quantization_config: dict | None) -> str:
    config: dict = {"model_type": "qwen3_moe"}
    if quantization_config is not None:
        config["quantization_config"] = quantization_config
    (tmp_path / "config.json").write_text(json.dumps(config))
    return str(tmp_path)


@needs_builtins
def test_resolve_builtins_block_config_that_also_says_cutlass_picks_deepgemm(tmp_path: Path) -> None:
    # Both FP8 rules match; DeepGEMM's priority 200 beats cutlass's 100.
    qc = {"quant_method": "fp8", "weight_block_size": [128, 128], "quant_format": "cutlass"}
    proc = run(["resolve", _config_dir(tmp_path, qc), "--json"], plugins=BUILTINS)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout) == {
        "conversion": "fp8_128x128",
        "plugin": "deepgemm_fp8",
        "compile_target": "deep_gemm_fp8",
        "compile_metadata": {"block_size": [128, 128], "scale_layout": "blockwise", "dtype": "e4m3"},
    }


@needs_builtins
@pytest.mark.parametrize(
    ("quantization_config", "conversion", "compile_target"),
    [
        (None, "bf16_cast", "hf_raw"),
        ({"quant_method": "fp8", "activation_scheme": "dynamic"}, "cutlass_fp8_e4m3_per_channel", "cutlass_fp8"),
    ],
    ids=["no-quantization", "dynamic-no-blocks"],
)
def test_resolve_builtin_seed_cases(run_here, tmp_path: Path, quantization_config, conversion, compile_target) -> None:
    proc = run_here(["resolve", _config_dir(tmp_path, quantization_config), "--json"], plugins=BUILTINS)
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)
    assert (result["conversion"], result["compile_target"]) == (conversion, compile_target)


# --- how other modules add subcommands ----------------------------------------------------------


def test_a_module_with_add_parser_becomes_a_subcommand(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "cli_hello_module.py").write_text(textwrap.dedent(SUBCOMMAND))
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(cli, "SUBCOMMAND_MODULES", ("cli_hello_module",))

    assert cli.main(["hello-subcommand", "world"]) == 0
    assert capsys.readouterr().out == "hello world\n"

    # A ConversionCoreError from a subcommand becomes exit 1 with its first line only.
    assert cli.main(["hello-subcommand", "world", "--fail"]) == 1
    assert capsys.readouterr().err == "conversion-core hello-subcommand: hello-subcommand was told to fail\n"

    with pytest.raises(SystemExit) as usage:
        cli.main(["hello-subcommand"])
    assert usage.value.code == 2


def test_bench_reaches_the_benchmark_scripts_parser(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    from conversion_core.apps import cli

    monkeypatch.chdir(Path(__file__).resolve().parent.parent)  # the checkout's root, wheel-installed or not
    with pytest.raises(SystemExit) as info:
        cli.main(["bench", "--", "--help"])
    assert info.value.code == 0
    assert "usage: bench_quant" in capsys.readouterr().out


def test_bench_outside_a_checkout_is_a_one_line_user_error(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    from conversion_core.apps import bench, cli

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(bench, "__file__", str(tmp_path / "pkg" / "bench.py"))
    assert cli.main(["bench", "--model"]) == 1
    assert "benchmarks/bench_model.py not found" in capsys.readouterr().err
