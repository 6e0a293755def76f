"""Decide what a checkpoint is: its layout, its problems and its status.

``examine`` holds the entry point (``validate_checkpoint``) and the checks of the checkpoint
as a whole; ``experts`` the checks of the PEFT tree; ``context`` the state of one validation
and its readers; ``verdict`` what a validation concludes. Whole examinations are replayed
through the scan's ``ReadCache`` by ``ckpt_tools.replay``.
"""

from .context import _MAX_JSON_BYTES  # noqa: F401 - migrate.plan imports it from here
from .examine import validate_checkpoint
from .verdict import DEEP, FULL, HEADERS, ExpertInfo, Tensor, Verdict, VerdictFacts

__all__ = ["validate_checkpoint", "Verdict", "VerdictFacts", "Tensor", "ExpertInfo",
           "HEADERS", "FULL", "DEEP"]
