"""Problems found in data: values, not exceptions."""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum


class Severity(StrEnum):
    """How bad a problem is: an error makes its checkpoint broken, a warning does not."""

    ERROR = "error"
    WARNING = "warning"


ERROR = Severity.ERROR
WARNING = Severity.WARNING

MISSING_FILE = "missing-file"
MISSING_TENSOR = "missing-tensor"
TRUNCATED = "truncated"
BAD_HEADER = "bad-header"
BAD_JSON = "bad-json"
BAD_ARCHIVE = "bad-archive"
UNSAFE_PICKLE = "unsafe-pickle"
SHAPE_MISMATCH = "shape-mismatch"
RANK_MISMATCH = "rank-mismatch"
EXPERT_MISSING = "expert-missing"
EXPERT_COUNT_MISMATCH = "expert-count-mismatch"
TARGET_MISMATCH = "target-mismatch"
DTYPE_UNKNOWN = "dtype-unknown"
NAN_OR_INF = "nan-or-inf"
PERMISSION_DENIED = "permission-denied"
SYMLINK_ESCAPE = "symlink-escape"
BAD_CONFIG = "bad-config"
COUNT_UNCONFIRMED = "count-unconfirmed"
UNREADABLE = "unreadable"
BAD_NAME = "bad-name"
MERGED_EXPORT = "merged-export"        # warning: merged weights with no LoRA tensors beside a PEFT tree
MERGED_MISMATCH = "merged-mismatch"    # deep only: merged weights and PEFT tree hold different tensors
IN_PROGRESS = "in-progress"            # warning: why a checkpoint is judged in progress
INDEX_MISMATCH = "index-mismatch"      # a shard index disagrees with its shards' headers
STRIP_INTERRUPTED = "strip-interrupted"  # warning: a strip of the training state did not finish

ALL_CODES = (
    MISSING_FILE, MISSING_TENSOR, TRUNCATED, BAD_HEADER, BAD_JSON, BAD_ARCHIVE, UNSAFE_PICKLE,
    SHAPE_MISMATCH, RANK_MISMATCH, EXPERT_MISSING, EXPERT_COUNT_MISMATCH,
    TARGET_MISMATCH, DTYPE_UNKNOWN, NAN_OR_INF, PERMISSION_DENIED, SYMLINK_ESCAPE,
    BAD_CONFIG, COUNT_UNCONFIRMED, UNREADABLE, BAD_NAME,
    MERGED_EXPORT, MERGED_MISMATCH, IN_PROGRESS, INDEX_MISMATCH, STRIP_INTERRUPTED,
)


@dataclass(frozen=True)
class Problem:
    """One thing wrong with a checkpoint. ``path`` is relative to the scan root."""

    code: str
    path: str
    message: str
    severity: Severity = Severity.ERROR

    def __post_init__(self):
        # A severity given as its string becomes the member; any other string is a bug.
        if type(self.severity) is not Severity:
            object.__setattr__(self, "severity", Severity(self.severity))

    @property
    def is_error(self) -> bool:
        return self.severity is Severity.ERROR

    def to_dict(self) -> dict:
        """The JSON shape the README documents: ``{code, path, message, severity}``."""
        return {"code": self.code, "path": self.path, "message": self.message,
                "severity": self.severity}

    @classmethod
    def from_dict(cls, doc: dict) -> Problem:
        """The inverse of ``to_dict`` (a plan read back from JSON)."""
        return cls(doc["code"], doc["path"], doc["message"], doc.get("severity", Severity.ERROR))

    def line(self, path: str | None = None) -> str:
        """The one line a person reads: ``severity: path: code: message``."""
        return f"{self.severity}: {self.path if path is None else path}: {self.code}: {self.message}"


class FormatError(Exception):
    """A file that lies about its own format. Carries the problem code it maps to."""

    def __init__(self, code: str, message: str):
        super().__init__(message)
        self.code = code
        self.message = message
