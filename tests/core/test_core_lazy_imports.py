"""``import conversion_core`` and loading the registry must not import transformers (seconds of start-up)."""

from __future__ import annotations

import subprocess
import sys
import textwrap


def test_import_and_load_registry_do_not_import_transformers() -> None:
    script = textwrap.dedent(
        """
        import sys
        import conversion_core as cc
        assert "transformers" not in sys.modules, "import conversion_core imported transformers"
        registry = cc.load_registry()
        assert "transformers" not in sys.modules, "load_registry() imported transformers"
        cc.explain({"model_type": "llama"}, registry)  # a dict config needs no transformers either
        cc.accepts({"compile_target": "hf_raw", "compile_metadata": {}}, ["hf_raw"])
        print("transformers" in sys.modules, len(registry.plugins()))
        """
    )
    # the environment is inherited: run with or without the built-in plugins installed
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split()[0] == "False"
