"""Tiny checkpoints for the attack tests on ``conversion-core convert`` (built with safetensors)."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # plan_expectations
