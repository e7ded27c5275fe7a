"""Transitional: the contract now lives in :mod:`conversion_core.contract`."""

from .contract import Conversion, Rule

__all__ = ["Conversion", "Rule"]
