"""The recipes, one per method: ``accelerate launch recipes/<method>.py`` or ``llmreg run <method>``.

Installed as ``llmreg.recipes``, with ``configs/`` (YAML) and ``sweeps/`` (``llmreg ablate``), so the CLI finds them
in any install.
"""
