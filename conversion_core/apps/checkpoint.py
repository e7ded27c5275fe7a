"""``conversion-core convert SRC DST``: a safetensors checkpoint converted for an inference format.

Reads SRC shard by shard (``safe_open``: only one shard's tensors in memory at a time), converts
each through the whole-model plan, and writes DST with the converted shards, the index, the
plan's manifest, the other files (tokenizer, generation config, ...) and a ``config.json`` whose
``quantization_config`` is what vLLM loads for that format and what ``select_default_conversion``
maps back to the same conversion. Everything is written into a temporary directory beside DST and
renamed at the end, so a failure midway (a NaN in one shard) leaves nothing behind; SRC is only
ever read.
"""

from __future__ import annotations

import argparse
import dataclasses
import errno
import fnmatch
import json
import os
import shutil
import stat
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..contract import Conversion, TargetFormat
from ..errors import ConfigError, ConversionCoreError, ConversionInputError
from ..loading.registry import Registry, load_registry
from ..plan import TensorSpec, build_plan, resolve_conversion, target_of
from ..selection.prequantized import refuse_quantized_source
from . import publish
from .device import checked_device
from .pipeline import run_pipeline
from .shard_files import MappedShard, dtype_from_safetensors

#: ``[(shard file name, tensor names)]``
Shards = list[tuple[str, list[str]]]

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
MANIFEST_NAME = "conversion_manifest.json"
CONFIG_NAME = "config.json"
#: Files of SRC not copied to DST: the weights (rewritten) and other frameworks' copies of them.
NOT_COPIED = (
    "*.safetensors",
    "*.safetensors.index.json",
    "pytorch_model*.bin",
    "pytorch_model*.bin.index.json",
    "*.msgpack",
    "*.h5",
    CONFIG_NAME,
    MANIFEST_NAME,
)


@dataclass(frozen=True)
class ConvertResult:
    """What ``convert_checkpoint`` wrote."""

    dst: Path
    conversion: str
    tensors: int
    quantized: int
    kept: int
    shards: int
    bytes_in: int
    bytes_out: int
    seconds: float


# ---- the quantization_config written for each format ----------------------------------------


def checkpoint_targets(
    conversion: Conversion, like: dict[str, Any], plugin: str | None = None
) -> tuple[TargetFormat, TargetFormat]:
    """The target format the plan follows and the one the written checkpoint is read back with.

    Both come from the conversion's plugin (``plugin``: its entry point name, for errors):
    ``like``'s decides which modules the config keeps and what ``quantization_config`` DST
    carries; that written config's own target names the outputs (a plugin may write one config
    family as another, whose outputs are named and shaped its way).
    """
    requested = target_of(conversion, like)
    if requested.quantization_config is None:
        if not like:
            raise ConfigError(
                f"conversion {conversion.name!r} ({conversion.compile_target}) declares no checkpoint config; "
                "pass --like CONFIG with a config whose quantization_config selects it"
            )
        written = json_config(like, "the --like config's quantization_config")
    else:
        written = _call_writer(requested, [], conversion.name, plugin)
    stored = target_of(conversion, written or {})
    plan_target = dataclasses.replace(stored, keep=requested.keep, quantization_config=requested.quantization_config)
    return plan_target, requested


def written_quantization_config(
    target: TargetFormat,
    like: dict[str, Any],
    kept: list[str],
    *,
    conversion: str | None = None,
    plugin: str | None = None,
) -> dict[str, Any] | None:
    """The ``quantization_config`` DST carries: the plugin's writer given the kept modules, or ``like``.

    Always what ``config.json`` will hold once written and read back (plain JSON), or a one-line
    :class:`ConfigError` naming the plugin (``plugin``, ``conversion``) or the --like config.
    """
    if target.quantization_config is None:
        return json_config(like, "the --like config's quantization_config")
    return _call_writer(target, kept, conversion, plugin)


def _call_writer(target: TargetFormat, kept: list[str], conversion: str | None, plugin: str | None) -> Any:
    """The target format's ``quantization_config(kept)``: plugin code, whose failure names the plugin."""
    assert target.quantization_config is not None
    who = f"plugin {plugin or '?'!r}, conversion {conversion or '?'!r}: the target format's quantization_config"
    try:
        qc = target.quantization_config(kept)
    except KeyboardInterrupt:
        raise
    except BaseException as exc:  # noqa: B036  sys.exit() in plugin code is this plugin's failure too
        text = str(exc).strip().splitlines()
        raise ConfigError(f"{who} raised {type(exc).__name__}: {text[0] if text else ''}") from exc
    return json_config(qc, who)


def json_config(qc: Any, who: str) -> dict[str, Any] | None:
    """``qc`` as ``config.json`` will hold it after a write and a read (None stays None).

    Refused in one line naming ``who`` unless it is plain JSON: str keys; str, number, bool,
    null, list or object values; no NaN or Inf (``json.dumps`` writes ``NaN``, which is not
    JSON, and turns an int key into a str: a config that reads back as another one).
    """
    if qc is None:
        return None
    if not isinstance(qc, dict):
        raise ConfigError(f"{who} returned {type(qc).__name__}; expected a dict or None")
    try:
        _check_str_keys(qc)
        text = json.dumps(qc, allow_nan=False)
    except (TypeError, ValueError, RecursionError) as exc:
        raise ConfigError(
            f"{who} is not plain JSON ({str(exc).splitlines()[0] if str(exc) else type(exc).__name__}); expected "
            "str keys and str, number, bool, null, list or object values, no NaN or Inf"
        ) from None
    result: dict[str, Any] = json.loads(text)
    return result


def _check_str_keys(value: Any, depth: int = 0) -> None:
    """Raise TypeError at the first mapping key in ``value`` that is not a str."""
    if depth > 200:
        raise RecursionError("nested more than 200 levels deep")
    if isinstance(value, Mapping):
        for k, v in value.items():
            if not isinstance(k, str):
                raise TypeError(f"key {k!r} is not a str")
            _check_str_keys(v, depth + 1)
    elif isinstance(value, (list, tuple)):
        for v in value:
            _check_str_keys(v, depth + 1)


# ---- reading SRC ------------------------------------------------------------------------------


def source_shards(src: Path) -> Shards:
    """``[(file name, tensor names)]`` in file order, from the index or the single safetensors file.

    A safetensors file at SRC's top level that the index does not name is refused: it would be
    neither converted nor copied (and a loader may prefer a ``model.safetensors`` to the index).
    """
    index = src / INDEX_NAME
    files = sorted(p.name for p in src.glob("*.safetensors"))
    if _present(index):
        data = _read_json(index, unique_keys=True)
        weight_map = data.get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise ConversionInputError(f"{index}: 'weight_map' must be a non-empty object of tensor -> file")
        by_file: dict[str, list[str]] = {}
        for name, file in weight_map.items():
            if not isinstance(file, str) or "/" in file or file.startswith("."):
                raise ConversionInputError(f"{index}: tensor {name!r} maps to {file!r}, not a file name in {src}")
            by_file.setdefault(file, []).append(name)
        unlisted = [f for f in files if f not in by_file]
        if unlisted:
            raise ConversionInputError(
                f"{src / unlisted[0]} is not named in {INDEX_NAME}: it would be neither converted nor copied; "
                f"remove it or add its tensors to the index ({len(unlisted)} such file(s): {unlisted[:5]})"
            )
        return sorted(by_file.items())
    if not files:
        raise ConversionInputError(f"{src} holds no *.safetensors file (and no {INDEX_NAME})")
    if len(files) > 1:
        raise ConversionInputError(f"{src} holds {len(files)} safetensors files but no {INDEX_NAME}: {files[:5]}")
    return [(files[0], [])]  # names come from the file's header


def _present(path: Path) -> bool:
    """True when ``path`` is a file; False when absent; an error when it is something else."""
    if path.is_file():
        return True
    if path.exists() or path.is_symlink():
        raise ConversionInputError(f"{path} is not a file (a directory, a dangling symlink, ...); fix or remove it")
    return False


def read_specs(src: Path, shards: Shards) -> tuple[Shards, dict[str, TensorSpec]]:
    """Every tensor's shape and dtype from the shard headers (no tensor data is read)."""
    from safetensors import safe_open

    specs: dict[str, TensorSpec] = {}
    resolved = []
    for file, indexed in shards:
        path = src / file
        if not path.is_file():
            where = f" named in {INDEX_NAME}" if indexed else ""
            raise ConversionInputError(f"shard {path}{where} does not exist or is not a file")
        try:
            with safe_open(str(path), framework="pt") as f:
                names = list(f.keys())
                for name in names:
                    sl = f.get_slice(name)
                    dtype = dtype_from_safetensors(sl.get_dtype(), f"{path}: tensor {name!r}: ")
                    specs[name] = TensorSpec(tuple(sl.get_shape()), dtype)
        except ConversionCoreError:
            raise
        except Exception as exc:
            raise ConversionInputError(f"cannot read safetensors shard {path}: {exc}") from exc
        _same_header(path, {n: specs[n] for n in names})
        if indexed and set(indexed) != set(names):
            missing = sorted(set(indexed) - set(names))[:5]
            extra = sorted(set(names) - set(indexed))[:5]
            raise ConversionInputError(
                f"shard {path} disagrees with {INDEX_NAME}: indexed but absent {missing}, "
                f"present but not indexed {extra}"
            )
        resolved.append((file, names))
    return resolved, specs


def _same_header(path: Path, specs: dict[str, TensorSpec]) -> None:
    """The pipeline's own reader (:class:`MappedShard`) must read the header as the library did."""
    shard = MappedShard(path)  # refuses what the library lets through: a tensor named twice, ...
    try:
        mine = {n: TensorSpec(st.shape, st.dtype) for n, st in shard.entries.items()}
    finally:
        shard.close()
    if mine != specs:
        differ = sorted(set(mine) ^ set(specs) | {n for n in mine if n in specs and mine[n] != specs[n]})
        raise ConversionInputError(
            f"safetensors shard {path}: its header reads two ways (tensors {differ[:5]}); refusing an ambiguous file"
        )


def _unique(path: Path) -> Any:
    def pairs(items: list[tuple[str, Any]]) -> dict[str, Any]:
        seen: dict[str, Any] = {}
        for key, value in items:
            if key in seen:
                raise ConversionInputError(f"{path} names {key!r} twice; which one is meant is ambiguous")
            seen[key] = value
        return seen

    return pairs


def _read_json(path: Path, unique_keys: bool = False) -> dict[str, Any]:
    try:
        text = path.read_text(encoding="utf-8")
        data = json.loads(text, object_pairs_hook=_unique(path)) if unique_keys else json.loads(text)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ConversionInputError(f"cannot read {path} as JSON: {exc}") from exc
    except RecursionError:
        raise ConversionInputError(f"{path} is nested too deeply to be read as JSON") from None
    if not isinstance(data, dict):
        raise ConversionInputError(f"{path} must hold a JSON object, got {type(data).__name__}")
    return data


# ---- writing DST atomically -----------------------------------------------------------------


def _argument_path(what: str, value: str | os.PathLike[str]) -> Path:
    """SRC or DST as a path: an empty one (an unset shell variable) is never the current directory."""
    text = os.fspath(value)
    if not isinstance(text, str):
        raise ConversionInputError(f"{what} must be a str path, got {type(text).__name__} {text!r}")
    if not text.strip():
        raise ConversionInputError(f"{what} is an empty path {text!r}; name a directory")
    try:
        return Path(text).expanduser()
    except RuntimeError as exc:  # ~user with no such user, ~ with no home directory
        raise ConversionInputError(f"{what} {text!r}: {exc}") from None


def _check_paths(src: Path, dst: Path, force: bool) -> None:
    if not src.is_dir():
        raise ConversionInputError(f"SRC {src} is not a directory")
    s, d = src.resolve(), dst.resolve()
    if s == d or s in d.parents or d in s.parents:
        raise ConversionInputError(f"DST {dst} must not be SRC {src}, inside it, or contain it")
    try:
        publish.tidy(d)  # a dead run's leftovers: restored or removed before DST is judged
    except OSError as exc:
        raise ConversionInputError(publish.os_error_line(exc, dst)) from exc
    publish.check_destination(d, force)


#: Weight files of any framework: read from SRC's top level only, so refused in a subdirectory.
WEIGHT_PATTERNS = NOT_COPIED[:6]


def other_files(src: Path) -> list[Path]:
    """The files copied from SRC to DST (paths relative to SRC), checked before any work.

    Symlinks are followed (a Hugging Face cache snapshot is made of them), so a link that
    leads back to a directory it is inside is a loop, refused; so are a dangling link, a named
    pipe, socket or device (nothing to copy), and weights in a subdirectory, which ``convert``
    would neither convert nor may copy unconverted.
    """
    found: list[Path] = []

    def walk(directory: Path, ancestors: dict[tuple[int, int], Path]) -> None:
        for entry in sorted(directory.iterdir()):
            rel = entry.relative_to(src)
            top = directory == src
            if top and (entry.name.startswith(".") or any(fnmatch.fnmatch(entry.name, p) for p in NOT_COPIED)):
                continue
            try:
                st = entry.stat()
            except OSError as exc:
                if entry.is_symlink():
                    what = "a symlink loop" if exc.errno == errno.ELOOP else "a dangling symlink"
                    raise ConversionInputError(
                        f"SRC file {entry} is {what} (-> {os.readlink(entry)}); fix or remove it"
                    ) from None
                raise ConversionInputError(f"cannot read SRC file {entry}: {exc.strerror or exc}") from None
            if stat.S_ISDIR(st.st_mode):
                key = (st.st_dev, st.st_ino)
                if key in ancestors:
                    raise ConversionInputError(
                        f"SRC {entry} is a symlink loop: it leads back to {ancestors[key]}, a directory it is in"
                    )
                found.append(rel)  # an empty directory is copied too
                walk(entry, {**ancestors, key: entry})
            elif not stat.S_ISREG(st.st_mode):
                raise ConversionInputError(
                    f"SRC file {entry} is not a regular file or directory (a named pipe, socket or device); remove it"
                )
            elif not top and any(fnmatch.fnmatch(entry.name, p) for p in WEIGHT_PATTERNS):
                raise ConversionInputError(
                    f"SRC {entry}: weights in a subdirectory are neither converted nor copied (convert reads "
                    f"the weights at the top of {src}); move or remove them"
                )
            else:
                found.append(rel)

    root = src.stat()
    walk(src, {(root.st_dev, root.st_ino): src})
    return found


def _copy_others(src: Path, tmp: Path, files: list[Path]) -> None:
    for rel in files:  # a directory comes before what is in it
        if (src / rel).is_dir():
            (tmp / rel).mkdir()
        else:
            shutil.copy2(src / rel, tmp / rel)


def convert_checkpoint(
    src: str | os.PathLike[str],
    dst: str | os.PathLike[str],
    *,
    conversion: str | None = None,
    like: Any = None,
    force: bool = False,
    device: str | torch.device = "cpu",
    progress: bool = True,
    registry: Registry | None = None,
    fused_shards: Mapping[str, Any] | None = None,
) -> ConvertResult:
    """Convert the safetensors checkpoint in ``src`` into ``dst`` (see the module docstring)."""
    from tqdm.auto import tqdm

    from ..selection.resolver import select_default_conversion

    start = time.perf_counter()
    src_path, dst_path = _argument_path("SRC", src), _argument_path("DST", dst)
    if (conversion is None) == (like is None):
        raise ConversionInputError("convert needs exactly one of --conversion NAME or --like CONFIG")
    device = checked_device(device)
    _check_paths(src_path, dst_path, force)
    registry = registry or load_registry()

    src_config = _read_json(src_path / CONFIG_NAME) if _present(src_path / CONFIG_NAME) else {}
    chosen, like_qc = resolve_conversion(like, conversion, registry)
    others = other_files(src_path)  # before the weights: weights only in a subdirectory are named
    shards, specs = read_specs(src_path, source_shards(src_path))
    if not specs:
        raise ConversionInputError(f"{src_path} holds no tensors")
    files = {name: str(src_path / file) for file, names in shards for name in names}
    refuse_quantized_source(src_path, src_config, ((n, s.dtype) for n, s in specs.items()), files)

    plugin = registry.provider(chosen.name)
    plan_target, requested = checkpoint_targets(chosen, like_qc, plugin)
    plan = build_plan(
        specs, like_qc, conversion=chosen.name, registry=registry, fused_shards=fused_shards, target=plan_target
    )
    out_qc = written_quantization_config(requested, like_qc, plan.kept_modules(), conversion=chosen.name, plugin=plugin)
    out_config = dict(src_config)
    out_config.pop("quantization_config", None)
    if out_qc is not None:
        out_config["quantization_config"] = out_qc
    back = select_default_conversion(out_config or {}, registry)
    if back != chosen.name:
        raise ConfigError(
            f"the config written for {chosen.name!r} would select {back!r} when read back; refusing to write "
            f"a checkpoint that loads as another format (quantization_config: {json.dumps(out_qc)})"
        )

    pub = publish.Publication(dst_path.resolve(), force)
    try:
        tmp = pub.open()  # claims DST (lock), recovers a dead run's leftovers, re-checks DST
        total = sum(_nbytes(s.shape, s.dtype) for s in specs.values())
        with tqdm(total=total, unit="B", unit_scale=True, desc="convert", disable=not progress, file=sys.stderr) as bar:
            done = run_pipeline(
                plan,
                src_path,
                tmp,
                shards,
                device=device,
                on_tensor=bar.update,
                on_shard_written=lambda file: publish.step("shard-written"),
                shared_amax=shared_amaxes(plan, shards, src_path, device),
            )
        weight_map: dict[str, str] = done["weight_map"]
        bytes_in, bytes_out = done["bytes_in"], done["bytes_out"]
        if _present(src_path / INDEX_NAME):
            index = {"metadata": {"total_size": bytes_out}, "weight_map": dict(sorted(weight_map.items()))}
            (tmp / INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n", encoding="utf-8")
        (tmp / CONFIG_NAME).write_text(json.dumps(out_config, indent=2) + "\n", encoding="utf-8")
        publish.step("config-written")
        plan.write_manifest(tmp / MANIFEST_NAME)
        _copy_others(src_path, tmp, others)
        publish.step("others-copied")
        pub.publish()
    except OSError as exc:
        raise ConversionInputError(publish.os_error_line(exc, dst_path)) from exc
    finally:
        pub.close()  # removes the temporary (or replaced) directory and releases DST
    return ConvertResult(
        dst=dst_path,
        conversion=chosen.name,
        tensors=len(plan),
        quantized=len(plan.quantized),
        kept=len(plan.kept),
        shards=len(shards),
        bytes_in=bytes_in,
        bytes_out=bytes_out,
        seconds=time.perf_counter() - start,
    )


def shared_amaxes(plan: Any, shards: Shards, src: Path, device: str | torch.device) -> dict[str, torch.Tensor]:
    """``max |x|`` of every member of a shared-statistic set (read once, up front).

    A fused set (q/k/v sharing one global scale) is converted one tensor at a time by the
    pipeline, possibly from several shard files, so every member's statistic is taken first, one
    tensor at a time (a second read of those tensors only; formats without sets read nothing).
    """
    from safetensors import safe_open

    from ..plan.shared import source_amax

    file_of = {name: file for file, names in shards for name in names}
    needed: dict[str, list[str]] = {}
    for e in plan.entries:
        if e.shared_with:
            for m in e.shared_with:
                needed.setdefault(file_of[m], []).append(m)
    result: dict[str, torch.Tensor] = {}
    for file, members in needed.items():
        with safe_open(str(src / file), framework="pt", device=str(device)) as f:
            for m in dict.fromkeys(members):
                result[m] = source_amax(f.get_tensor(m))
    return result


def _nbytes(shape: tuple[int, ...], dtype: torch.dtype) -> int:
    n = 1
    for s in shape:
        n *= s
    return n * dtype.itemsize


# ---- command line ---------------------------------------------------------------------------


def _cmd_convert(args: argparse.Namespace) -> int:
    result = convert_checkpoint(
        args.src,
        args.dst,
        conversion=args.conversion,
        like=args.like,
        force=args.force,
        device=args.device,
        progress=not args.no_progress,
    )
    print(
        f"wrote {result.dst}: {result.conversion}, {result.quantized} tensors quantized, {result.kept} kept, "
        f"{result.shards} shard(s), {result.bytes_in / 1e6:.1f} MB in -> {result.bytes_out / 1e6:.1f} MB out "
        f"in {result.seconds:.1f} s"
    )
    return 0


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Register ``convert`` on the CLI's subparsers."""
    p: argparse.ArgumentParser = subparsers.add_parser(
        "convert", help="convert a safetensors checkpoint directory into an inference format"
    )
    p.add_argument("src", help="source checkpoint directory (safetensors, sharded or not); never modified")
    p.add_argument("dst", help="output directory (written atomically; must not exist or be empty)")
    which = p.add_mutually_exclusive_group(required=True)
    which.add_argument("--conversion", help="a registered conversion name, e.g. bf16_cast")
    which.add_argument("--like", metavar="CONFIG", help="an inference config whose quantization_config selects it")
    p.add_argument("--force", action="store_true", help="replace a non-empty DST")
    p.add_argument("--device", default="cpu", help="where tensors are converted (default: cpu)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=_cmd_convert)
    return p


def plan_of(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The manifest of a converted checkpoint (what :meth:`Plan.manifest` wrote)."""
    return _read_json(Path(path) / MANIFEST_NAME)


__all__ = [
    "ConvertResult",
    "add_parser",
    "checkpoint_targets",
    "convert_checkpoint",
    "dtype_from_safetensors",
    "plan_of",
    "written_quantization_config",
]
