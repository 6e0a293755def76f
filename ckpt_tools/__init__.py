"""ckpt-tools: audit, validate, prune and migrate PEFT/LoRA mixture-of-experts checkpoints.

Importing the package never imports torch; only the converter and the loader do.
"""

from .api import assemble, classify, scan
from .problems import Problem
from .pruner import PrunePlan, plan_prune
from .read_cache import ReadCache
from .records import Checkpoint, CheckpointDir, FileRecord, Run, ScanResult

__version__ = "0.1.0"

__all__ = ["scan", "classify", "assemble", "plan_prune", "PrunePlan", "Problem", "Checkpoint",
           "CheckpointDir", "FileRecord", "Run", "ScanResult", "ReadCache", "load_checkpoint",
           "__version__"]


def load_checkpoint(path, base_model, **kwargs):
    """Load any recognised checkpoint as a ``peft.PeftModel`` plus router state (imports torch)."""
    from .loader import load_checkpoint as _load
    return _load(path, base_model, **kwargs)
