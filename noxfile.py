"""Test sessions: the core alone, each plugin alone, everything together, lint, types.

``nox`` runs the default sessions (what CI runs); ``nox -s core`` one of them; ``nox -l`` lists
them; ``nox -R`` reuses the virtualenvs of an earlier run. Arguments after ``--`` go to pytest.

Every session installs ``torch==2.13.0`` (the CPU wheel) before anything that depends on torch:
a bare ``torch`` requirement would pull a multi-GB CUDA build. Each session checks that what it
is about to test exists, so a missing test directory fails loudly instead of passing with no
test run (pytest's own "no tests ran", exit code 5, fails the session too).
"""

from __future__ import annotations

import os
from pathlib import Path

import nox
from nox.command import CommandFailed

ROOT = Path(__file__).parent
TORCH = "torch==2.13.0"
#: numpy: safetensors.torch.save_file and torch.distributed.tensor import it (tests only).
TEST_TOOLS = ("pytest>=8", "hypothesis>=6.100", "numpy")
#: Pinned: a new release of a formatter or type checker must not turn CI red on unchanged code.
RUFF = "ruff==0.17.6"
MYPY = "mypy==2.4.1"
EXAMPLE_PLUGIN = "examples/third_party_plugin"
TOY_PLUGIN = "examples/toy_two_scales"
#: Every directory under plugins/ with a pyproject.toml is a plugin distribution.
PLUGINS = sorted(p.parent.name for p in (ROOT / "plugins").glob("*/pyproject.toml"))

#: The independent judges of our bytes, test-only: llm-compressor's ``model_free_ptq`` (the reference
#: producer of compressed-tensors checkpoints; pins compressed-tensors and transformers itself).
JUDGES = ("llmcompressor==0.14.0.1",)
#: Tests that need the judges live in ``tests/judges/`` of the repo or of a plugin; only the judges
#: session runs them.
JUDGE_DIRS = sorted(
    str(p.relative_to(ROOT)) for p in [ROOT / "tests" / "judges", *ROOT.glob("plugins/*/tests/judges")] if p.is_dir()
)
NO_JUDGES = ("--ignore-glob=*/judges/*",)

nox.options.sessions = ["lint", "types", "core", *(f"plugin-{name}" for name in PLUGINS), "all", "judges", "demo"]
nox.options.error_on_external_run = True


def _install(session: nox.Session, *args: str) -> None:
    # --no-compile: byte-compiling torch's thousands of files triples its install time; Python
    # compiles what the tests actually import on the fly.
    session.install("--no-compile", *args)


def _install_torch(session: nox.Session) -> None:
    """First, always: the CPU wheel, so no later requirement can pull a CUDA build."""
    _install(session, TORCH)


def _require_dir(session: nox.Session, path: str) -> str:
    if not (ROOT / path).is_dir():
        session.error(f"{path}/ does not exist: this session would run no test")
    return path


def _check_env(session: nox.Session, plugins: list[str], absent: tuple[str, ...] = ()) -> None:
    """Prove the environment holds exactly the plugins this session means to test."""
    session.run("python", ".ci/check_env.py", "--plugins", *plugins, "--absent", *absent)


#: Where each pytest run writes its JUnit XML report, ``<session>-<n>.xml``; .ci/run sets it and
#: counts the tests from those files.
JUNIT_DIR_ENV = "CONVERSION_CORE_JUNIT_DIR"
_runs: dict[str, int] = {}


def _junit_xml(session: nox.Session) -> str:
    directory = Path(os.environ.get(JUNIT_DIR_ENV) or ROOT / ".nox" / "junit")
    directory.mkdir(parents=True, exist_ok=True)
    _runs[session.name] = _runs.get(session.name, 0) + 1
    return str(directory / f"{session.name}-{_runs[session.name]}.xml")


def _pytest(session: nox.Session, path: str, *args: str, env: dict[str, str] | None = None) -> None:
    tests = _require_dir(session, path)
    session.run("pytest", "-ra", f"--junitxml={_junit_xml(session)}", tests, *args, *session.posargs, env=env or {})


@nox.session
def lint(session: nox.Session) -> None:
    """ruff: lint rules and formatting (config in pyproject.toml)."""
    session.install(RUFF)
    session.run("ruff", "check", ".")
    session.run("ruff", "format", "--check", ".")


@nox.session
def types(session: nox.Session) -> None:
    """mypy on conversion_core/ and every plugin's package (config in pyproject.toml)."""
    _install_torch(session)
    # The plugins' packages are in mypy's `files` too: install them so their imports resolve.
    plugins = [arg for name in PLUGINS for arg in ("-e", f"plugins/{name}")]
    example = ["-e", EXAMPLE_PLUGIN] if (ROOT / EXAMPLE_PLUGIN / "pyproject.toml").is_file() else []
    _install(session, "-e", ".[hf,triton]", *plugins, *example, MYPY)
    session.run("mypy")


@nox.session
def core(session: nox.Session) -> None:
    """The core alone: no plugin, no transformers, no triton installed."""
    tests = _require_dir(session, "tests/core")
    _install_torch(session)
    _install(session, "-e", ".", *TEST_TOOLS)
    _check_env(session, plugins=[], absent=("transformers", "triton"))
    _pytest(session, tests)


def _entry_points(plugin: str) -> list[str]:
    """The entry point names a plugin distribution declares (one distribution may register several)."""
    import tomllib

    project = tomllib.loads((ROOT / "plugins" / plugin / "pyproject.toml").read_text())["project"]
    return sorted(project["entry-points"]["conversion_core"])


def _plugin_session(name: str) -> None:
    def session_fn(session: nox.Session) -> None:
        tests = _require_dir(session, f"plugins/{name}/tests")
        _install_torch(session)
        _install(session, "-e", ".", "-e", f"plugins/{name}", *TEST_TOOLS)
        _check_env(session, plugins=_entry_points(name), absent=("transformers",))
        _pytest(session, tests, *NO_JUDGES)

    session_fn.__doc__ = f"The {name} plugin alone with the core."
    nox.session(name=f"plugin-{name}")(session_fn)


for _name in PLUGINS:
    _plugin_session(_name)


@nox.session(name="all")
def all_(session: nox.Session) -> None:
    """Everything together, installed from built wheels, with transformers and triton (interpreted on CPU)."""
    # TRITON_INTERPRET=1 runs the Triton kernels on CPU tensors. The GPU tests run without it (one
    # process cannot mix the two) and skip themselves where there is no CUDA device. One pytest
    # run per directory: test modules of different distributions may share a file name.
    interpret = {"TRITON_INTERPRET": "1"}
    runs: list[tuple[str, tuple[str, ...], dict[str, str]]] = [
        ("tests", ("--ignore=tests/gpu", *NO_JUDGES), interpret),  # tests/core and tests/reliability included
        *((f"plugins/{name}/tests", NO_JUDGES, interpret) for name in PLUGINS),
        (f"{EXAMPLE_PLUGIN}/tests", (), interpret),
        (f"{TOY_PLUGIN}/tests", (), interpret),
        ("tests/gpu", (), {}),
    ]
    missing = [path for path, _, _ in runs if not (ROOT / path).is_dir()]
    if "tests" in missing:
        session.error("tests/ does not exist: this session would run no test")
    example = [f"./{p}" for p in (EXAMPLE_PLUGIN, TOY_PLUGIN) if (ROOT / p / "pyproject.toml").is_file()]
    _install_torch(session)
    # Not editable: prove the built wheels (package data, entry points) as users install them.
    _install(session, ".[hf,triton]", *(f"./plugins/{name}" for name in PLUGINS), *example, *TEST_TOOLS)
    failed = []
    for path, args, env in runs:  # run them all: one failing directory must not hide another's result
        if path in missing:
            continue
        try:
            _pytest(session, path, *args, env=env)
        except CommandFailed:
            failed.append(path)
    problems = [f"{path}/ does not exist" for path in missing] + [f"pytest failed in {path}" for path in failed]
    if problems:
        session.error("; ".join(problems))


@nox.session
def judges(session: nox.Session) -> None:
    """Our bytes against llm-compressor's ``model_free_ptq`` and transformers' CPU loader (CPU only)."""
    if not JUDGE_DIRS:
        session.error("no tests/judges/ directory exists: this session would run no test")
    _install_torch(session)
    _install(session, ".[hf,triton]", *(f"./plugins/{name}" for name in PLUGINS), *JUDGES, *TEST_TOOLS)
    failed = []
    for path in JUDGE_DIRS:  # one run per directory, all of them: a failure must not hide another's result
        try:
            _pytest(session, path)
        except CommandFailed:
            failed.append(path)
    if failed:
        session.error("pytest failed in " + ", ".join(failed))


@nox.session
def demo(session: nox.Session) -> None:
    """The README's main job: `conversion-core demo` on the model config shipped in the package, then `demo --sync`."""
    _install_torch(session)
    _install(session, ".[hf]", *(f"./plugins/{name}" for name in PLUGINS))
    session.run("conversion-core", "demo", *session.posargs)
    if not session.posargs:  # the whole sync loop: 2 trainer ranks (gloo) and a receiver process
        session.run("conversion-core", "demo", "--sync")


@nox.session
def bench(session: nox.Session) -> None:
    """Not run by default: `conversion-core bench` (arguments after `--` go to it)."""
    _install_torch(session)
    _install(session, ".[triton]", *(f"./plugins/{name}" for name in PLUGINS))
    session.run("conversion-core", "bench", *session.posargs)


@nox.session
def exhaustive(session: nox.Session) -> None:
    """Not run by default: minifloat rounding against torch's e4m3 cast on all 2**32 float32 patterns."""
    _install_torch(session)
    _install(session, "-e", ".", *TEST_TOOLS)
    test = "tests/test_minifloat.py::test_every_float32_pattern_e4m3"
    session.run("pytest", "-ra", test, *session.posargs, env={"CONVERSION_CORE_EXHAUSTIVE": "1"})
