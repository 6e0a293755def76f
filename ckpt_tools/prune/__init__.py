"""Prune: plan the deletion of redundant merged weights (``plan``, proven by content in
``proof``), then carry it out (``execute``: lock, re-validate, re-check, unlink), logging each
action (``log``) and returning what was done (``result``).

The names below are imported on first use: the scan imports ``plan`` alone, and an audit
never loads the proof or the execution.
"""

_EXPORTS = {
    "plan_prune": "plan", "PrunePlan": "plan", "PlannedDeletion": "plan", "Skip": "plan",
    "skip_reason": "plan",
    "ContentProof": "proof",
    "execute_prune": "execute", "emit_plan": "execute", "Revalidator": "execute",
    "ActionLog": "log", "LogOpenError": "log", "LogWriteError": "log", "log_line": "log",
    "PruneResult": "result", "PruneEvent": "result", "Deleted": "result", "Failure": "result",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    import importlib
    value = getattr(importlib.import_module(f"{__name__}.{module}"), name)
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(_EXPORTS))
