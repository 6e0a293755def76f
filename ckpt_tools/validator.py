"""Decide what a checkpoint is: its layout, its problems and its status.

Three levels of scrutiny:

- ``headers`` (audit): every file of the PEFT tree and every merged-weight file is
  checked by its header (safetensors) or archive structure and pickle opcodes
  (torch.save); configs are parsed. Trainer state files are only looked at.
- ``full`` (validate): also the archive structure and pickle of every torch.save file of the
  checkpoint (``_pickle_check_of``).
- ``deep`` (validate --deep): also every tensor read (NaN/Inf), a content hash per file,
  ``adapter_config.json`` through ``peft.LoraConfig`` when peft is there, and the LoRA and
  router tensors of merged weights compared with the PEFT tree's (``merged-mismatch``, the
  comparison prune's ``content_proof`` makes).

No tensor data is read and neither torch nor peft is imported below ``deep``: the config
checks that decide shapes and scaling (``_check_adapter_config``) are plain Python.
``redundant`` is structural: a complete, sound PEFT tree beside merged weights that hold
DyLoRA LoRA tensors (merged weights holding none are a merged export: ``peft-only``,
``merged-export``).
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass, field
from operator import itemgetter
from typing import NamedTuple

from . import checkpoint_reads as reads
from . import layout, replay
from .formats import safetensors_header as st
from .formats import torchsave
from .layout import Role
from .patterns import ModuleMatch, PatternTooCostly, match_modules
from .problems import (BAD_CONFIG, BAD_JSON, BAD_NAME, COUNT_UNCONFIRMED, ERROR,
                       EXPERT_COUNT_MISMATCH, EXPERT_MISSING, MERGED_EXPORT, MERGED_MISMATCH,
                       MISSING_FILE, MISSING_TENSOR,
                       PERMISSION_DENIED, RANK_MISMATCH, SHAPE_MISMATCH, SYMLINK_ESCAPE,
                       TARGET_MISMATCH, UNREADABLE, WARNING, FormatError, Problem)
from .read_cache import ReadCache, bounded_put
from .records import (BROKEN, IN_PROGRESS, LEGACY, PEFT_ONLY, REDUNDANT, CheckpointDir,
                      FileRecord, file_rows)

HEADERS, FULL, DEEP = "headers", "full", "deep"
_RELPATH = itemgetter(reads.ROW_RELPATH)
_MAX_JSON_BYTES = reads.MAX_JSON_BYTES


@dataclass(frozen=True)
class Tensor:
    """A tensor's name, dtype and shape as a header or a pickle declares them."""

    dtype: str
    shape: tuple[int, ...]


@dataclass
class ExpertInfo:
    index: int
    source: str                        # relpath of the weights file
    loaded: bool = False               # its tensors could be read
    modules: dict[str, dict[str, Tensor]] = field(default_factory=dict)  # module → part → tensor
    config: dict | None = None
    config_path: str | None = None


@dataclass(frozen=True)
class VerdictFacts:
    """What a verdict found besides its status, for the commands that act on it: where the
    PEFT tree and the MoE state are, the parsed configs, the experts present; ``hashes``
    (a content hash per file) only in deep mode. The configs are shared with other
    verdicts: never mutate them."""

    tree_form: str
    merged_kind: str | None
    router: str | None            # relpath of the router state, where one is expected
    experts: tuple[int, ...]      # indices of the experts present
    root_config: dict | None
    moe_config: dict | None
    moe_dir: str                  # relpath of dylo_moe_state/ (the run's for best_model/)
    young: bool                   # written within the minimum age
    hashes: dict | None = None

    # Readers written for the former dict (converter, loader, content_proof, report) use
    # facts.get(name), facts[name] and name in facts; "hashes" is there only in deep mode.
    def __contains__(self, name: str) -> bool:
        return name in _FACT_NAMES and (name != "hashes" or self.hashes is not None)

    def __getitem__(self, name: str):
        if name not in self:
            raise KeyError(name)
        return getattr(self, name)

    def get(self, name: str, default=None):
        return getattr(self, name) if name in self else default


_FACT_NAMES = frozenset(VerdictFacts.__dataclass_fields__)


@dataclass(frozen=True)
class Verdict:
    """What the validator concluded about one checkpoint."""

    layout: str
    status: str
    problems: tuple[Problem, ...]
    tree_form: str
    merged_kind: str | None
    merged_files: tuple[str, ...]
    num_experts: int | None
    tree_complete: bool
    facts: VerdictFacts


class _Recorder:
    """Stands in for a _Ctx while a memoised check runs: it only collects problems."""

    def __init__(self, cache: ReadCache):
        self.cache = cache  # a check memoised inside another is memoised in the same cache
        self.items: list[tuple] = []

    def add(self, code: str, relpath: str, message: str, severity: str = ERROR) -> None:
        self.items.append((code, relpath, message, severity))


def _memoised(ctx, key, keepalive, fn):
    """``fn(ctx)``; with a cache, run once per ``key`` and replayed afterwards (its value
    and the problems it added).

    The checkpoints of a run repeat the same headers and configs; the parsed objects are
    shared by the readers' caches, so checks on them are keyed by identity. ``keepalive``
    holds those objects so that their ids stay theirs while the entry lives.
    """
    cache = ctx.cache
    if cache is None:
        return fn(ctx)
    hit = cache.checks.get(key)
    if hit is None:
        rec = _Recorder(cache)
        value = fn(rec)
        hit = (keepalive, value, tuple(rec.items))
        bounded_put(cache.checks, key, hit)
    for code, rel, msg, sev in hit[2]:
        ctx.add(code, rel, msg, sev)
    return hit[1]


class _Shape:
    """What a checkpoint's relpaths alone decide: the role of each file, the merged files,
    the form of the PEFT tree and where each expert lives. The checkpoints of a run share
    one, so it is worked out once per distinct set of relpaths."""

    __slots__ = ("roles", "merged", "tree_form", "expert_dirs", "flat_experts", "position",
                 "bad_indices")

    def __init__(self, relpaths: tuple[str, ...]):
        roles = {rel: layout.role_of(rel) for rel in relpaths}
        self.roles = roles
        self.merged = tuple(sorted(p for p, r in roles.items()
                                   if r.role in (Role.MERGED, Role.MERGED_INDEX)))
        self.tree_form = _tree_form_of(roles)
        self.expert_dirs = tuple(sorted(_expert_dirs_of(roles).items()))
        self.position = {rel: i for i, rel in enumerate(relpaths)}
        self.flat_experts = tuple(sorted(p for p, r in roles.items()
                                         if r.role is Role.FLAT_EXPERT))
        # files and directories whose names hold an expert index out of range
        self.bad_indices = tuple(sorted({r.bad_index for r in roles.values() if r.bad_index}))


def _shape_of(relpaths: tuple[str, ...], cache: ReadCache | None) -> _Shape:
    if cache is None:
        return _Shape(relpaths)
    shape = cache.shapes.get(relpaths)
    if shape is None:
        shape = _Shape(relpaths)
        bounded_put(cache.shapes, relpaths, shape)
    return shape


class _Ctx:
    """The state of one validation: where things are and the problems found so far."""

    def __init__(self, ckpt: CheckpointDir, level: str, cache: ReadCache | None):
        self.ckpt = ckpt
        self.level = level
        self.cache = cache
        self.base = base = ckpt.abspath
        self._prefix = base if base.endswith(os.sep) else base + os.sep
        self.problems: list[Problem] = []
        self.raw: list[tuple] = []   # the problems as added: (code, relpath, message, severity)
        self.trace: list | None = None  # reads (kind, relpath, arg, value) while recording
        self.rows = file_rows(ckpt)
        self._by_path: dict[str, FileRecord] | None = None
        self.shape = _shape_of(tuple(map(_RELPATH, self.rows)), cache)  # rows are sorted by relpath
        self.roles = self.shape.roles  # shared between checkpoints: never mutate it

    @property
    def by_path(self) -> dict[str, FileRecord]:
        """relpath → FileRecord, in relpath order; made when first needed."""
        if self._by_path is None:
            self._by_path = {f.relpath: f for f in self.ckpt.files}
        return self._by_path

    def size_hint(self, relpath: str) -> int | None:
        """The size the scan found for ``relpath`` where it found a regular file there (then
        opening it needs no second look), else None."""
        by_path = self._by_path
        if by_path is not None:
            rec = by_path.get(relpath)
            if rec is None or rec.is_symlink or not rec.is_regular:
                return None
            return rec.size
        at = self.shape.position.get(relpath)
        if at is None:
            return None
        return reads.regular_size(self.rows[at])

    def reshape(self) -> None:
        """Derive what the relpaths alone decide (after ``by_path`` changed)."""
        self.shape = _shape_of(tuple(self.by_path), self.cache)
        self.roles = self.shape.roles  # shared between checkpoints: never mutate it

    def rel(self, relpath: str) -> str:
        """A path relative to the scan root, for reports."""
        if relpath == ".":
            return self.ckpt.path
        if self.ckpt.path == ".":
            return relpath
        return os.path.normpath(f"{self.ckpt.path}/{relpath}").replace(os.sep, "/")

    def add(self, code: str, relpath: str, message: str, severity: str = ERROR) -> None:
        self.raw.append((code, relpath, message, severity))
        self.problems.append(Problem(code, self.rel(relpath), message, severity))

    def abspath(self, relpath: str) -> str:
        # os.path.join(self.base, *relpath.split("/")) for a '/'-separated relative path
        if os.sep == "/":
            return self._prefix + relpath
        return os.path.join(self.base, *relpath.split("/"))

    def files_with(self, role: Role) -> list[str]:
        return [p for p, r in self.roles.items() if r.role is role]

    def readable(self, relpath: str, in_tree: bool) -> bool:
        """Whether a file may be opened: it exists and is no symlink out of the root."""
        rec = self.by_path.get(relpath)
        if rec is None:
            return False
        if rec.is_symlink:
            if rec.escapes_root:
                return False
            if rec.symlink_target is None:
                self.add(MISSING_FILE, relpath, "dangling symlink", ERROR if in_tree else WARNING)
                return False
        return True

    def os_problem(self, relpath: str, exc: OSError) -> None:
        if isinstance(exc, PermissionError):
            self.add(PERMISSION_DENIED, relpath, "permission denied")
        elif isinstance(exc, FileNotFoundError):
            self.add(MISSING_FILE, relpath, "file vanished during validation")
        elif isinstance(exc, st.NotRegularFile):
            self.add(UNREADABLE, relpath, exc.strerror)   # "not a regular file (a FIFO)"
        else:
            self.add(UNREADABLE, relpath, f"cannot read: {exc.strerror or exc}")

    # --- readers that turn every failure into a problem -------------------------

    def read_json(self, relpath: str) -> dict | None:
        """A JSON object, shared with other readers of the same bytes: never mutate it."""
        try:
            raw = reads.read_json_bytes(self.abspath(relpath), self.size_hint(relpath))
        except OSError as exc:
            self.trace = None
            self.os_problem(relpath, exc)
            return None
        if len(raw) > _MAX_JSON_BYTES:
            self.trace = None
            self.add(BAD_JSON, relpath, f"larger than {_MAX_JSON_BYTES} bytes")
            return None
        value = reads.parse_json(raw, self.cache)
        if isinstance(value, str):
            self.trace = None
            self.add(BAD_JSON, relpath, value)
            return None
        if self.trace is not None:
            self.trace.append(("json", relpath, None, value))
        return value

    def _guarded(self, relpath: str, read):
        """``read()``, with a FormatError or OSError turned into a problem (and None)."""
        try:
            return read()
        except FormatError as exc:
            self.trace = None
            self.add(exc.code, relpath, exc.message)
        except OSError as exc:
            self.trace = None
            self.os_problem(relpath, exc)
        return None

    def read_safetensors(self, relpath: str) -> dict[str, Tensor] | None:
        header = self._guarded(relpath, lambda: reads.read_header(
            self.abspath(relpath), relpath, self.size_hint(relpath), self.cache))
        if header is None:
            return None
        if self.trace is not None:
            self.trace.append(("st", relpath, None, header))
        return _memoised(self, ("tensors", id(header)), header,
                         lambda _: {t.name: Tensor(t.dtype, tuple(t.shape)) for t in header.tensors})

    def read_torch(self, relpath: str, check_pickle: bool | frozenset[str] = True):
        # shared: the validator never mutates what it reads
        info = self._guarded(relpath, lambda: reads.inspect_torch(
            self.abspath(relpath), check_pickle, self.size_hint(relpath), self.cache))
        if info is None:
            return None
        if self.trace is not None:
            token = reads.torch_token(info, self.cache)
            if token is None:
                self.trace = None
            else:
                self.trace.append(("torch", relpath, check_pickle, token))
        return info

    def read_tensors(self, relpath: str) -> dict[str, Tensor] | None:
        """Names, dtypes and shapes of the tensors of a safetensors or torch.save file."""
        if relpath.endswith(".safetensors"):
            return self.read_safetensors(relpath)
        info = self.read_torch(relpath)
        if info is None:
            return None
        flat = torchsave.flatten_tensors(info.obj)
        return {k: Tensor(v.dtype, tuple(v.shape)) for k, v in flat.items()}


def _count(value) -> int | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, int) and value > 0:
        return value
    return None


def _finite(value) -> bool:
    """A JSON number that is a finite float (NaN, Infinity and 1e999 parse; 10**4000 overflows)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return False
    try:
        return math.isfinite(value)
    except OverflowError:
        return False


def _short(value) -> str:
    """``repr`` of a config value, cut short: a hostile number may have thousands of digits."""
    text = repr(value)
    return text if len(text) <= 40 else f"{text[:20]}...({len(text)} characters)"


_ROUTER_ROWS = "the router's gate.weight has rows for"


def _expert_count(ctx: _Ctx, relpath: str, value, what: str = "says") -> int | None:
    """The number of experts a file states (a positive integer), else None. A number above
    ``layout.MAX_EXPERTS`` is a problem on that file, and no count: every check after it
    then costs what the checkpoint's files cost, not what a number in them claims."""
    n = _count(value)
    if n is not None and n > layout.MAX_EXPERTS:
        ctx.add(EXPERT_COUNT_MISMATCH, relpath, f"{what} {_short(n)} experts; a checkpoint may "
                                                f"have at most {layout.MAX_EXPERTS}")
        return None
    return n


def _ranges(indices: list[int], most: int = 8) -> str:
    """Sorted indices as ranges: ``0-3, 5, 7-9``; past ``most`` ranges, how many more."""
    runs: list[list[int]] = []
    for i in indices:
        if runs and i == runs[-1][1] + 1:
            runs[-1][1] = i
        else:
            runs.append([i, i])
    shown = ", ".join(str(a) if a == b else f"{a}-{b}" for a, b in runs[:most])
    if len(runs) > most:
        shown += f" and {sum(b - a + 1 for a, b in runs[most:])} more"
    return shown


def _report_missing_experts(ctx: _Ctx, missing: list[int], num_experts: int, tree_form: str,
                            merged) -> None:
    """One problem for every expert missing: on the expert's own path when it is one, on
    the PEFT tree (or the merged file) with their ranges when they are several."""
    if not missing:
        return
    if tree_form == layout.TREE_NONE:
        where = merged[0] if merged else "."
    elif len(missing) > 1:
        where = layout.PEFT_DIR
    elif tree_form == layout.TREE_FLAT:
        where = f"{layout.PEFT_DIR}/{layout.EXPERT_DIR_PREFIX}{missing[0]}.pt"
    else:
        where = f"{layout.PEFT_DIR}/{layout.EXPERT_DIR_PREFIX}{missing[0]}"
    if len(missing) == 1:
        link = ctx.by_path.get(where)
        why = (" (it is a symlink; links to directories are not followed: their files "
               "are not this checkpoint's own)" if link is not None and link.is_symlink else "")
        ctx.add(EXPERT_MISSING, where, f"expert {missing[0]} of {num_experts} is missing{why}")
    else:
        ctx.add(EXPERT_MISSING, where, f"{len(missing)} of {num_experts} experts are missing: "
                                       f"{_ranges(missing)}")


# --- adapter configs -------------------------------------------------------------

def _pattern_value(patterns: dict | None, module: str):
    """PEFT's rank_pattern / alpha_pattern lookup for one module (``patterns.match_modules``);
    raises ``PatternTooCostly`` as it does."""
    if not patterns:
        return None
    key = match_modules(None, patterns, None, [module])[module].rank_key
    return None if key is None else patterns[key]


def _check_adapter_config(ctx: _Ctx, relpath: str, cfg: dict) -> bool:
    """The fields of adapter_config.json that decide shapes and scaling. True when usable."""
    ok = True

    def bad(msg: str) -> None:
        nonlocal ok
        ok = False
        ctx.add(BAD_CONFIG, relpath, msg)

    peft_type = cfg.get("peft_type")
    if peft_type is not None and peft_type != "LORA":
        bad(f"peft_type is {peft_type!r}, expected 'LORA'")
    r = cfg.get("r")
    if _count(r) is None:
        bad(f"r must be a positive integer, found {r!r}")
    alpha = cfg.get("lora_alpha")
    if alpha is not None and not _finite(alpha):
        bad(f"lora_alpha must be a finite number, found {_short(alpha)}")
    dropout = cfg.get("lora_dropout")
    if dropout is not None and not (_finite(dropout) and 0 <= dropout <= 1):
        bad(f"lora_dropout must be a number from 0 to 1, found {_short(dropout)}")
    targets = cfg.get("target_modules")
    if targets is not None and not isinstance(targets, (str, list)):
        bad(f"target_modules must be a list or a string, found {type(targets).__name__}")
    elif isinstance(targets, list) and not all(isinstance(t, str) for t in targets):
        bad("target_modules must hold strings")
    for key in ("rank_pattern", "alpha_pattern"):
        pat = cfg.get(key)
        if pat is not None and not isinstance(pat, dict):
            bad(f"{key} must be an object, found {type(pat).__name__}")
        elif isinstance(pat, dict):
            for k, v in pat.items():
                if not _finite(v) or v <= 0:
                    bad(f"{key}[{k!r}] must be a positive number, found {_short(v)}")
    mts = cfg.get("modules_to_save")
    if mts is not None and not isinstance(mts, list):
        bad(f"modules_to_save must be a list, found {type(mts).__name__}")
    for key in ("use_dora", "lora_bias"):
        v = cfg.get(key)
        if v is not None and not isinstance(v, bool):
            bad(f"{key} must be true or false, found {v!r}")
    return ok


def _check_with_peft(ctx: _Ctx, relpath: str, cfg: dict) -> None:
    try:
        from peft import LoraConfig
    except Exception:  # noqa: BLE001 - peft is optional for validation
        return
    fields = {k: v for k, v in cfg.items() if k in LoraConfig.__dataclass_fields__}
    try:
        LoraConfig(**fields)
    except Exception as exc:  # noqa: BLE001 - any refusal by peft is a config problem
        ctx.add(BAD_CONFIG, relpath, f"peft.LoraConfig refuses it: {str(exc).splitlines()[0]}")


# --- the PEFT tree ----------------------------------------------------------------

def _expert_modules(ctx: _Ctx, relpath: str, tensors: dict[str, Tensor], peft_keys: bool,
                    expert: int) -> dict[str, dict[str, Tensor]]:
    modules: dict[str, dict[str, Tensor]] = {}
    for key, t in tensors.items():
        try:
            lk = layout.parse_peft_lora_key(key) if peft_keys else layout.parse_moe_lora_key(key)
        except layout.BadIndex as exc:
            ctx.add(EXPERT_COUNT_MISMATCH, relpath, str(exc))
            continue
        if lk is None:
            continue
        if not peft_keys and lk.expert != expert:
            ctx.add(EXPERT_COUNT_MISMATCH, relpath,
                    f"holds tensor {key!r} of expert {lk.expert}, not expert {expert}")
            continue
        part = lk.part + (f".{lk.param}" if lk.param and lk.param != "weight" else "")
        modules.setdefault(lk.module, {})[part] = t
    return modules


def _module_matches(ctx: _Ctx, ex: ExpertInfo) -> dict[str, ModuleMatch] | None:
    """How the expert's config patterns apply to its modules; None (and a problem on the
    config) when a regular expression among them is too costly to evaluate."""
    cfg = ex.config
    if cfg is None:
        return None
    modules = tuple(sorted(ex.modules))
    # keyed without the expert: the experts of a checkpoint share one parsed config
    found = _memoised(ctx, ("patterns", id(cfg), modules), cfg, lambda _: _matches_or_refusal(
        cfg, modules))
    if isinstance(found, PatternTooCostly):
        ctx.add(BAD_CONFIG, ex.config_path, str(found))
        return None
    return found


def _matches_or_refusal(cfg: dict, modules: tuple[str, ...]):
    try:
        return match_modules(cfg.get("target_modules"), cfg.get("rank_pattern"),
                             cfg.get("alpha_pattern"), modules)
    except PatternTooCostly as exc:
        return exc


def _check_expert_shapes(ctx: _Ctx, ex: ExpertInfo, default_r: int | None) -> None:
    cfg = ex.config or {}
    matches = _module_matches(ctx, ex)
    rank_pattern = cfg.get("rank_pattern")
    for module, parts in sorted(ex.modules.items()):
        a, b = parts.get("lora_A"), parts.get("lora_B")
        if a is None or b is None:
            missing = "lora_A" if a is None else "lora_B"
            ctx.add(MISSING_TENSOR, ex.source, f"{module}: {missing} is missing")
            continue
        if len(a.shape) != 2 or len(b.shape) != 2:
            # conv LoRA and embeddings are not what DyLoRA-MoE trains; only check the rank dims
            if not a.shape or not b.shape:
                ctx.add(SHAPE_MISMATCH, ex.source, f"{module}: scalar LoRA tensor")
            continue
        if a.shape[0] != b.shape[1]:
            ctx.add(RANK_MISMATCH, ex.source,
                    f"{module}: lora_A has rank {a.shape[0]} but lora_B has rank {b.shape[1]}")
            continue
        match = None if matches is None else matches[module]
        if ex.config is not None and match is None:
            continue  # the config's patterns could not be evaluated: a problem already
        expected = ((match and match.rank_key and rank_pattern[match.rank_key])
                    or cfg.get("r") or default_r)
        if isinstance(expected, int) and not isinstance(expected, bool) and a.shape[0] != expected:
            ctx.add(RANK_MISMATCH, ex.source,
                    f"{module}: rank {a.shape[0]} but the adapter config says r={expected}")
        if match is not None and not match.targeted:
            ctx.add(TARGET_MISMATCH, ex.source,
                    f"{module} is not among the adapter config's target_modules")


def _target_set(cfg: dict | None):
    targets = (cfg or {}).get("target_modules")
    if isinstance(targets, list):
        return frozenset(targets)
    return targets


def _shown_targets(targets) -> str:
    """target_modules for a message: a list sorted, a regular expression quoted, cut short."""
    return _short(sorted(targets) if isinstance(targets, frozenset) else targets)


def _compare_experts(ctx: _Ctx, experts: dict[int, ExpertInfo]) -> None:
    """All experts must adapt the same modules with the same in/out features."""
    configured = {i: e for i, e in experts.items() if e.config is not None}
    if len(configured) > 1:
        ref_idx = min(configured)
        ref_targets = _target_set(configured[ref_idx].config)
        for i, ex in sorted(configured.items()):
            if i != ref_idx and _target_set(ex.config) != ref_targets:
                ctx.add(TARGET_MISMATCH, ex.config_path,
                        f"target_modules {_shown_targets(_target_set(ex.config))} differ from "
                        f"expert {ref_idx}'s {_shown_targets(ref_targets)}")
    experts = {i: e for i, e in experts.items() if e.loaded and e.modules}
    if len(experts) < 2:
        return
    ref_idx = min(experts)
    ref = experts[ref_idx]
    for i, ex in sorted(experts.items()):
        if i == ref_idx:
            continue
        mine, theirs = set(ex.modules), set(ref.modules)
        if mine != theirs:
            extra, lacking = sorted(mine - theirs), sorted(theirs - mine)
            detail = []
            if lacking:
                detail.append(f"lacks {', '.join(lacking[:3])}{' …' if len(lacking) > 3 else ''}")
            if extra:
                detail.append(f"adds {', '.join(extra[:3])}{' …' if len(extra) > 3 else ''}")
            ctx.add(TARGET_MISMATCH, ex.source,
                    f"expert {i} covers other modules than expert {ref_idx}: {'; '.join(detail)}")
        for module in sorted(mine & theirs):
            a, ra = ex.modules[module].get("lora_A"), ref.modules[module].get("lora_A")
            b, rb = ex.modules[module].get("lora_B"), ref.modules[module].get("lora_B")
            if a and ra and len(a.shape) == 2 and len(ra.shape) == 2 and a.shape[1] != ra.shape[1]:
                ctx.add(SHAPE_MISMATCH, ex.source,
                        f"{module}: lora_A has {a.shape[1]} input features, expert {ref_idx} has {ra.shape[1]}")
            if b and rb and len(b.shape) == 2 and len(rb.shape) == 2 and b.shape[0] != rb.shape[0]:
                ctx.add(SHAPE_MISMATCH, ex.source,
                        f"{module}: lora_B has {b.shape[0]} output features, expert {ref_idx} has {rb.shape[0]}")


def _tree_form(ctx: _Ctx) -> str:
    return ctx.shape.tree_form


def _tree_form_of(roles: dict) -> str:
    nested = canonical = flat = False
    for rel, role in roles.items():
        if role.role is Role.FLAT_EXPERT:
            flat = True
        elif role.role in (Role.ADAPTER_CONFIG, Role.ADAPTER_WEIGHTS):
            if role.nested:
                nested = True
            else:
                canonical = True
    if canonical:
        return layout.TREE_CANONICAL
    if nested:
        return layout.TREE_NESTED
    if flat:
        return layout.TREE_FLAT
    if any(rel.startswith(layout.PEFT_DIR + "/") for rel in roles):
        return layout.TREE_CANONICAL  # an emptied or foreign peft_adapters/: judged as canonical
    return layout.TREE_NONE


def _expert_dirs(ctx: _Ctx) -> dict[int, str]:
    """expert index → the directory (relative) that should hold its adapter files."""
    return dict(ctx.shape.expert_dirs)


def _expert_dirs_of(roles: dict) -> dict[int, str]:
    dirs: dict[int, str] = {}
    for rel, role in roles.items():
        if role.expert is None or role.role is Role.FLAT_EXPERT:
            continue
        parts = rel.split("/")
        if role.nested:
            dirs[role.expert] = "/".join(parts[:3])
        elif role.role in (Role.ADAPTER_CONFIG, Role.ADAPTER_WEIGHTS, Role.PEFT_README, Role.OTHER):
            dirs.setdefault(role.expert, "/".join(parts[:2]))
    return dirs


def _load_dir_experts(ctx: _Ctx, nested: bool) -> dict[int, ExpertInfo]:
    experts: dict[int, ExpertInfo] = {}
    for index, d in ctx.shape.expert_dirs:
        if nested and d.count("/") == 1:
            d = f"{d}/{d.rsplit('/', 1)[1]}"
        cfg_rel = f"{d}/{layout.ADAPTER_CONFIG}"
        weights = [f"{d}/{n}" for n in (layout.ADAPTER_WEIGHTS, layout.ADAPTER_WEIGHTS_BIN)
                   if f"{d}/{n}" in ctx.by_path]
        cfg = None
        if cfg_rel not in ctx.by_path:
            ctx.add(MISSING_FILE, cfg_rel, f"expert {index} has no {layout.ADAPTER_CONFIG}")
        elif ctx.readable(cfg_rel, True):
            cfg = ctx.read_json(cfg_rel)
            if cfg is not None:
                # a pure function of the (shared, never mutated) parsed config
                if not _memoised(ctx, ("adapter-config", id(cfg), cfg_rel), cfg,
                                 lambda rec: _check_adapter_config(rec, cfg_rel, cfg)):
                    cfg = None
                elif ctx.level == DEEP:   # peft imports torch and transformers: seconds
                    _check_with_peft(ctx, cfg_rel, cfg)
        if not weights:
            ctx.add(MISSING_FILE, f"{d}/{layout.ADAPTER_WEIGHTS}",
                    f"expert {index} has no adapter weights")
            experts[index] = ExpertInfo(index, f"{d}/{layout.ADAPTER_WEIGHTS}", config=cfg,
                                        config_path=cfg_rel)
            continue
        ex = ExpertInfo(index, weights[0], config=cfg, config_path=cfg_rel)
        if ctx.readable(weights[0], True):
            tensors = ctx.read_tensors(weights[0])
            if tensors is not None:
                ex.loaded = True
                ex.modules = _memoised(
                    ctx, ("modules", id(tensors), weights[0]), tensors,
                    lambda rec: _expert_modules(rec, weights[0], tensors, True, index))
                if not ex.modules:
                    ctx.add(MISSING_TENSOR, weights[0], "holds no LoRA tensors")
        experts[index] = ex
    return experts


def _load_flat_experts(ctx: _Ctx) -> dict[int, ExpertInfo]:
    experts: dict[int, ExpertInfo] = {}
    for rel in ctx.shape.flat_experts:
        index = ctx.roles[rel].expert
        ex = ExpertInfo(index, rel)
        if ctx.readable(rel, True):
            tensors = ctx.read_tensors(rel)
            if tensors is not None:
                ex.loaded = True
                ex.modules = _expert_modules(ctx, rel, tensors, False, index)
                if not ex.modules:
                    ctx.add(MISSING_TENSOR, rel, "holds no LoRA tensors")
        experts[index] = ex
    return experts


def _router_shapes(ctx: _Ctx, rel: str) -> tuple[dict[str, Tensor] | None, object]:
    """(gate.weight / gate.bias of a router file, in any of its three forms; the number of
    experts the V2 router dict states beside its gate, as found, else None)."""
    if rel.endswith(".safetensors"):
        tensors = ctx.read_safetensors(rel)
        if tensors is None:
            return None, None
        return {(layout.router_key(k) or k): t for k, t in tensors.items()}, None
    info = ctx.read_torch(rel)
    if info is None:
        return None, None
    obj = info.obj
    meta = {}
    if isinstance(obj, dict) and isinstance(obj.get("gate_state_dict"), dict):
        meta = {k: v for k, v in obj.items() if k != "gate_state_dict"}
        obj = {f"gate.{k}": v for k, v in obj["gate_state_dict"].items()}
    flat = torchsave.flatten_tensors(obj) if isinstance(obj, dict) else {}
    out = {(layout.router_key(k) or k): Tensor(v.dtype, tuple(v.shape)) for k, v in flat.items()}
    return out, meta.get("num_experts")


def _pickle_check_of(name: str) -> bool | frozenset[str]:
    """How the pickle of a Trainer state file is judged (``inspect_torch_file``'s
    ``check_pickle``): as ``torch.load(weights_only=True)`` would, with what the Trainer allows
    besides for its RNG state, or not at all for ``training_args.bin``."""
    if layout.is_rng_state_name(name):
        return torchsave.TRAINER_RNG_GLOBALS
    return not layout.never_unpickle(name)


def _lenient_safetensors_names(path: str) -> dict[str, Tensor]:
    """Tensor names of a safetensors file whose data is damaged but whose header parses.

    Used only to name the layout of a broken merged file; never to trust it.
    """
    try:
        data, _ = st.read_header_bytes(path)   # a FIFO or device is refused
    except (OSError, FormatError):
        return {}
    unknown = Tensor("?", ())
    return dict.fromkeys(st.lenient_names(data), unknown)


def _merged_keys(ctx: _Ctx, merged: list[str]) -> tuple[dict[str, Tensor], bool]:
    """Keys (with shapes where known) of the merged weights; False when unreadable."""
    keys: dict[str, Tensor] = {}
    ok = True
    indexes = [m for m in merged if ctx.roles[m].role is Role.MERGED_INDEX]
    for idx in indexes:
        if not ctx.readable(idx, False):
            continue
        cfg = ctx.read_json(idx)
        if cfg is None:
            ok = False
            continue
        wm = cfg.get("weight_map")
        if not isinstance(wm, dict):
            ctx.add(BAD_JSON, idx, "no weight_map object")
            ok = False
            continue
        folder = idx.rsplit("/", 1)[0] + "/" if "/" in idx else ""
        for shard in sorted(set(v for v in wm.values() if isinstance(v, str))):
            if folder + shard not in ctx.by_path:
                ctx.add(MISSING_FILE, folder + shard, f"shard named by {idx} is missing")
                ok = False
    for m in merged:
        if ctx.roles[m].role is not Role.MERGED or not ctx.readable(m, False):
            continue
        tensors = ctx.read_tensors(m)
        if tensors is None:
            ok = False
            tensors = _lenient_safetensors_names(ctx.abspath(m)) if m.endswith(".safetensors") else {}
        bad = _bad_expert_indices(ctx, m, tensors)
        if bad:
            tensors = {k: t for k, t in tensors.items() if k not in bad}
        keys.update(tensors)
    return keys, ok


def _bad_expert_indices(ctx: _Ctx, relpath: str, tensors: dict[str, Tensor]) -> frozenset[str]:
    """The tensor names whose expert index is out of range, each a problem on the file."""
    bad = set()
    for key in tensors:
        if ".expert_" in key:
            try:
                layout.parse_moe_lora_key(key)
            except layout.BadIndex as exc:
                bad.add(key)
                ctx.add(EXPERT_COUNT_MISMATCH, relpath, str(exc))
    return frozenset(bad)


def _check_merged_content(ctx: _Ctx, merged: list[str], tree_form: str, router_rel: str | None,
                          moe_dir: str) -> None:
    """Deep mode: the LoRA and router tensors of the merged weights must equal the PEFT
    tree's (prune's content proof, without its rule on symlinks)."""
    from .content_proof import ContentProof
    facts = {"tree_form": tree_form, "router": router_rel, "moe_dir": moe_dir}
    failure = ContentProof(cache=ctx.cache).check(ctx.ckpt, merged, facts, own_tree=False)
    if failure is not None and failure.mismatch:
        shown = next((m for m in merged if ctx.roles[m].role is Role.MERGED), merged[0])
        ctx.add(MERGED_MISMATCH, shown, failure.reason)


def _adopt_parent_moe_state(ctx: _Ctx) -> str:
    """best_model/ keeps its dylo_moe_state/ in the run directory.

    Returns the relative directory where this checkpoint's MoE state lives.
    """
    own = layout.MOE_STATE_DIR
    if ctx.ckpt.name != layout.BEST_MODEL_DIR or any(
            p.startswith(own + "/") for p in ctx.by_path):
        return own
    parent = os.path.join(os.path.dirname(ctx.base), own)
    try:
        entries = list(os.scandir(parent))
    except OSError:
        return own
    for e in entries:
        try:
            if not e.is_file(follow_symlinks=False):
                continue
            stt = e.stat(follow_symlinks=False)
        except OSError:
            continue
        rel = f"{layout.PARENT_DIR}/{own}/{e.name}"
        ctx.by_path[rel] = FileRecord(relpath=rel, size=stt.st_size, allocated=stt.st_blocks * 512,
                                      dev=stt.st_dev, ino=stt.st_ino, nlink=stt.st_nlink,
                                      mtime_ns=stt.st_mtime_ns)
    ctx.reshape()
    return f"{layout.PARENT_DIR}/{own}"


def validate_checkpoint(ckpt: CheckpointDir, *, level: str = HEADERS, min_age_s: float = 3600,
                        now: float | None = None, cache: ReadCache | None = None) -> Verdict:
    """Validate one checkpoint directory and classify it.

    ``cache``: the scan's ``ReadCache``, or None to read and judge every file afresh; the
    verdict is the same either way."""
    now = time.time() if now is None else now
    ctx = _Ctx(ckpt, level, cache)
    # At 'headers' level a checkpoint's findings are a pure function of its signature and
    # what its files' reads returned (``replay``): a checkpoint whose reads return the very
    # objects an earlier one's did is concluded from that one's findings, after reading
    # every one of its own files again. best_model/ reads its parent's MoE state: not replayed.
    memo = cache is not None and level == HEADERS and ckpt.name != layout.BEST_MODEL_DIR
    replayed = replay.replay(ctx, cache) if memo else None
    if replayed is not None:
        found, problems = replayed
        for code, rel, message, severity in problems:
            ctx.add(code, rel, message, severity)
    else:
        if memo:
            ctx.trace = []
        found = _examine(ctx)
        if memo and ctx.trace is not None:
            replay.remember(ctx, cache, ctx.trace, found, tuple(ctx.raw))
    if layout.step_out_of_range(ckpt.name):  # not part of the replay's signature: added here
        ctx.add(BAD_NAME, ".", f"the step in its name has more than {layout.MAX_STEP_DIGITS} "
                               "digits: the step is unknown", WARNING)
    return _conclude(ctx, found, now, min_age_s)


class _Found(NamedTuple):
    """What ``_examine`` found, before the checkpoint's age is taken into account; a
    replayed finding serves many checkpoints, so it is immutable."""

    layout: str
    tree_form: str
    merged_kind: str | None
    merged: tuple[str, ...]
    num_experts: int | None
    tree_complete: bool
    merged_export: bool
    experts: tuple[int, ...]
    router_ok: bool
    router: str | None
    root_cfg: dict | None
    moe_cfg: dict | None
    moe_dir: str
    hashes: dict | None

    def verdict_facts(self, young: bool) -> VerdictFacts:
        return VerdictFacts(tree_form=self.tree_form, merged_kind=self.merged_kind,
                            router=self.router, experts=self.experts, root_config=self.root_cfg,
                            moe_config=self.moe_cfg, moe_dir=self.moe_dir, young=young,
                            hashes=self.hashes)


def _conclude(ctx: _Ctx, f: _Found, now: float, min_age_s: float) -> Verdict:
    ckpt = ctx.ckpt
    young = ckpt.newest_mtime_ns > (now - min_age_s) * 1e9
    merged = f.merged
    if ckpt.tmp_name or young:
        status = IN_PROGRESS
        # half-written is expected while it is written: say what is missing, as warnings
        ctx.problems = [Problem(p.code, p.path, p.message, WARNING) for p in ctx.problems]
    elif any(p.is_error for p in ctx.problems):
        status = BROKEN
    elif f.tree_complete:
        status = REDUNDANT if merged and not f.merged_export else PEFT_ONLY
    elif merged:
        status = LEGACY
    elif f.tree_form == layout.TREE_FLAT and f.experts and f.router_ok:
        status = PEFT_ONLY
    else:
        status = BROKEN
        ctx.add(MISSING_FILE, ".", "neither a complete PEFT tree nor merged weights")
    facts = f.verdict_facts(young)
    return Verdict(layout=f.layout, status=status, problems=tuple(ctx.problems), tree_form=f.tree_form,
                   merged_kind=f.merged_kind, merged_files=merged, num_experts=f.num_experts,
                   tree_complete=f.tree_complete, facts=facts)


def _examine(ctx: _Ctx) -> _Found:
    """Every check of the checkpoint; what it found, its problems in ``ctx``."""
    ckpt = ctx.ckpt
    level = ctx.level
    hashes = None

    for rel in ckpt.unreadable:
        ctx.add(PERMISSION_DENIED, rel, "cannot read this entry")

    # symlinks first: a PEFT-tree file that points out of the root is never opened
    for rec in ckpt.files:
        if rec.is_symlink and rec.escapes_root:
            role = ctx.roles[rec.relpath]
            in_tree = role.in_peft_tree
            ctx.add(SYMLINK_ESCAPE, rec.relpath,
                    f"symlink to {rec.symlink_target or 'a missing target'} outside the root",
                    ERROR if in_tree else WARNING)

    for rel in ctx.shape.bad_indices:
        ctx.add(EXPERT_COUNT_MISMATCH, rel, f"its name holds an expert index beyond the "
                                            f"{layout.MAX_EXPERTS} experts a checkpoint may have")

    merged = list(ctx.shape.merged)
    root_cfg = None
    if layout.ROOT_CONFIG in ctx.by_path and ctx.readable(layout.ROOT_CONFIG, False):
        root_cfg = ctx.read_json(layout.ROOT_CONFIG)
    moe_dir = _adopt_parent_moe_state(ctx)
    moe_cfg_rel = f"{moe_dir}/{layout.MOE_CONFIG}"
    moe_cfg = None
    if moe_cfg_rel in ctx.by_path and ctx.readable(moe_cfg_rel, True):
        moe_cfg = ctx.read_json(moe_cfg_rel)

    tree_form = _tree_form(ctx)
    merged_kind = None
    merged_tensors: dict[str, Tensor] = {}
    if merged:
        merged_tensors, merged_ok = _merged_keys(ctx, merged)
        merged_kind = layout.merged_key_kind(merged_tensors) if merged_tensors else "unreadable"
        if not merged_ok:
            merged_tensors = {k: t for k, t in merged_tensors.items() if t.dtype != "?"}

    # experts
    if tree_form == layout.TREE_CANONICAL:
        experts = _load_dir_experts(ctx, nested=False)
    elif tree_form == layout.TREE_NESTED:
        experts = _load_dir_experts(ctx, nested=True)
    elif tree_form == layout.TREE_FLAT:
        experts = _load_flat_experts(ctx)
    else:
        experts = {}
    dylora_root = layout.is_dylora_config(root_cfg)
    cfg_for_r = moe_cfg or (root_cfg if dylora_root else None)
    default_r = _count(layout.first_key(cfg_for_r, layout.LORA_R_KEYS))
    for ex in experts.values():
        r = default_r if ex.config is None else None
        _memoised(ctx, ("shapes", id(ex.modules), id(ex.config), r, ex.source, ex.loaded),
                  (ex.modules, ex.config), lambda rec: _check_expert_shapes(rec, ex, r))
    key = ("compare",) + tuple((i, id(e.modules), id(e.config), e.loaded, e.source, e.config_path)
                               for i, e in sorted(experts.items()))
    _memoised(ctx, key, [(e.modules, e.config) for e in experts.values()],
              lambda rec: _compare_experts(rec, experts))

    # router
    router_rel = None
    router: dict | None = None
    router_says = None  # the expert count the router file states (V2 router dict)
    if tree_form == layout.TREE_NESTED or layout.ROUTER_SAFETENSORS in ctx.by_path:
        router_rel = layout.ROUTER_SAFETENSORS
    if f"{moe_dir}/{layout.ROUTER_PT}" in ctx.by_path:
        router_rel = f"{moe_dir}/{layout.ROUTER_PT}"
    if router_rel is None and tree_form != layout.TREE_NONE:
        router_rel = (layout.ROUTER_SAFETENSORS if tree_form == layout.TREE_NESTED
                      else f"{moe_dir}/{layout.ROUTER_PT}")
    if router_rel is not None:
        if router_rel not in ctx.by_path:
            if tree_form != layout.TREE_NONE:
                ctx.add(MISSING_FILE, router_rel, "the router state is missing")
        elif ctx.readable(router_rel, True):
            router, router_says = _router_shapes(ctx, router_rel)
            if router is not None and layout.GATE_WEIGHT not in router:
                ctx.add(MISSING_TENSOR, router_rel, f"no {layout.GATE_WEIGHT} in the router state")
    skill = f"{moe_dir}/{layout.SKILL_LIBRARY}"
    if skill in ctx.by_path and ctx.readable(skill, True):
        ctx.read_torch(skill)
    # the callback's resume file: part of the PEFT tree (never merged weights), checked by its header
    if layout.TRAINABLE_STATE in ctx.by_path and ctx.readable(layout.TRAINABLE_STATE, True):
        ctx.read_safetensors(layout.TRAINABLE_STATE)
    if tree_form == layout.TREE_CANONICAL and moe_cfg_rel not in ctx.by_path:
        ctx.add(MISSING_FILE, moe_cfg_rel, "the MoE config is missing")

    # expert count
    router_rows = None
    if router and isinstance(router.get(layout.GATE_WEIGHT), Tensor):
        gw = router[layout.GATE_WEIGHT]
        if len(gw.shape) == 2:
            router_rows = _expert_count(ctx, router_rel, gw.shape[0], _ROUTER_ROWS)
        else:
            ctx.add(SHAPE_MISMATCH, router_rel, f"gate.weight has shape {list(gw.shape)}, expected [E, H]")
        gb = router.get(layout.GATE_BIAS)
        if isinstance(gb, Tensor) and router_rows is not None and gb.shape != (router_rows,):
            ctx.add(SHAPE_MISMATCH, router_rel,
                    f"gate.bias has shape {list(gb.shape)}, expected [{router_rows}]")
    if merged_kind in ("v0", "v1"):
        gw = merged_tensors.get(layout.ROUTER_KEY_PREFIX + layout.GATE_WEIGHT)
        if gw is not None and len(gw.shape) == 2 and router_rows is None and tree_form == layout.TREE_NONE:
            router_rows = _expert_count(ctx, merged[0], gw.shape[0], _ROUTER_ROWS)
    declared = [(moe_cfg_rel, _expert_count(ctx, moe_cfg_rel,
                                            layout.first_key(moe_cfg, layout.NUM_EXPERTS_KEYS)))]
    declared.append((layout.ROOT_CONFIG, _expert_count(
        ctx, layout.ROOT_CONFIG, layout.first_key(root_cfg, layout.NUM_EXPERTS_KEYS))))
    if router is not None:
        declared.append((router_rel, _expert_count(ctx, router_rel, router_says)))
    declared = [(p, n) for p, n in declared if n is not None]
    present = set(experts)
    if merged_kind in ("v0", "v1") and tree_form == layout.TREE_NONE:
        for key in merged_tensors:
            lk = layout.parse_moe_lora_key(key)  # out-of-range indices were dropped: _merged_keys
            if lk is not None:
                present.add(lk.expert)
    num_experts = None
    if declared:
        num_experts = declared[0][1]
        for p, n in declared[1:]:
            if n != num_experts:
                ctx.add(EXPERT_COUNT_MISMATCH, p,
                        f"says {n} experts, {declared[0][0]} says {num_experts}")
    elif router_rows is not None:
        num_experts = router_rows
    elif present:
        num_experts = max(present) + 1
        if tree_form != layout.TREE_NONE:
            ctx.add(COUNT_UNCONFIRMED, layout.PEFT_DIR,
                    f"no config or router states the expert count; assuming {num_experts}", WARNING)
    if num_experts is not None:  # at most layout.MAX_EXPERTS
        if router_rows is not None and router_rows != num_experts:
            if declared:
                ctx.add(EXPERT_COUNT_MISMATCH, declared[0][0],
                        f"says {num_experts} experts but the router has {router_rows} rows")
            else:
                ctx.add(EXPERT_COUNT_MISMATCH, router_rel,
                        f"router has {router_rows} rows for {num_experts} experts")
        if tree_form != layout.TREE_NONE or merged_kind in ("v0", "v1"):
            _report_missing_experts(ctx, [i for i in range(num_experts) if i not in present],
                                    num_experts, tree_form, merged)
        extra = sorted(i for i in present if i >= num_experts)
        if extra:
            ctx.add(EXPERT_COUNT_MISMATCH, layout.PEFT_DIR,
                    f"expert(s) {_ranges(extra)} beyond the {num_experts} declared")

    # files outside the PEFT tree: at 'full' level, the archive structure of each torch file
    if level in (FULL, DEEP):
        for rel, role in sorted(ctx.roles.items()):
            if role.role in (Role.TRAINER_STATE, Role.TRAINING_ARGS) and rel.endswith((".pt", ".pth", ".bin")):
                if ctx.readable(rel, False):
                    ctx.read_torch(rel, check_pickle=_pickle_check_of(rel.rsplit("/", 1)[-1]))
            elif role.role in (Role.TRAINER_STATE,) and rel.endswith(".json") and ctx.readable(rel, False):
                ctx.read_json(rel)
    if level == DEEP:
        from .deep import deep_check
        hashes = deep_check(ctx)

    # completeness and status
    tree_errors = [p for p in ctx.problems if p.is_error]
    router_ok = router is not None and router_rows is not None
    has_config = (moe_cfg is not None or dylora_root
                  or (tree_form in (layout.TREE_CANONICAL, layout.TREE_NESTED)
                      and all(e.config is not None for e in experts.values())))
    if tree_form == layout.TREE_FLAT:
        # expert_<i>.pt files record no hyperparameters: once the merged weights are gone,
        # only a config saying lora_alpha would (r comes from the shapes)
        has_config = any(_finite(layout.first_key(cfg, layout.LORA_ALPHA_KEYS))
                         for cfg in (moe_cfg, root_cfg if dylora_root else None))
    tree_complete = (tree_form != layout.TREE_NONE and bool(experts) and router_ok
                     and num_experts is not None and not tree_errors and has_config)
    # A complete tree beside merged weights that hold no DyLoRA LoRA tensor (a truly merged
    # export): nothing to prove the tree by, and the export is no copy of it: not redundant.
    merged_export = (tree_complete and bool(merged) and merged_kind != "unreadable"
                     and not any(".lora_" in k and layout.parse_moe_lora_key(k)
                                 for k in merged_tensors))
    if merged_export:
        shown = next((m for m in merged if ctx.roles[m].role is Role.MERGED), merged[0])
        ctx.add(MERGED_EXPORT, shown, f"{shown.rsplit('/', 1)[-1]} holds no LoRA tensors: a merged "
                "export beside the PEFT tree, kept (not redundant)", WARNING)
    elif level == DEEP and tree_complete and merged and not any(p.is_error for p in ctx.problems):
        _check_merged_content(ctx, merged, tree_form, router_rel, moe_dir)
    if tree_form == layout.TREE_FLAT and not has_config and merged:
        ctx.add(BAD_CONFIG, layout.PEFT_DIR,
                "expert_<i>.pt files with no config recording lora_alpha or the base model: "
                "migrate this checkpoint before removing its merged weights", WARNING)

    layout_name = layout.layout_label(tree_form, merged_kind if merged else None, dylora_root)
    if merged_kind == "unreadable":
        layout_name = layout.layout_label(tree_form, "v1", dylora_root) if tree_form != layout.TREE_NONE \
            else layout.UNKNOWN
    if layout.is_hf_model_config(root_cfg) and tree_form == layout.TREE_NONE and merged:
        layout_name = layout.HF_MERGED

    return _Found(layout=layout_name, tree_form=tree_form, merged_kind=merged_kind,
                  merged=tuple(merged), num_experts=num_experts, tree_complete=tree_complete,
                  merged_export=merged_export,
                  experts=tuple(sorted(experts)), router_ok=router_ok, router=router_rel,
                  root_cfg=root_cfg, moe_cfg=moe_cfg, moe_dir=moe_dir, hashes=hashes)


