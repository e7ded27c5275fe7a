"""The demos' model and shipped configs: a small Qwen3-MoE-style model built from a config in the package."""

from __future__ import annotations

import json
from importlib import resources
from pathlib import Path
from typing import Any

import torch

from ..errors import ConfigError

MODEL_CONFIG = "qwen3_moe_tiny.json"
#: Shipped inference configs (quantized with blocks, or per output channel), by the short name
#: ``--format`` takes.
INFERENCE_CONFIGS = {"block": "inference_block.json", "channel": "inference_channel.json"}


def data_path(name: str) -> Path:
    """Path of a file shipped in ``conversion_core/data``."""
    return Path(str(resources.files("conversion_core") / "data" / name))


def load_json(path: str | Path) -> dict[str, Any]:
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise ConfigError(f"cannot read {path} as JSON: {exc}") from exc
    if not isinstance(data, dict):
        raise ConfigError(f"{path} must hold a JSON object")
    return data


def build_model_state(model_config: dict[str, Any], seed: int = 0) -> dict[str, torch.Tensor]:
    """bf16 state dict of a randomly initialised model built from ``model_config`` (no download)."""
    try:
        import transformers
    except ImportError as exc:
        raise ConfigError(
            "the demo builds its model with transformers, which is not installed: pip install 'conversion-core[hf]'"
        ) from exc
    kwargs = dict(model_config)
    model_type = kwargs.pop("model_type", None)
    kwargs.pop("architectures", None)
    if not isinstance(model_type, str):
        raise ConfigError("the demo's model config needs a 'model_type' string")
    config = transformers.AutoConfig.for_model(model_type, **kwargs)
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config)
    model.to(torch.bfloat16)
    return {name: t.detach() for name, t in model.state_dict().items()}
