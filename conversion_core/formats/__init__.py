"""Shared format knowledge for plugins: numerics and config readers that several plugins use.

Only plugins (and their tests) import this package. The core's dispatch — conversions, rules,
loading, selection, the plan, checkpoints — never does, and names no format: a test holds this.
A plugin that owns a format alone keeps its numerics in its own package instead.
"""
