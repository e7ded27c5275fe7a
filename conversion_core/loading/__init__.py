"""Plugin discovery through entry points, and the registry of what the plugins gave."""

from .plugins import PluginInfo
from .registry import Registry, load_registry

__all__ = ["PluginInfo", "Registry", "load_registry"]
