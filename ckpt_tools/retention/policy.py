"""Retention policies written as TOML files (docs/retention.md, "The policy file").

```toml
rest = "delete"            # what no tier keeps: "strip" or "delete"
metric = "eval_loss"       # defaults of every tier's keep_best
keep_steps = [500]         # pinned: kept whole whatever the tiers say

[[tier]]
action = "keep"            # kept whole
keep_last = 2
keep_best = 1

[[tier]]
action = "strip"           # training state removed, weights kept
keep_every = 1000
```

A policy file inside a run (``layout.RUN_POLICY``) may only add keeps and pins to the policy
of the command line: its tiers come after the command line's (which decide first), and its
``rest`` may be milder (strip where the command line deletes), never harsher. One that asks for
more is refused, not ignored: ignoring it would drop the keeps and pins its writer asked for.
The caller leaves that run alone and reports the refusal (``RunPolicyRefused``).
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import stat
import tomllib
from dataclasses import dataclass

from .. import layout
from ..durations import BadDuration, parse_duration
from ..errors import ProblemsError
from ..formats.safetensors_header import read_bounded
from ..kinds import RetentionAction
from ..records import Run
from .rules import (DEFAULT_METRIC, REST_ACTIONS, TIER_ACTIONS, Policy, RetentionUsageError,
                    Rules, Tier)

# A policy is a few lines; anything this large is not one.
MAX_POLICY_BYTES = 64 * 1024

_DEFAULT_KEYS = ("metric", "higher_is_better", "keep_without_metric")
_RULE_KEYS = ("keep_last", "keep_best", "keep_every", "keep_within")
_TOP_KEYS = ("rest", "keep_steps", "tier", *_DEFAULT_KEYS)
_TIER_KEYS = ("action", *_RULE_KEYS, *_DEFAULT_KEYS)
# How much each rest action removes: a run's file may not go up this scale.
_HARSHNESS = {RetentionAction.STRIP: 1, RetentionAction.DELETE: 2}


class PolicyError(RetentionUsageError):
    """A policy file that cannot be used: names the file, the key and the cause (exit 2)."""

    def __init__(self, path: str, key: str | None, cause: str):
        where = f"{path}: {key}" if key else path
        super().__init__(f"{where}: {cause}")
        self.path, self.key, self.cause = path, key, cause


class RunPolicyRefused(ProblemsError):
    """A run's own policy file that is unreadable, malformed, or would strip or delete more than
    the command line's policy. Its run is left alone (exit 1)."""

    def __init__(self, path: str, key: str | None, cause: str):
        where = f"{path}: {key}" if key else path
        super().__init__(f"{where}: {cause}; the run is left alone")
        self.path, self.key, self.cause = path, key, cause


@dataclass(frozen=True)
class RunPolicy:
    """What a run's file adds: tiers tried after the command line's, pins, and maybe a milder
    ``rest`` (None: the command line's)."""

    tiers: tuple[Tier, ...] = ()
    rest: RetentionAction | None = None
    keep_steps: frozenset[int] = frozenset()


def load_policy(path: str | os.PathLike) -> Policy:
    """The policy of the file at ``path``; ``PolicyError`` naming the file, key and cause."""
    path = os.fspath(path)
    doc = _read_toml(path, follow_symlinks=True)
    parsed = _parse(doc, path)
    if parsed.rest is None:
        raise PolicyError(path, "rest", 'missing: say what no tier keeps, "strip" or "delete"')
    if not parsed.tiers:
        raise PolicyError(path, "tier", f"no [[tier]]: a policy that would {parsed.rest} "
                          "everything it does not pin is refused")
    return _with_pins(Policy(parsed.tiers, parsed.rest), parsed.keep_steps)


def load_run_policy(path: str | os.PathLike) -> RunPolicy:
    """What the run's own policy file at ``path`` adds: tiers, pins, ``rest``, all optional.
    Never follows a symlink (the file is anyone's who can write the run). Raises
    ``PolicyError``."""
    path = os.fspath(path)
    return _parse(_read_toml(path, follow_symlinks=False), path)


def merge_run_policy(base: Policy, run_file: Policy | RunPolicy | str | os.PathLike) -> Policy:
    """``base`` with what a run's own policy adds: its tiers after the base's (so the base's
    decide first and the run's can only keep what the base would strip or delete), its pins,
    and its ``rest`` where it is milder. Raises ``RunPolicyRefused`` where the file cannot be
    read or parsed, or its ``rest`` is harsher than the base's."""
    if isinstance(run_file, Policy):
        extra = RunPolicy(run_file.tiers, run_file.rest, run_file.pinned_steps)
        where = "the run's policy"
    elif isinstance(run_file, RunPolicy):
        where, extra = "the run's policy", run_file
    else:
        where = os.fspath(run_file)
        try:
            extra = load_run_policy(where)
        except PolicyError as exc:
            raise RunPolicyRefused(exc.path, exc.key, exc.cause) from None
    rest = base.rest
    if extra.rest is not None:
        if _HARSHNESS[extra.rest] > _HARSHNESS[base.rest]:
            raise RunPolicyRefused(where, "rest", f'"{extra.rest}" would remove more than the '
                                   f'policy given ("{base.rest}"): a run\'s file may only keep more')
        rest = extra.rest
    return _with_pins(Policy(base.tiers + extra.tiers, rest), extra.keep_steps)


def policy_for_run(base: Policy, run: Run, storage=None) -> Policy:
    """The policy that applies to ``run``: ``base``, merged with the run's own policy file
    (``layout.RUN_POLICY`` in the run directory) where it has one. ``RunPolicyRefused`` as
    ``merge_run_policy``. ``storage``: the scan's object storage, where the run is in a bucket
    (None: a local path)."""
    if storage is not None:
        return _policy_in_bucket(base, run, storage)
    path = os.path.join(run.root, run.path, layout.RUN_POLICY)
    try:
        os.lstat(path)
    except FileNotFoundError:
        return base
    except OSError as exc:
        raise RunPolicyRefused(path, None, f"cannot read it: {exc.strerror or exc}") from None
    return merge_run_policy(base, path)


def _policy_in_bucket(base: Policy, run: Run, storage) -> Policy:
    """``policy_for_run`` of a run in a bucket: its policy object found in the scan's listing,
    read by ranged reads."""
    run_path = storage.root_path(run.root) + ("" if run.path == "." else f"/{run.path}")
    node = storage.directory(run_path)
    if node is None or layout.RUN_POLICY not in node.files:
        return base
    shown = f"{run.root.rstrip('/')}/{'' if run.path == '.' else run.path + '/'}{layout.RUN_POLICY}"
    try:
        size, read_at = storage.reader(f"{run_path}/{layout.RUN_POLICY}", node.files[layout.RUN_POLICY][0])
        extra = _parse(_loads(read_bounded(shown, MAX_POLICY_BYTES, size, read_at), shown), shown)
    except OSError as exc:
        raise RunPolicyRefused(shown, None, f"cannot read it: {exc.strerror or exc}") from None
    except PolicyError as exc:
        raise RunPolicyRefused(exc.path, exc.key, exc.cause) from None
    return merge_run_policy(base, extra)


def _with_pins(policy: Policy, keep_steps: frozenset[int]) -> Policy:
    """``policy`` with ``keep_steps`` pinned (carried by its first tier's rules)."""
    if not keep_steps:
        return policy
    first, *others = policy.tiers
    rules = dataclasses.replace(first.rules, keep_steps=first.rules.keep_steps | keep_steps)
    return Policy((Tier(rules, first.action), *others), policy.rest)


# --- reading and parsing --------------------------------------------------------------------

def _read_toml(path: str, *, follow_symlinks: bool) -> dict:
    try:
        if not follow_symlinks and stat.S_ISLNK(os.lstat(path).st_mode):
            raise PolicyError(path, None, "a symlink, not followed: a run's policy must be a file "
                              "of the run")
        raw = read_bounded(path, MAX_POLICY_BYTES)
    except PolicyError:
        raise
    except OSError as exc:   # NotRegularFile says what it is instead
        raise PolicyError(path, None, f"cannot read it: {exc.strerror or exc}") from None
    return _loads(raw, path)


def _loads(raw: bytes, path: str) -> dict:
    if len(raw) > MAX_POLICY_BYTES:
        raise PolicyError(path, None, f"larger than {MAX_POLICY_BYTES} bytes: not a policy")
    try:
        return tomllib.loads(raw.decode("utf-8"))
    except UnicodeDecodeError:
        raise PolicyError(path, None, "not UTF-8 text") from None
    except tomllib.TOMLDecodeError as exc:
        raise PolicyError(path, None, f"not TOML: {exc}") from None


def _parse(doc: dict, path: str) -> RunPolicy:
    _known(doc, _TOP_KEYS, path, "")
    defaults = {k: doc[k] for k in _DEFAULT_KEYS if k in doc}
    _metric(defaults.get("metric", DEFAULT_METRIC), path, "metric")
    for flag in ("higher_is_better", "keep_without_metric"):
        _flag(defaults, flag, False, path, flag)
    rest = None
    if "rest" in doc:
        rest = _action(doc["rest"], REST_ACTIONS, path, "rest")
    keep_steps = _steps(doc.get("keep_steps", []), path)
    tiers = doc.get("tier", [])
    if not isinstance(tiers, list) or not all(isinstance(t, dict) for t in tiers):
        raise PolicyError(path, "tier", "must be tables written [[tier]]")
    parsed = tuple(_tier(t, defaults, path, f"tier[{i}]") for i, t in enumerate(tiers, 1))
    return RunPolicy(parsed, rest, keep_steps)


def _tier(table: dict, defaults: dict, path: str, where: str) -> Tier:
    _known(table, _TIER_KEYS, path, where + ".")
    if "action" not in table:
        raise PolicyError(path, f"{where}.action", 'missing: "keep" (whole) or "strip"')
    action = _action(table["action"], TIER_ACTIONS, path, f"{where}.action")
    values = defaults | {k: v for k, v in table.items() if k != "action"}
    if not any(k in values for k in _RULE_KEYS):
        raise PolicyError(path, where, "no rule: give keep_last, keep_best, keep_every or keep_within")

    def shown(key: str) -> str:   # the key as the file spells it: in the tier, or at the top
        return f"{where}.{key}" if key in table else key

    rules = Rules(
        keep_last=_count(values, "keep_last", 0, path, where),
        keep_best=_count(values, "keep_best", 0, path, where),
        metric=_metric(values.get("metric", DEFAULT_METRIC), path, shown("metric")),
        higher_is_better=_flag(values, "higher_is_better", False, path, shown("higher_is_better")),
        keep_without_metric=_flag(values, "keep_without_metric", True, path,
                                  shown("keep_without_metric")),
        keep_every=_count(values, "keep_every", None, path, where, least=1),
        keep_within=_within(values.get("keep_within"), path, f"{where}.keep_within"))
    if not rules.keeps_anything:
        raise PolicyError(path, where, "its rules keep nothing (every count is 0)")
    return Tier(rules, action)


def _known(table: dict, keys: tuple[str, ...], path: str, prefix: str) -> None:
    for key in table:
        if key not in keys:
            near = difflib.get_close_matches(key, keys, n=1)
            hint = f" (did you mean {near[0]}?)" if near else f"; known keys: {', '.join(keys)}"
            raise PolicyError(path, prefix + key, f"unknown key{hint}")


def _action(value, allowed, path: str, key: str) -> RetentionAction:
    if isinstance(value, str) and value in [str(a) for a in allowed]:
        return RetentionAction(value)
    names = " or ".join(f'"{a}"' for a in allowed)
    return _fail(path, key, f"must be {names}, not {_shown(value)}")


def _count(values: dict, key: str, default, path: str, where: str, least: int = 0):
    if key not in values:
        return default
    value = values[key]
    if isinstance(value, bool) or not isinstance(value, int) or value < least:
        unit = "steps" if key == "keep_every" else "checkpoints"
        _fail(path, f"{where}.{key}",
              f"must be a whole number of {unit} ({least} or more), not {_shown(value)}")
    return value


def _flag(values: dict, key: str, default: bool, path: str, shown_key: str) -> bool:
    value = values.get(key, default)
    if not isinstance(value, bool):
        _fail(path, shown_key, f"must be true or false, not {_shown(value)}")
    return value


def _metric(value, path: str, key: str) -> str:
    if not isinstance(value, str) or not value:
        _fail(path, key, f'must be the name of a logged metric such as "eval_loss", not {_shown(value)}')
    return value


def _within(value, path: str, key: str) -> float | None:
    """A duration as ``--min-age`` takes it ("7d", "36h") or a number of seconds."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        _fail(path, key, f"must be a duration like \"7d\" or a number of seconds, not {_shown(value)}")
    try:   # the command line's own rule, so both refuse the same values
        return parse_duration(str(value))
    except BadDuration as exc:
        return _fail(path, key, str(exc))


def _steps(value, path: str) -> frozenset[int]:
    if not isinstance(value, list) or any(isinstance(s, bool) or not isinstance(s, int) or s < 0
                                          for s in value):
        _fail(path, "keep_steps",
              f"must be a list of step numbers like [500, 1000], not {_shown(value)}")
    return frozenset(value)


def _shown(value) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _fail(path: str, key: str, cause: str):
    raise PolicyError(path, key, cause)
