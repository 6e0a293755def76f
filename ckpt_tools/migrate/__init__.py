"""Migrate checkpoints to the canonical layout: plan (``plan``), then execute (``execute``).

The modules, in the order data flows through them:

- ``plan``: options, ``plan_migrate`` and the ``MigratePlan`` it returns; the target's state.
- ``extract``: the source view and the in-memory ``Conversion`` (shared with the loader),
  with ``hyper`` (LoRA hyperparameters) and, for a truly merged model, ``lowrank``
  (``decompose``, ``tensor_source``).
- ``write``: one target through the commit protocol, and its read-back check.
- ``execute``: ``execute_migrate``, DST's lock, one checkpoint after another or in threads.
- ``verify`` and ``peft_model``: ``--verify``'s logits check with PEFT.
- ``errors`` and ``result``: what stops a run or a checkpoint, and what a run did.

Importing this package does not import torch: only the modules that compute tensors
(``lowrank``, ``decompose``, ``tensor_source``, ``peft_model``, ``verify``) do, and the
execution path imports them when it needs them. Nothing here imports ``ckpt_tools.loader``.
"""

from .errors import CheckpointFailure, MigrateError, storage_error
from .execute import execute_migrate, lock_dir_for
from .plan import (ACTION_DONE, ACTION_MIGRATE, ACTION_SKIP, DEFAULT_MAX_ERROR, DEFAULT_VERIFY_TOL,
                   METHOD_COPY, METHOD_EXACT, METHOD_SVD, MigrateItem, MigrateOptions, MigratePlan,
                   check_roots, plan_migrate)
from .result import MigrateEvent, MigrateOutcome, MigrateResult
from .write import clean_stale

__all__ = ["execute_migrate", "plan_migrate", "check_roots", "lock_dir_for", "clean_stale",
           "MigrateOptions", "MigrateItem", "MigratePlan", "MigrateOutcome", "MigrateResult",
           "MigrateEvent", "MigrateError", "CheckpointFailure", "storage_error",
           "METHOD_COPY", "METHOD_EXACT", "METHOD_SVD", "ACTION_MIGRATE", "ACTION_SKIP",
           "ACTION_DONE", "DEFAULT_MAX_ERROR", "DEFAULT_VERIFY_TOL"]
