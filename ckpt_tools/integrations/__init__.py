"""Integrations with training frameworks.

Each submodule imports its framework (and torch); importing this package imports neither.

- ``ckpt_tools.integrations.transformers``: ``PeftOnlyCheckpointCallback``, a ``Trainer``
  callback that writes the canonical PEFT-only layout into every checkpoint and
  removes the merged weights the Trainer wrote once that tree validates, and
  ``PeftOnlyResumeMixin`` / ``PeftOnlyTrainer``, which resume from such checkpoints.
"""
