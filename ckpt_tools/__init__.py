"""ckpt-tools: audit, validate, prune and migrate PEFT/LoRA mixture-of-experts checkpoints.

Importing the package never imports torch; only migrate's tensor modules and the loader do. The names
below are imported on first use, so that starting the command line (``ckpt-tools --help``)
pays for none of the library.
"""

__version__ = "0.2.0"

# public name → the module that defines it
_EXPORTS = {
    "scan": "api", "classify": "api", "assemble": "api",
    "plan_prune": "prune.plan", "PrunePlan": "prune.plan",
    "Problem": "problems", "Severity": "problems", "Status": "kinds", "Layout": "kinds",
    "Checkpoint": "records", "CheckpointDir": "records", "FileRecord": "records",
    "Run": "records", "ScanResult": "records", "ReadCache": "read_cache",
}

__all__ = ["scan", "classify", "assemble", "plan_prune", "PrunePlan", "Problem", "Severity",
           "Checkpoint", "CheckpointDir", "FileRecord", "Run", "ScanResult", "Status", "Layout",
           "ReadCache", "load_checkpoint", "__version__"]


def __getattr__(name: str):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    import importlib
    value = getattr(importlib.import_module(f"{__name__}.{module}"), name)
    globals()[name] = value   # once imported, an ordinary attribute
    return value


def __dir__():
    return sorted(set(globals()) | set(_EXPORTS))


def load_checkpoint(path, base_model, **kwargs):
    """Load any recognised checkpoint as a ``peft.PeftModel`` plus router state (imports torch)."""
    from .loader import load_checkpoint as _load
    return _load(path, base_model, **kwargs)
