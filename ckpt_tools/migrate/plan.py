"""What migrate will do with each checkpoint of SRC: options, the plan and how it is made.

``plan_migrate(src, dst)`` scans SRC and decides, per checkpoint, what ``execute_migrate``
will do: ``copy`` (canonical; canonical+merged loses its merged weights once they are shown
to hold the same LoRA tensors as its PEFT tree), ``exact`` (the LoRA and router tensors are
already in a state dict or in ``expert_<i>.pt`` files: they are re-keyed, never recomputed)
or ``svd`` (a truly merged model: ``lowrank.extract`` against ``--base-model``). Broken and
in-progress checkpoints are skipped with their reason; a finished target is skipped after a
check (``target_state``).

A plain model directory is a DyLoRA-MoE export to migrate only where something says so
(``is_dylora_marked``); any other is a full model, and whether it is a LoRA merged into a base
is a question of content: with ``--base-model`` it is extracted (``svd``) and kept only where
every module meets ``--max-error``, else it is skipped as a full fine-tune; without it, it is
skipped. PEFT adapters and DeepSpeed/FSDP state hold nothing to migrate: skipped.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from dataclasses import dataclass

from .. import layout, scanner
from ..problems import Problem
from ..records import BROKEN, IN_PROGRESS, HEALTHY, REDUNDANT, Checkpoint, CheckpointDir
from ..formats import safetensors_header as st
from ..kinds import Layout, MergedKind, MigrateAction, MigrateMethod, ModelKind, TreeForm
from ..checkpoint_reads import MAX_JSON_BYTES
from ..validator import HEADERS, Verdict, VerdictFacts, validate_checkpoint
from .errors import CheckpointFailure, MigrateError

METHOD_COPY, METHOD_EXACT, METHOD_SVD = MigrateMethod.COPY, MigrateMethod.EXACT, MigrateMethod.SVD
ACTION_MIGRATE, ACTION_SKIP, ACTION_DONE = MigrateAction.MIGRATE, MigrateAction.SKIP, MigrateAction.DONE
# --verify: the largest max|Δlogits| / max|logits| accepted. Exact adapters differ from their
# source only by float rounding (PEFT's unmerged forward against our own hooks, in float32);
# a low-rank extraction differs by its truncation, which the user chose with --rank/--energy.
DEFAULT_VERIFY_TOL = {METHOD_COPY: 1e-4, METHOD_EXACT: 1e-4, METHOD_SVD: 1e-2}
# --max-error: the largest relative error ‖D − B·A‖_F / ‖D‖_F of any module of an svd extraction
# (D: the module's fine-tuning delta). 1% keeps 99.99% of the delta's energy: the copy changes
# what the fine-tune did to each layer's output by 1% of that change at most. A delta that is
# truly low-rank is met to float rounding (a merged LoRA: ~1e-7), so anything above 1% is a
# delta that is not low-rank at this rank: the copy would be lossy. docs/migrate.md says more.
DEFAULT_MAX_ERROR = 0.01
MARKER_FORMAT = 1


@dataclass(frozen=True)
class MigrateOptions:
    link: bool = False                 # hard-link files carried byte for byte instead of copying
    base_model: str | None = None      # --base-model: a local model dir or a hub id in the cache
    rank: int | None = None            # --rank (svd)
    energy: float | None = None        # --energy (svd)
    max_error: float = DEFAULT_MAX_ERROR   # --max-error (svd): worst module error accepted
    device: str = "auto"               # --device (svd)
    lora_alpha: float | None = None    # --lora-alpha: when no config of the checkpoint or run says
    verify: bool = False               # --verify: compare logits before committing
    verify_tol: float | None = None    # None: DEFAULT_VERIFY_TOL per method
    min_age_s: float = 3600.0

    def tolerance(self, method: str) -> float:
        return self.verify_tol if self.verify_tol is not None else DEFAULT_VERIFY_TOL[method]


@dataclass(frozen=True)
class MigrateItem:
    """What will happen to one checkpoint of SRC."""

    source: str                   # relative to SRC ('.' when SRC is the checkpoint)
    target: str                   # relative to DST
    layout: str
    status: str
    action: str                   # migrate | skip | done
    method: str | None = None     # copy | exact | svd
    reason: str | None = None     # why skipped / why it is expected to fail / what 'done' means
    experts: int | None = None
    inputs_digest: str | None = None
    notes: tuple[str, ...] = ()

    def to_dict(self) -> dict:
        return dataclasses.asdict(self) | {"notes": list(self.notes)}


@dataclass(frozen=True)
class MigratePlan:
    """Everything ``execute_migrate`` needs; serialisable with ``to_dict``/``from_dict``."""

    src: str
    dst: str
    options: MigrateOptions
    items: tuple[MigrateItem, ...]
    problems: tuple[Problem, ...] = ()     # scan problems tied to no checkpoint

    @property
    def to_migrate(self) -> tuple[MigrateItem, ...]:
        return tuple(i for i in self.items if i.action == ACTION_MIGRATE)

    def to_dict(self) -> dict:
        """The plan as ``migrate --dry-run --json`` prints it (docs/migrate.md): ``planned``
        (what will be migrated), ``skipped`` (the rest: skipped, or already migrated), the
        empty outcome lists of a run that did nothing, and what ``from_dict`` needs besides."""
        return {"dry_run": True, "src": self.src, "dst": self.dst,
                "options": dataclasses.asdict(self.options),
                "planned": [i.to_dict() for i in self.items if i.action == ACTION_MIGRATE],
                "migrated": [],
                "skipped": [i.to_dict() for i in self.items if i.action != ACTION_MIGRATE],
                "failed": [], "problems": [p.to_dict() for p in self.problems]}

    @classmethod
    def from_dict(cls, doc: dict) -> MigratePlan:
        items = tuple(MigrateItem(**(d | {"notes": tuple(d.get("notes", ()))}))
                      for d in doc["planned"] + doc["skipped"])
        return cls(doc["src"], doc["dst"], MigrateOptions(**doc["options"]), items,
                   tuple(Problem(**p) for p in doc.get("problems", ())))


# --- roots -------------------------------------------------------------------------------

def is_inside(path: str, root: str) -> bool:
    return path == root or path.startswith(root.rstrip(os.sep) + os.sep)


def check_roots(src: str, dst: str) -> None:
    """SRC an existing directory; DST not inside SRC and SRC not inside DST."""
    if not os.path.lexists(src):
        raise MigrateError(f"{src}: no such file or directory")
    if not os.path.isdir(src):
        raise MigrateError(f"{src}: not a directory")
    if os.path.lexists(dst) and not os.path.isdir(dst):
        raise MigrateError(f"{dst}: exists and is not a directory")
    rs = os.path.realpath(src)
    rd = os.path.realpath(dst)
    if rs == rd:
        raise MigrateError(f"DST {dst} is SRC {src}: migrate writes a new tree, never in place")
    if is_inside(rd, rs):
        raise MigrateError(f"DST {dst} lies inside SRC {src}: choose a DST outside the tree "
                           "being migrated")
    if is_inside(rs, rd):
        raise MigrateError(f"SRC {src} lies inside DST {dst}: choose a DST outside the tree "
                           "being migrated")


# --- planning ----------------------------------------------------------------------------

def _own_moe_state(c: Checkpoint) -> bool:
    """A canonical tree whose router and MoE config are in its own dylo_moe_state/, where a
    copy keeps them. One with ``router.safetensors`` at its root, or no MoE config (its
    adapter configs record the hyperparameters), is rebuilt as V5 is: adapters carried byte
    for byte, the router saved as dylo_moe_state/router.pt, a MoE config from the adapters'."""
    return (c.facts.router == f"{layout.MOE_STATE_DIR}/{layout.ROUTER_PT}"
            and c.facts.moe_config is not None)


# Where the model's weights may be a plain Hugging Face state dict (``layout.HF_MERGED`` for a
# DyLoRA-MoE export; ``model``, ``sharded``, or beside DeepSpeed or FSDP state for a full model).
_PLAIN_MODEL_LAYOUTS = (Layout.HF_MERGED, Layout.MODEL, Layout.SHARDED, Layout.DEEPSPEED, Layout.FSDP)
# Checkpoints that hold nothing migrate could make smaller or more canonical, and why.
_NOTHING_TO_MIGRATE = {
    Layout.ADAPTER: "a PEFT adapter already holds only the adapter: nothing to migrate",
    Layout.ADAPTERS: "PEFT adapters already hold only the adapters: nothing to migrate",
    Layout.DEEPSPEED: "DeepSpeed's partitioned training state without consolidated weights: "
                      "nothing to migrate",
    Layout.FSDP: "FSDP's sharded training state without consolidated weights: nothing to migrate",
}
FULL_MODEL_REASON = ("a full model: nothing to migrate (give --base-model to test whether it is "
                     "a LoRA merged into its base)")


def is_plain_model(c: Checkpoint | Verdict) -> bool:
    """A plain Hugging Face model directory: plain weights and no PEFT tree beside them."""
    return (c.layout in _PLAIN_MODEL_LAYOUTS and c.facts.tree_form is TreeForm.NONE
            and c.facts.merged_kind in (MergedKind.HF, MergedKind.HF_LORA))


def is_dylora_marked(c: Checkpoint | Verdict) -> bool:
    """Whether something says this plain model directory is a DyLoRA-MoE export (to migrate,
    where a failure to meet --max-error is a failure) rather than a full model (where it is
    the answer to the content question: skipped)."""
    return c.model_kind is ModelKind.DYLORA_MOE


def content_question(options: MigrateOptions) -> str:
    """The plan's note on a plain model directory tried as a LoRA merged into --base-model."""
    at = " and ".join(x for x in (f"--rank {options.rank}" if options.rank else "",
                                  f"--energy {options.energy:g}" if options.energy else "") if x)
    return (f"a plain model: migrated only if its delta from --base-model is low-rank (every "
            f"module within --max-error {options.max_error:g}{' at ' + at if at else ''}), else "
            "skipped as a full fine-tune; a dry run cannot tell without extracting")


def method_for(c: Checkpoint, *, base_model_given: bool) -> tuple[str | None, str | None]:
    """(method, reason it cannot work or why there is nothing to do) for a checkpoint that is
    neither broken nor in progress. ``base_model_given``: a base model to ask a plain model
    directory's content against (--base-model; the loader always has one)."""
    lay = c.layout
    if lay == layout.CANONICAL:
        return (METHOD_COPY if _own_moe_state(c) else METHOD_EXACT), None
    if lay == layout.CANONICAL_MERGED:
        # healthy here: a complete tree beside a merged export (validator: merged-export)
        if c.facts.merged_kind in (MergedKind.V0, MergedKind.V1, MergedKind.HF,
                                   MergedKind.HF_LORA) and c.status in (REDUNDANT, HEALTHY):
            return (METHOD_COPY if _own_moe_state(c) else METHOD_EXACT), None
        if c.facts.merged_kind in (MergedKind.V0, MergedKind.V1):
            return METHOD_EXACT, None
        return None, "canonical tree is incomplete and the merged weights hold no LoRA tensors"
    if lay in (layout.V0, layout.V1, layout.V2, layout.V3, layout.V4, layout.V5):
        return METHOD_EXACT, None
    if is_plain_model(c):
        if is_dylora_marked(c) or base_model_given:
            return METHOD_SVD, None
        return None, FULL_MODEL_REASON
    if lay in _NOTHING_TO_MIGRATE:
        return None, _NOTHING_TO_MIGRATE[lay]
    return None, f"layout {lay!r} cannot be migrated"


def skip_reason(c: Checkpoint) -> str:
    if c.fresh:
        return "fresh: complete, but written to within --min-age"
    if c.status == IN_PROGRESS:
        if c.dir.tmp_name:
            return "in progress: a temporary checkpoint directory"
        return "in progress: written to within --min-age"
    errors = c.errors or c.problems
    if errors:
        p = errors[0]
        more = f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""
        return f"broken: {p.code}: {p.path}: {p.message}{more}"
    return "broken"


def input_files(ckpt: CheckpointDir, verdict_facts: VerdictFacts) -> list[tuple[str, int, int]]:
    """(relpath, size, mtime_ns) of every file the migration of ``ckpt`` may read."""
    files = [(f.relpath, f.size, f.mtime_ns) for f in ckpt.files
             if not f.name.startswith(".ckpt-tools")]
    moe_dir = verdict_facts.moe_dir
    if moe_dir.startswith(layout.PARENT_DIR):
        parent = os.path.join(ckpt.abspath, *moe_dir.split("/"))
        try:
            for e in sorted(os.scandir(parent), key=lambda e: e.name):
                if e.is_file(follow_symlinks=False):
                    stt = e.stat(follow_symlinks=False)
                    files.append((f"{moe_dir}/{e.name}", stt.st_size, stt.st_mtime_ns))
        except OSError:
            pass
    return sorted(files)


def digest_of(files: list[tuple[str, int, int]]) -> str:
    return hashlib.sha256(json.dumps(files, separators=(",", ":")).encode()).hexdigest()


def plan_migrate(src: str, dst: str, options: MigrateOptions = MigrateOptions(), *,
                 now: float | None = None, jobs: int = 1, progress=None,
                 walk: scanner.WalkOptions = scanner.WalkOptions()) -> MigratePlan:
    """Scan SRC and decide what to do with each checkpoint (nothing is written); ``walk``:
    which directories of SRC the scan leaves out."""
    from ..api import scan
    check_roots(src, dst)
    result = scan(src, min_age_s=options.min_age_s, now=now, jobs=jobs, progress=progress,
                  walk=walk)
    items = []
    for c in result.checkpoints:
        target = c.path
        if c.status in (BROKEN, IN_PROGRESS) or c.fresh:
            items.append(MigrateItem(c.path, target, c.layout, c.status, ACTION_SKIP,
                                     reason=skip_reason(c), experts=c.num_experts))
            continue
        method, why_not = method_for(c, base_model_given=bool(options.base_model))
        if method is None:
            items.append(MigrateItem(c.path, target, c.layout, c.status, ACTION_SKIP,
                                     reason=why_not, experts=c.num_experts))
            continue
        digest = digest_of(input_files(c.dir, c.facts))
        notes = []
        experts = c.num_experts
        if method == METHOD_SVD:
            experts = 1
            if not is_dylora_marked(c):
                notes.append(content_question(options))
            if not options.base_model:
                notes.append("needs --base-model (a truly merged model: the LoRA delta is baked in)")
            if options.rank is None and options.energy is None:
                notes.append("needs --rank or --energy")
        state, detail = target_state(os.path.join(dst, *target.split("/")) if target != "."
                                      else dst, digest, check=False)
        if state == "finished":
            items.append(MigrateItem(c.path, target, c.layout, c.status, ACTION_DONE, method,
                                     reason="already migrated", experts=experts,
                                     inputs_digest=digest))
            continue
        if state == "foreign":
            notes.append(f"target exists: {detail}")
        elif state == "stale":
            notes.append(f"target will be replaced: {detail}")
        items.append(MigrateItem(c.path, target, c.layout, c.status, ACTION_MIGRATE, method,
                                 experts=experts, inputs_digest=digest, notes=tuple(notes)))
    # what will be migrated first, then the rest, each in scan order: the order of to_dict's lists
    items.sort(key=lambda i: i.action != ACTION_MIGRATE)
    return MigratePlan(src=src, dst=dst, options=options, items=tuple(items),
                       problems=tuple(result.problems))


def read_json(path: str) -> dict | None:
    """The JSON object in the file at ``path``; None where there is none to use: no such file,
    not a regular file (a FIFO is never opened), over the validator's bound on a JSON file
    (``MAX_JSON_BYTES``), or not a JSON object. Every config migrate and the low-rank
    extraction read goes through here."""
    try:
        raw = st.read_bounded(path, MAX_JSON_BYTES)
        doc = json.loads(raw.decode("utf-8")) if len(raw) <= MAX_JSON_BYTES else None
    except (OSError, ValueError, RecursionError):
        return None
    return doc if isinstance(doc, dict) else None


# --- the target's state ------------------------------------------------------------------

def _read_marker(target_abs: str) -> dict | None:
    return read_json(os.path.join(target_abs, layout.MIGRATED_MARKER))


def validate_dir(path: str, name: str | None = None) -> tuple[CheckpointDir, Verdict]:
    """Scan and validate the directory ``path`` as one checkpoint (named ``name``)."""
    dirs, _ = scanner.find_checkpoints(path)
    mine = [d for d in dirs if d.path == "."]
    if not mine:
        raise CheckpointFailure(f"{path}: not a checkpoint directory")
    ckpt = mine[0]
    if name is not None:
        ckpt = dataclasses.replace(ckpt, name=name, step=layout.checkpoint_step(name),
                                   tmp_name=layout.is_tmp_checkpoint_name(name))
    return ckpt, validate_checkpoint(ckpt, level=HEADERS, min_age_s=0.0)


def target_state(target_abs: str, digest: str, *, check: bool = True) -> tuple[str, str]:
    """absent | finished | stale | foreign, with a word on why."""
    if not os.path.lexists(target_abs):
        return "absent", ""
    if os.path.islink(target_abs) or not os.path.isdir(target_abs):
        return "foreign", "not a directory"
    try:
        entries = os.listdir(target_abs)
    except OSError as exc:
        return "foreign", f"cannot list it: {exc.strerror or exc}"
    if not entries:
        return "absent", "empty directory"
    marker = _read_marker(target_abs)
    if marker is None:
        return "foreign", "it was not written by ckpt-tools migrate (no marker); not overwriting"
    if marker.get("inputs_digest") != digest:
        return "stale", "the source changed since it was migrated"
    if check:
        try:
            _, verdict = validate_dir(target_abs, os.path.basename(target_abs))
        except (CheckpointFailure, scanner.ScanError) as exc:
            return "stale", str(exc)
        errors = [p for p in verdict.problems if p.is_error]
        if verdict.status != HEALTHY or errors:
            why = f"{errors[0].code}: {errors[0].message}" if errors else verdict.status
            return "stale", f"it no longer validates ({why})"
    return "finished", ""
