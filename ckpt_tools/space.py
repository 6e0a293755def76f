"""Where the space is: the bytes of a scan by role and by owner, per run and in total.

Each file of each checkpoint has exactly one role (``SpaceRole``); a run's trash is its own
role. Bytes are allocated bytes, and a file hard-linked more than once counts once, in the
role and for the owner of its first link: checkpoints in scan order, files by relpath, every
checkpoint before any trash. So, in total, the roles other than ``trash`` add up to
``ScanResult.size_bytes`` exactly (``api._total_size``'s rule), and the owners to all roles.
A run counts the links within itself once; a file linked into two runs counts in each run
and once in the total.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from . import layout
from .kinds import ModelKind, SpaceRole, Status
from .layout import Role
from .records import Checkpoint, FileRecord, ScanResult

# The PEFT tree and MoE state of DyLoRA-MoE, and an ordinary checkpoint's PEFT adapters.
_ADAPTER_ROLES = layout.PEFT_TREE_ROLES | {Role.PEFT_CONFIG, Role.PEFT_WEIGHTS, Role.PEFT_README}
_WEIGHT_ROLES = frozenset({Role.MERGED, Role.MERGED_INDEX, Role.ENGINE_WEIGHTS})

_ROLES = tuple(SpaceRole)   # iterating an enum runs Python code: once here, not once per run
UNKNOWN_OWNER = "unknown"   # a file record without a uid (not made by the scanner)


def file_role(c: Checkpoint, relpath: str) -> SpaceRole:
    """The role of the file at ``relpath`` in the checkpoint ``c``."""
    if c.is_training_state(relpath):     # strip's rule: what stripping ``c`` would free
        return SpaceRole.TRAINING_STATE
    if c.status is Status.REDUNDANT and relpath in c.merged_files:   # what prune frees
        return SpaceRole.REDUNDANT_MERGED
    top = relpath.split("/", 1)[0]
    if top in layout.CHECKPOINT_SUBDIRS:   # peft_adapters/, dylo_moe_state/: all of it
        return SpaceRole.ADAPTERS
    role = layout.role_of(relpath).role
    if role in _ADAPTER_ROLES:
        return SpaceRole.ADAPTERS
    if role in _WEIGHT_ROLES:
        return SpaceRole.WEIGHTS
    if layout.is_deepspeed_dir(top):   # not training state: the only copy of the model
        return SpaceRole.WEIGHTS
    return SpaceRole.OTHER


@dataclass(frozen=True)
class Space:
    """Bytes by role (every role, 0 where none) and by owner (user name, or the uid as a
    string where the system knows no name), largest owner first."""

    by_role: dict[SpaceRole, int]
    by_owner: dict[str, int]

    def to_dict(self) -> dict:
        return {"bytes_by_role": {str(r): n for r, n in self.by_role.items()},
                "bytes_by_owner": dict(self.by_owner)}


@dataclass(frozen=True)
class ScanSpace:
    """``runs``: one ``Space`` per run of the scan, in its order; ``total``: all of them."""

    runs: tuple[Space, ...]
    total: Space


def user_name(uid: int) -> str:
    """The name the password database gives ``uid``; the uid as a string where it has none."""
    import pwd
    try:
        return pwd.getpwuid(uid).pw_name
    except (KeyError, OverflowError):
        return str(uid)


class _Tally:
    """Bytes by (role, uid), each inode once: those of files with one link are added without
    asking (each is met once), the others through ``seen``."""

    __slots__ = ("seen", "bytes")

    def __init__(self, unique: dict[tuple[SpaceRole, int | None], int] | None = None):
        self.seen: set[tuple[int, int]] = set()
        self.bytes = dict(unique or {})

    def add_linked(self, key: tuple[int, int], role: SpaceRole, f: FileRecord) -> None:
        if key not in self.seen:
            self.seen.add(key)
            self.bytes[role, f.uid] = self.bytes.get((role, f.uid), 0) + f.allocated

    def space(self, name_of: Callable[[int | None], str]) -> Space:
        by_role = dict.fromkeys(_ROLES, 0)
        by_owner: dict[str, int] = {}
        for (role, uid), n in self.bytes.items():
            by_role[role] += n
            name = name_of(uid)
            by_owner[name] = by_owner.get(name, 0) + n
        ordered = sorted(by_owner.items(), key=lambda kv: (-kv[1], kv[0]))
        return Space(by_role, dict(ordered))


def _add(into: dict, other: dict) -> None:
    for k, n in other.items():
        into[k] = into.get(k, 0) + n


def scan_space(result: ScanResult, *,
               owner_name: Callable[[int], str] = user_name) -> ScanSpace:
    """The space of ``result``'s runs and in total, by role and by owner (see the module).
    ``owner_name`` turns a uid into what ``by_owner`` is keyed by; each uid is asked once."""
    names: dict[int | None, str] = {None: UNKNOWN_OWNER}

    def name_of(uid: int | None) -> str:
        if uid not in names:
            names[uid] = owner_name(uid)
        return names[uid]

    # Overlapping roots may list one file twice, with one link: then every file is checked.
    check_all = len(result.roots) > 1
    unique: list[dict] = []       # per run: bytes by (role, uid) of its files of one link
    linked: list[list] = []       # per run: (key, role, file) of the others, in scan order
    trash_linked: list[list] = []
    # The role of a relpath depends on it and on what the checkpoint is (redundant with these
    # merged files, DeepSpeed's state the only copy): the checkpoints of a run share a memo.
    memo: dict[tuple, dict[str, SpaceRole]] = {}
    for run in result.runs:
        acc: dict[tuple[SpaceRole, int | None], int] = {}
        links: list = []
        for c in run.checkpoints:
            kind = (c.model_kind is ModelKind.DEEPSPEED,
                    c.merged_files if c.status is Status.REDUNDANT else ())
            roles = memo.setdefault(kind, {})
            for f in c.dir.files:
                role = roles.get(f.relpath)
                if role is None:
                    role = roles[f.relpath] = file_role(c, f.relpath)
                if f.nlink > 1 or check_all:
                    links.append(((f.dev, f.ino), role, f))
                else:
                    k = (role, f.uid)
                    acc[k] = acc.get(k, 0) + f.allocated
        tlinks = []
        for f in run.trash:
            if f.nlink > 1 or check_all:
                tlinks.append(((f.dev, f.ino), SpaceRole.TRASH, f))
            else:
                k = (SpaceRole.TRASH, f.uid)
                acc[k] = acc.get(k, 0) + f.allocated
        unique.append(acc)
        linked.append(links)
        trash_linked.append(tlinks)
    total = _Tally()
    for acc in unique:
        _add(total.bytes, acc)
    tallies = [_Tally(acc) for acc in unique]
    # files of several links: every checkpoint's before any trash's (see the module)
    for pending in (linked, trash_linked):
        for tally, items in zip(tallies, pending):
            for key, role, f in items:
                tally.add_linked(key, role, f)
                total.add_linked(key, role, f)
    return ScanSpace(tuple(t.space(name_of) for t in tallies), total.space(name_of))
