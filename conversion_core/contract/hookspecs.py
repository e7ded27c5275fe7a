"""The hooks a conversion-core plugin implements.

A plugin is a module (or object) exposed under the ``conversion_core`` entry point group
whose functions are decorated with :data:`conversion_core.hookimpl`. Each hook is called
once per plugin when the registry is loaded (:func:`conversion_core.load_registry`), in
isolation: a hook that raises or returns the wrong type disables only its own plugin.

What else is a load failure of the plugin (skipped whole, reported naming it): a
``@hookimpl`` whose function name is no hook below (e.g. ``register_conversions``); any
``BaseException`` at import or in a hook, ``SystemExit`` and ``GeneratorExit`` included; a
call back into ``load_registry()`` while it is loading (which would otherwise deadlock).
``KeyboardInterrupt`` still stops the program, with a note naming the plugin. Two
distributions claiming one entry point name is an error raised by ``load_registry()``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import pluggy

if TYPE_CHECKING:
    from .conversion import Conversion
    from .rule import Rule

PROJECT_NAME = "conversion_core"

hookspec = pluggy.HookspecMarker(PROJECT_NAME)
hookimpl = pluggy.HookimplMarker(PROJECT_NAME)


@hookspec
def register_conversion() -> Conversion | Sequence[Conversion]:
    """Return the conversions this plugin provides.

    Called once per process when the registry is (re)loaded. Conversion names are global:
    two plugins registering one name is an error at load time that names both.

    :return: one :class:`~conversion_core.Conversion` or a sequence of them.

    Example::

        @conversion_core.hookimpl
        def register_conversion():
            return Conversion(name="my_format", fn=my_fn, requires_scale=True,
                              dst_dtype=torch.int8, scale_shape=my_scale_shape,
                              scale_name="weight_s", compile_target="my_kernel")
    """


@hookspec
def default_rule() -> Rule | Sequence[Rule]:
    """Return the rules that map a model's ``quantization_config`` to a conversion.

    Called once per process when the registry is (re)loaded. The resolver walks every
    plugin's rules by ``priority`` (highest first; ties by plugin name, then the plugin's
    own order); the first whose predicate returns True names the conversion. Predicates
    receive the ``quantization_config`` as a plain dict (``{}`` for an unquantized model);
    a predicate that raises (any ``BaseException`` but ``KeyboardInterrupt``, ``sys.exit()``
    included) counts as ``"raised"``, never a match and never an exit. Predicates are not
    preempted: one that never returns hangs resolution until Ctrl-C, whose
    ``KeyboardInterrupt`` names the rule and plugin. A rule naming a conversion that no loaded
    plugin registers is reported at load time and never selected.

    :return: one :class:`~conversion_core.Rule` or a sequence of them.

    Example::

        @conversion_core.hookimpl
        def default_rule():
            return Rule(conversion="my_format", priority=150, name="my-format-config",
                        predicate=lambda qc: qc.get("quant_method") == "my_format")
    """
