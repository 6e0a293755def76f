"""Retention rules, pins, reasons and the policy file (``ckpt_tools.retention.rules`` / ``.policy``).

Every run here is written to disk and scanned by ``api.scan``: tiny full-model checkpoints (a
``config.json`` and a real safetensors header), each with the ``trainer_state.json`` the Trainer
would have written at its step (the log history so far, eval metrics included), and file times
set from one fixed clock so that ages and ``keep_within`` are exact.
"""

from __future__ import annotations

import json
import os
import re
import struct
import subprocess
import sys
from pathlib import Path

import pytest

from ckpt_tools import api
from ckpt_tools.errors import ProblemsError, UsageError
from ckpt_tools.kinds import RetentionAction
from ckpt_tools.layout import KEEP_FILE, RUN_POLICY
from ckpt_tools.retention.policy import (PolicyError, RunPolicyRefused, load_policy,
                                         merge_run_policy, policy_for_run)
from ckpt_tools.retention.rules import (Policy, RetentionUsageError, Rules, Tier, decide,
                                        format_duration, link_index)

KEEP, STRIP, DELETE = RetentionAction.KEEP, RetentionAction.STRIP, RetentionAction.DELETE
NOW = 1_700_000_000.0
HOUR, DAY = 3600, 86400
STEPS = tuple(range(100, 1300, 100))       # 100 … 1200: checkpoint-1000 sorts after checkpoint-900
# eval_loss at each step: the best are 500 (1.5), 800 (1.6), then 400 (1.9)
LOSSES = {100: 3.0, 200: 2.5, 300: 2.2, 400: 1.9, 500: 1.5, 600: 2.0, 700: 2.1, 800: 1.6,
          900: 2.3, 1000: 2.4, 1100: 2.6, 1200: 2.7}


# --- writing and scanning runs ------------------------------------------------------------

def write_safetensors(path: Path, tensors: dict[str, list[int]]) -> None:
    header, offset = {}, 0
    for name, shape in tensors.items():
        size = 4
        for d in shape:
            size *= d
        header[name] = {"dtype": "F32", "shape": shape, "data_offsets": [offset, offset + size]}
        offset += size
    raw = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + b"\0" * offset)


def write_run(root: Path, steps=STEPS, *, evals: dict[int, dict] | None = None, best: int | None = None,
              ages: dict[int, float] | None = None, broken=(), legacy=(), in_progress=(),
              name: str = "run") -> Path:
    """A Trainer run of full-model checkpoints at ``steps`` (eval metrics ``evals`` by step,
    best_model_checkpoint ``best`` recorded under the path of training time). Each checkpoint's
    files are ``ages[step]`` seconds old (default: a day apart, the newest a day old)."""
    evals = {s: {"eval_loss": v} for s, v in LOSSES.items()} if evals is None else evals
    run = root / name
    newest = max(steps)
    for step in steps:
        dirname = f"tmp-checkpoint-{step}" if step in in_progress else f"checkpoint-{step}"
        ckpt = run / dirname
        ckpt.mkdir(parents=True)
        if step in legacy:   # DyLoRA-MoE merged weights without a PEFT tree (SPEC §3, V1)
            write_safetensors(ckpt / "model.safetensors", {
                "foundation_model.base_model.model.layer.q_proj.base_layer.weight": [2, 2],
                "foundation_model.base_model.model.layer.q_proj.lora_A.expert_0.weight": [1, 2],
                "foundation_model.base_model.model.layer.q_proj.lora_B.expert_0.weight": [2, 1],
                "router.gate.weight": [1, 2]})
        elif step in broken:   # a header that runs past the end of the file
            (ckpt / "model.safetensors").write_bytes(b"\x40\0\0\0\0\0\0\0{}")
            (ckpt / "config.json").write_text('{"architectures": ["LlamaForCausalLM"]}')
        elif step in in_progress:   # what the Trainer has written so far
            (ckpt / "config.json").write_text('{"architectures": ["LlamaForCausalLM"]}')
        else:
            write_safetensors(ckpt / "model.safetensors", {"lm_head.weight": [2, 2]})
            (ckpt / "config.json").write_text('{"architectures": ["LlamaForCausalLM"]}')
            (ckpt / "optimizer.pt").write_bytes(b"\0" * 64)
        history = [{"step": s, **m} for s, m in sorted(evals.items()) if s <= step]
        state = {"global_step": step, "log_history": history,
                 "best_model_checkpoint": None if best is None else f"/scratch/old/run/checkpoint-{best}"}
        if step not in in_progress:
            (ckpt / "trainer_state.json").write_text(json.dumps(state))
        age = (ages or {}).get(step, DAY + (newest - step) // 100 * DAY)
        set_age(ckpt, age)
    return run


def set_age(ckpt: Path, age: float) -> None:
    for f in ckpt.rglob("*"):
        if f.is_file() and not f.is_symlink():
            os.utime(f, (NOW - age, NOW - age))


def scan_runs(root: Path, *, min_age_s: float = HOUR):
    return api.scan(str(root), now=NOW, min_age_s=min_age_s)


def scan_run(root: Path, **kw):
    (run,) = scan_runs(root, **kw).runs
    return run


def table(decisions) -> dict[str, tuple[str, tuple[str, ...]]]:
    """checkpoint name → (action, reasons), in the order decide gave them."""
    return {d.path.rsplit("/", 1)[-1]: (str(d.action), d.reasons) for d in decisions}


def decide_on(root: Path, policy: Policy, *, min_age_s: float = HOUR, **kw):
    result = scan_runs(root, min_age_s=min_age_s, **kw)
    (run,) = result.runs
    return table(decide(run, policy, now=NOW, min_age_s=min_age_s, links=link_index(result.checkpoints)))


def one_tier(action=DELETE, **rules) -> Policy:
    return Policy.from_flags(Rules(**rules), action)


def deleted(step):
    return ("delete", ("not kept by any rule",))


@pytest.fixture
def run_root(tmp_path) -> Path:
    write_run(tmp_path / "root")
    return tmp_path / "root"


# --- each rule alone, and their union --------------------------------------------------------

NEWEST = "pinned: newest"

RULE_CASES = {
    "keep_last": (dict(keep_last=2), {
        1200: ("keep", ("last #1", NEWEST)), 1100: ("keep", ("last #2",))}),
    "keep_best": (dict(keep_best=2), {
        500: ("keep", ("best eval_loss #1 (1.5)",)), 800: ("keep", ("best eval_loss #2 (1.6)",)),
        1200: ("keep", (NEWEST,))}),
    "keep_every": (dict(keep_every=500), {
        500: ("keep", ("every 500",)), 1000: ("keep", ("every 500",)), 1200: ("keep", (NEWEST,))}),
    # a day apart, the newest a day old: within 2d of the newest are the newest three
    "keep_within": (dict(keep_within=2 * DAY), {
        1200: ("keep", ("within 2d", NEWEST)), 1100: ("keep", ("within 2d",)),
        1000: ("keep", ("within 2d",))}),
    "union": (dict(keep_last=1, keep_best=1, keep_every=400), {
        1200: ("keep", ("last #1", "every 400", NEWEST)), 500: ("keep", ("best eval_loss #1 (1.5)",)),
        400: ("keep", ("every 400",)), 800: ("keep", ("every 400",))}),
    "union, every reason of one checkpoint": (dict(keep_last=1, keep_every=600, keep_within=0), {
        1200: ("keep", ("last #1", "every 600", "within 0s", NEWEST)), 600: ("keep", ("every 600",))}),
}


@pytest.mark.parametrize("name", RULE_CASES)
def test_each_rule_and_their_union_keep_exactly_these_with_their_reasons(run_root, name):
    rules, kept = RULE_CASES[name]
    found = decide_on(run_root, one_tier(**rules))
    expected = {f"checkpoint-{s}": kept.get(s, deleted(s)) for s in STEPS}
    assert found == expected
    # steps in numeric order: checkpoint-1000 after checkpoint-900
    assert list(found) == [f"checkpoint-{s}" for s in STEPS]


def test_strip_is_what_the_rest_gets_when_asked(run_root):
    found = decide_on(run_root, one_tier(STRIP, keep_last=1))
    assert {n for n, (a, _) in found.items() if a == "strip"} == {f"checkpoint-{s}" for s in STEPS[:-1]}
    assert found["checkpoint-1200"] == ("keep", ("last #1", NEWEST))


def test_higher_is_better_ranks_the_largest_first(tmp_path):
    accuracy = {s: {"eval_accuracy": v} for s, v in {100: 0.5, 200: 0.9, 300: 0.7, 400: 0.8}.items()}
    write_run(tmp_path, (100, 200, 300, 400, 500), evals=accuracy)
    found = decide_on(tmp_path, one_tier(keep_best=2, metric="eval_accuracy", higher_is_better=True,
                                          keep_without_metric=False))
    assert found == {"checkpoint-100": deleted(100),
                     "checkpoint-200": ("keep", ("best eval_accuracy #1 (0.9)",)),
                     "checkpoint-300": deleted(300),
                     "checkpoint-400": ("keep", ("best eval_accuracy #2 (0.8)",)),
                     "checkpoint-500": ("keep", (NEWEST,))}


def test_a_checkpoint_without_the_metric_at_its_step_is_kept_unless_told_otherwise(tmp_path):
    # evals at 100 and 300 only; 200's last eval (100) judged other weights
    write_run(tmp_path, (100, 200, 300, 400), evals={100: {"eval_loss": 2.0}, 300: {"eval_loss": 1.0}})
    found = decide_on(tmp_path, one_tier(keep_best=1))
    assert found == {"checkpoint-100": deleted(100),
                     "checkpoint-200": ("keep", ("no eval_loss: kept",)),
                     "checkpoint-300": ("keep", ("best eval_loss #1 (1)",)),
                     "checkpoint-400": ("keep", ("no eval_loss: kept", NEWEST))}
    strict = decide_on(tmp_path, one_tier(keep_best=1, keep_without_metric=False))
    assert strict["checkpoint-200"] == deleted(200)
    assert strict["checkpoint-400"] == ("keep", (NEWEST,))


def test_an_eval_of_other_metrics_at_its_step_is_no_eval_of_this_one(tmp_path):
    write_run(tmp_path, (100, 200, 300), evals={100: {"eval_loss": 2.0}, 200: {"eval_accuracy": 0.5}})
    found = decide_on(tmp_path, one_tier(keep_best=1))
    assert found["checkpoint-200"] == ("keep", ("no eval_loss: kept",))


def test_a_metric_never_logged_keeps_everything_or_only_the_pins(tmp_path):
    write_run(tmp_path, (100, 200, 300), evals={})
    found = decide_on(tmp_path, one_tier(keep_best=1, metric="eval_bleu"))
    assert {a for a, _ in found.values()} == {"keep"}
    assert all("no eval_bleu: kept" in r for _, r in found.values())
    strict = decide_on(tmp_path, one_tier(keep_best=1, metric="eval_bleu", keep_without_metric=False))
    assert [a for a, _ in strict.values()] == ["delete", "delete", "keep"]


def test_a_metric_logged_as_nan_is_never_best_and_no_reason_to_keep(tmp_path):
    write_run(tmp_path, (100, 200, 300), evals={100: {"eval_loss": float("nan")}, 200: {"eval_loss": 3.0}})
    found = decide_on(tmp_path, one_tier(keep_best=1, keep_without_metric=False))
    assert found["checkpoint-100"] == deleted(100)
    assert found["checkpoint-200"] == ("keep", ("best eval_loss #1 (3)",))


def test_equal_metrics_rank_the_earlier_step_first_as_the_trainer_does(tmp_path):
    write_run(tmp_path, (100, 200, 300), evals={s: {"eval_loss": 1.25} for s in (100, 200, 300)})
    found = decide_on(tmp_path, one_tier(keep_best=1))
    assert found["checkpoint-100"] == ("keep", ("best eval_loss #1 (1.25)",))
    assert found["checkpoint-200"] == deleted(200)


def test_keep_within_is_measured_from_the_newest_checkpoint_not_from_now(tmp_path):
    # a run that stopped a year ago still keeps its last days
    ages = {100: 400 * DAY, 200: 366 * DAY, 300: 365 * DAY}
    write_run(tmp_path, (100, 200, 300), ages=ages)
    found = decide_on(tmp_path, one_tier(keep_within=1 * DAY))
    assert found == {"checkpoint-100": deleted(100), "checkpoint-200": ("keep", ("within 1d",)),
                     "checkpoint-300": ("keep", ("within 1d", NEWEST))}


def test_ranks_count_complete_checkpoints_only(tmp_path):
    """keep-last 2 keeps two usable checkpoints though the newest save is being written and the
    one before it is broken; keep-best passes over a broken best."""
    write_run(tmp_path, (100, 200, 300, 400, 500), broken=(400,), in_progress=(500,),
              evals={100: {"eval_loss": 2.0}, 200: {"eval_loss": 3.0}, 300: {"eval_loss": 2.5},
                     400: {"eval_loss": 0.5}})
    found = decide_on(tmp_path, one_tier(keep_last=2))
    assert found == {"checkpoint-100": deleted(100), "checkpoint-200": ("keep", ("last #2",)),
                     "checkpoint-300": ("keep", ("last #1", NEWEST)),
                     "checkpoint-400": ("keep", ("pinned: broken",)),
                     "tmp-checkpoint-500": ("keep", ("pinned: in-progress",))}
    best = decide_on(tmp_path, one_tier(keep_best=1, keep_without_metric=False))
    assert best["checkpoint-100"] == ("keep", ("best eval_loss #1 (2)",))


# --- pins --------------------------------------------------------------------------------

def test_the_newest_complete_checkpoint_is_pinned_when_no_rule_keeps_it(tmp_path):
    write_run(tmp_path, (100, 200, 300), broken=(300,))
    found = decide_on(tmp_path, one_tier(keep_every=100_000))
    assert found == {"checkpoint-100": deleted(100), "checkpoint-200": ("keep", (NEWEST,)),
                     "checkpoint-300": ("keep", ("pinned: broken",))}


def test_the_best_model_checkpoint_is_pinned_by_its_name_in_the_run(tmp_path):
    write_run(tmp_path, (100, 200, 300), best=100)
    found = decide_on(tmp_path, one_tier(keep_last=1))
    assert found["checkpoint-100"] == ("keep", ("pinned: best_model_checkpoint",))
    assert found["checkpoint-200"] == deleted(200)


def test_in_progress_broken_and_legacy_are_pinned(tmp_path):
    write_run(tmp_path, (100, 200, 300, 400, 500), legacy=(100,), broken=(200,), in_progress=(500,))
    found = decide_on(tmp_path, one_tier(keep_last=1))
    assert found == {"checkpoint-100": ("keep", ("pinned: legacy",)),
                     "checkpoint-200": ("keep", ("pinned: broken",)),
                     "checkpoint-300": deleted(300),
                     "checkpoint-400": ("keep", ("last #1", NEWEST)),
                     "tmp-checkpoint-500": ("keep", ("pinned: in-progress",))}


def test_a_checkpoint_younger_than_the_minimum_age_is_pinned(tmp_path):
    write_run(tmp_path, (100, 200, 300, 400))
    os.utime(tmp_path / "run" / "checkpoint-200" / "optimizer.pt", (NOW - 60, NOW - 60))
    found = decide_on(tmp_path, one_tier(keep_last=1))
    assert found["checkpoint-200"] == ("keep", ("pinned: fresh",))
    assert found["checkpoint-100"] == deleted(100)
    # decide's own clock pins it as well where the scan was given no minimum age
    result = scan_runs(tmp_path, min_age_s=0)
    assert not any(c.fresh for c in result.checkpoints)
    again = table(decide(result.runs[0], one_tier(keep_last=1), now=NOW, min_age_s=HOUR))
    assert again["checkpoint-200"] == ("keep", ("pinned: fresh",))
    assert table(decide(result.runs[0], one_tier(keep_last=1), now=NOW, min_age_s=0))["checkpoint-200"] \
        == deleted(200)


def test_a_hard_link_between_two_checkpoints_pins_both(tmp_path):
    run = write_run(tmp_path, (100, 200, 300, 400))
    os.link(run / "checkpoint-100" / "optimizer.pt", run / "checkpoint-200" / "optimizer-copy.pt")
    found = decide_on(tmp_path, one_tier(keep_last=1))
    assert found["checkpoint-100"] == ("keep", ("pinned: linked",))
    assert found["checkpoint-200"] == ("keep", ("pinned: linked",))
    assert found["checkpoint-300"] == deleted(300)


def test_a_hard_link_within_one_checkpoint_pins_nothing(tmp_path):
    run = write_run(tmp_path, (100, 200))
    os.link(run / "checkpoint-100" / "optimizer.pt", run / "checkpoint-100" / "optimizer-copy.pt")
    assert decide_on(tmp_path, one_tier(keep_last=1))["checkpoint-100"] == deleted(100)


def test_a_hard_link_from_another_run_is_seen_through_the_scans_link_index(tmp_path):
    write_run(tmp_path, (100, 200), name="a")
    other = write_run(tmp_path, (100,), name="b")
    os.link(tmp_path / "a" / "checkpoint-100" / "optimizer.pt", other / "checkpoint-100" / "shared.pt")
    result = scan_runs(tmp_path)
    run_a = next(r for r in result.runs if r.path == "a")
    with_scan = table(decide(run_a, one_tier(keep_last=1), now=NOW, min_age_s=HOUR,
                             links=link_index(result.checkpoints)))
    assert with_scan["checkpoint-100"] == ("keep", ("pinned: linked",))
    # without the scan's index only links within the run are seen
    alone = table(decide(run_a, one_tier(keep_last=1), now=NOW, min_age_s=HOUR))
    assert alone["checkpoint-100"] == deleted(100)


@pytest.mark.parametrize("relative", [False, True], ids=["absolute root", "relative root"])
def test_a_symlink_into_another_checkpoint_pins_its_target(tmp_path, monkeypatch, relative):
    run = write_run(tmp_path / "root", (100, 200, 300))
    (run / "checkpoint-200" / "model.safetensors").unlink()
    link = run / "checkpoint-200" / "model.safetensors"
    link.symlink_to("../checkpoint-100/model.safetensors")
    os.utime(link, (NOW - DAY, NOW - DAY), follow_symlinks=False)   # not fresh itself
    monkeypatch.chdir(tmp_path)
    found = decide_on(Path("root") if relative else tmp_path / "root", one_tier(keep_last=1))
    assert found["checkpoint-100"] == ("keep", ("pinned: linked",))
    assert found["checkpoint-200"] == deleted(200)   # nothing links into it


def test_a_symlink_within_one_checkpoint_pins_nothing(tmp_path):
    run = write_run(tmp_path, (100, 200))
    link = run / "checkpoint-100" / "alias.safetensors"
    link.symlink_to("model.safetensors")
    os.utime(link, (NOW - DAY, NOW - DAY), follow_symlinks=False)
    assert decide_on(tmp_path, one_tier(keep_last=1))["checkpoint-100"] == deleted(100)


def test_user_pins_by_step_and_by_keep_file(tmp_path):
    run = write_run(tmp_path, (100, 200, 300, 400))
    (run / "checkpoint-200" / KEEP_FILE).write_text("")
    set_age(run / "checkpoint-200", 3 * DAY)
    found = decide_on(tmp_path, one_tier(keep_last=1, keep_steps={100}))
    assert found == {"checkpoint-100": ("keep", ("pinned: user",)),
                     "checkpoint-200": ("keep", ("pinned: user",)),
                     "checkpoint-300": deleted(300),
                     "checkpoint-400": ("keep", ("last #1", NEWEST))}


def test_save_model_outputs_without_a_step_are_never_decided_on(tmp_path):
    run = write_run(tmp_path, (100, 200))
    final = run / "final"
    final.mkdir()
    write_safetensors(final / "model.safetensors", {"lm_head.weight": [2, 2]})
    (final / "config.json").write_text('{"architectures": ["LlamaForCausalLM"]}')
    set_age(final, 10 * DAY)
    result = scan_runs(tmp_path)
    assert any(c.path == "run/final" for c in result.checkpoints)
    assert list(decide_on(tmp_path, one_tier(keep_last=1))) == ["checkpoint-100", "checkpoint-200"]


def test_a_run_of_only_pinned_checkpoints_deletes_nothing(tmp_path):
    write_run(tmp_path, (100, 200), broken=(100, 200))
    assert {a for a, _ in decide_on(tmp_path, one_tier(keep_last=1)).values()} == {"keep"}


# --- tiers ---------------------------------------------------------------------------------

def test_tiers_the_first_that_keeps_decides_and_pins_stay_whole(tmp_path):
    write_run(tmp_path, best=500)
    policy = Policy((Tier(Rules(keep_last=3), KEEP), Tier(Rules(keep_every=500), STRIP)), DELETE)
    found = decide_on(tmp_path, policy)
    expected = {f"checkpoint-{s}": deleted(s) for s in STEPS}
    expected |= {"checkpoint-1200": ("keep", ("last #1", NEWEST)),
                 "checkpoint-1100": ("keep", ("last #2",)),
                 "checkpoint-1000": ("keep", ("last #3", "every 500")),   # the first tier decides
                 "checkpoint-500": ("keep", ("every 500", "pinned: best_model_checkpoint"))}
    assert found == expected
    strip = Policy((Tier(Rules(keep_last=1), KEEP), Tier(Rules(keep_every=500), STRIP)), DELETE)
    assert decide_on(tmp_path, strip)["checkpoint-1000"] == ("strip", ("every 500",))


# --- usage errors ----------------------------------------------------------------------------

@pytest.mark.parametrize("rules, action, says", [
    (Rules(keep_last=2), None, "needs an action"),
    (Rules(), "delete", "delete needs a rule: give keep_last"),
    (Rules(), "strip", "strip needs a rule: give keep_last"),
    (Rules(keep_steps={100}), None, "keep_steps pins"),
    (Rules(keep_steps={100}), "delete", "delete needs a rule"),
    (Rules(keep_last=1), "keep", "must be strip or delete"),
])
def test_an_action_without_a_rule_or_a_rule_without_an_action_is_a_usage_error(rules, action, says):
    with pytest.raises(RetentionUsageError) as caught:
        Policy.from_flags(rules, action)
    assert says in str(caught.value) and "\n" not in str(caught.value)
    assert "--" not in str(caught.value)   # the Python API speaks of arguments, not flags
    assert caught.value.exit_code == 2 and isinstance(caught.value, UsageError)


def test_no_rule_and_no_action_is_no_policy():
    assert Policy.from_flags(Rules(), None) is None


@pytest.mark.parametrize("make, says", [
    (lambda: Rules(keep_last=-1), "keep_last"),
    (lambda: Rules(keep_best=True), "keep_best"),
    (lambda: Rules(keep_every=0), "keep_every"),
    (lambda: Rules(keep_within=float("nan")), "keep_within"),
    (lambda: Rules(metric=""), "metric"),
    (lambda: Tier(Rules(keep_last=1), DELETE), "must be keep or strip"),
    (lambda: Tier(Rules(keep_steps={1}), KEEP), "has no rule"),
    (lambda: Policy((), DELETE), "needs a rule"),
])
def test_rules_and_tiers_refuse_what_means_nothing(make, says):
    with pytest.raises(RetentionUsageError, match=says):
        make()


def test_durations_are_shown_as_people_write_them():
    assert [format_duration(s) for s in (7 * DAY, 36 * HOUR, 90 * 60, 45, 1.5)] == \
        ["7d", "36h", "90m", "45s", "1.5s"]


# --- the policy file ---------------------------------------------------------------------------

GOOD_POLICY = """\
rest = "delete"
metric = "eval_loss"
keep_steps = [300]

[[tier]]
action = "keep"
keep_last = 2
keep_best = 1

[[tier]]
action = "strip"
keep_every = 500
keep_within = "3d"
metric = "eval_accuracy"
higher_is_better = true
"""


def write_policy(tmp_path: Path, text: str, name: str = "retention.toml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def test_a_good_policy_file_reads_as_the_policy_it_says(tmp_path):
    policy = load_policy(write_policy(tmp_path, GOOD_POLICY))
    assert policy == Policy((Tier(Rules(keep_last=2, keep_best=1, keep_steps={300}), KEEP),
                             Tier(Rules(keep_every=500, keep_within=3 * DAY, metric="eval_accuracy",
                                        higher_is_better=True), STRIP)), DELETE)


def test_a_policy_file_decides_like_the_same_policy_built_in_code(tmp_path):
    write_run(tmp_path / "root")
    policy = load_policy(write_policy(tmp_path, GOOD_POLICY))
    found = decide_on(tmp_path / "root", policy)
    assert found["checkpoint-300"] == ("keep", ("pinned: user",))
    assert found["checkpoint-500"] == ("keep", ("best eval_loss #1 (1.5)", "every 500"))
    assert found["checkpoint-1000"] == ("strip", ("every 500", "within 3d"))
    assert found["checkpoint-900"] == ("strip", ("within 3d",))
    assert found["checkpoint-800"] == deleted(800)


BAD_POLICIES = [
    ('rest = "delete"\nkeep_lats = 2\n[[tier]]\naction = "keep"\nkeep_last = 1\n', "keep_lats",
     "unknown key"),
    ('rest = "delete"\n[[tier]]\naction = "keep"\nkeep_lst = 1\n', "tier[1].keep_lst", "did you mean keep_last"),
    ('[[tier]]\naction = "keep"\nkeep_last = 1\n', "rest", "missing"),
    ('rest = "keep"\n[[tier]]\naction = "keep"\nkeep_last = 1\n', "rest", 'must be "strip" or "delete"'),
    ('rest = "delete"\n', "tier", "no [[tier]]"),
    ('rest = "delete"\ntier = 3\n', "tier", "[[tier]]"),
    ('rest = "delete"\n[[tier]]\nkeep_last = 1\n', "tier[1].action", "missing"),
    ('rest = "delete"\n[[tier]]\naction = "delete"\nkeep_last = 1\n', "tier[1].action",
     'must be "keep" or "strip"'),
    ('rest = "delete"\n[[tier]]\naction = "keep"\n', "tier[1]", "no rule"),
    ('rest = "delete"\n[[tier]]\naction = "keep"\nkeep_last = 0\n', "tier[1]", "keep nothing"),
    ('rest = "delete"\n[[tier]]\naction = "keep"\nkeep_last = -1\n', "tier[1].keep_last", "whole number"),
    ('rest = "delete"\n[[tier]]\naction = "keep"\nkeep_last = "2"\n', "tier[1].keep_last", "whole number"),
    ('rest = "delete"\n[[tier]]\naction = "keep"\nkeep_last = true\n', "tier[1].keep_last", "whole number"),
    ('rest = "delete"\n[[tier]]\naction = "keep"\nkeep_best = 1.5\n', "tier[1].keep_best", "whole number"),
    ('rest = "delete"\n[[tier]]\naction = "keep"\nkeep_every = 0\n', "tier[1].keep_every", "1 or more"),
    ('rest = "delete"\n[[tier]]\naction = "keep"\nkeep_within = "soon"\n', "tier[1].keep_within",
     "not a duration"),
    ('rest = "delete"\n[[tier]]\naction = "keep"\nkeep_within = -5\n', "tier[1].keep_within", "negative"),
    ('rest = "delete"\n[[tier]]\naction = "keep"\nkeep_within = [1]\n', "tier[1].keep_within", "duration"),
    ('rest = "delete"\nmetric = ""\n[[tier]]\naction = "keep"\nkeep_best = 1\n', "metric", "name"),
    ('rest = "delete"\n[[tier]]\naction = "keep"\nkeep_best = 1\nhigher_is_better = "yes"\n',
     "tier[1].higher_is_better", "true or false"),
    ('rest = "delete"\nkeep_steps = 300\n[[tier]]\naction = "keep"\nkeep_last = 1\n', "keep_steps", "list"),
    ('rest = "delete"\nkeep_steps = [-1]\n[[tier]]\naction = "keep"\nkeep_last = 1\n', "keep_steps", "list"),
    ('rest = delete\n', None, "not TOML"),
]


@pytest.mark.parametrize("text, key, says", BAD_POLICIES, ids=[f"{k}:{s}" for _, k, s in BAD_POLICIES])
def test_a_bad_policy_file_is_one_line_naming_the_file_the_key_and_the_cause(tmp_path, text, key, says):
    path = write_policy(tmp_path, text)
    with pytest.raises(PolicyError) as caught:
        load_policy(path)
    message = str(caught.value)
    assert message.startswith(f"{path}: ") and "\n" not in message
    assert says in message
    if key is not None:
        assert message.startswith(f"{path}: {key}: ") and caught.value.key == key
    assert caught.value.exit_code == 2


@pytest.mark.parametrize("make, says", [
    (lambda p: p, "No such file"),
    (lambda p: (p.mkdir(), p)[1], "directory"),
    (lambda p: (os.mkfifo(p), p)[1], "FIFO"),
    (lambda p: (p.write_bytes(b"#" * (65 * 1024)), p)[1], "larger than"),
    (lambda p: (p.write_bytes(b"rest = \"\xff\"\n"), p)[1], "UTF-8"),
])
def test_a_policy_path_that_is_not_a_small_text_file_is_refused_without_blocking(tmp_path, make, says):
    path = make(tmp_path / "retention.toml")
    with pytest.raises(PolicyError, match=says) as caught:
        load_policy(path)
    assert str(caught.value).startswith(str(path))


# --- a run's own policy file --------------------------------------------------------------------

BASE = Policy((Tier(Rules(keep_last=1), KEEP),), DELETE)


def test_a_runs_policy_adds_tiers_after_the_base_and_pins(tmp_path):
    path = write_policy(tmp_path, 'keep_steps = [100]\nrest = "strip"\n[[tier]]\naction = "keep"\n'
                                  'keep_every = 300\n', RUN_POLICY)
    merged = merge_run_policy(BASE, path)
    assert merged.tiers[0].rules.keep_last == 1 and merged.tiers[1].rules.keep_every == 300
    assert merged.pinned_steps == {100} and merged.rest == STRIP


def test_a_runs_policy_that_would_remove_more_is_refused_and_says_so(tmp_path):
    base = Policy((Tier(Rules(keep_last=1), KEEP),), STRIP)
    path = write_policy(tmp_path, 'rest = "delete"\n', RUN_POLICY)
    with pytest.raises(RunPolicyRefused) as caught:
        merge_run_policy(base, path)
    assert str(caught.value).startswith(f"{path}: rest: ") and "left alone" in str(caught.value)
    assert caught.value.exit_code == 1 and isinstance(caught.value, ProblemsError)


@pytest.mark.parametrize("text", ['rest = "purge"\n', "[[tier]]\naction = 'keep'\n", "x = ", 'keep_lst = 1\n'])
def test_a_malformed_runs_policy_is_refused_not_ignored(tmp_path, text):
    path = write_policy(tmp_path, text, RUN_POLICY)
    with pytest.raises(RunPolicyRefused, match=re.escape(str(path))):
        merge_run_policy(BASE, path)


def test_a_runs_policy_that_is_a_symlink_is_not_followed(tmp_path):
    target = write_policy(tmp_path, 'keep_steps = [1]\n', "elsewhere.toml")
    (tmp_path / RUN_POLICY).symlink_to(target)
    with pytest.raises(RunPolicyRefused, match="symlink"):
        merge_run_policy(BASE, tmp_path / RUN_POLICY)


HARSHNESS = {"keep": 0, "strip": 1, "delete": 2}
RUN_FILES = ['keep_steps = [200]\n', 'rest = "strip"\n',
             '[[tier]]\naction = "strip"\nkeep_every = 200\n',
             '[[tier]]\naction = "keep"\nkeep_best = 1\nkeep_without_metric = false\n',
             'rest = "delete"\n[[tier]]\naction = "strip"\nkeep_last = 12\n']


@pytest.mark.parametrize("text", RUN_FILES)
@pytest.mark.parametrize("base", [BASE, Policy((Tier(Rules(keep_last=3), KEEP),
                                               Tier(Rules(keep_every=400), STRIP)), DELETE)])
def test_a_runs_policy_never_strips_or_deletes_more_than_the_base(tmp_path, base, text):
    root = tmp_path / "root"
    run_dir = write_run(root, best=None)
    write_policy(run_dir, text, RUN_POLICY)
    run = scan_run(root)
    merged = policy_for_run(base, run)
    before = table(decide(run, base, now=NOW, min_age_s=HOUR))
    after = table(decide(run, merged, now=NOW, min_age_s=HOUR))
    assert all(HARSHNESS[after[n][0]] <= HARSHNESS[before[n][0]] for n in before)
    assert after != before   # each file here keeps something more


def test_a_run_without_its_own_policy_gets_the_base(run_root):
    assert policy_for_run(BASE, scan_run(run_root)) is BASE


def test_the_rules_and_the_policy_file_never_import_torch(tmp_path):
    path = write_policy(tmp_path, GOOD_POLICY)
    code = ("import sys; from ckpt_tools.retention import rules, policy; "
            f"policy.load_policy({str(path)!r}); print('torch' in sys.modules)")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.stdout.strip() == "False", proc.stderr


def test_the_worked_example_of_the_docs_is_what_decide_gives(tmp_path):
    """docs/retention.md's example: its policy file, on the run it describes, decides exactly
    the lines it shows."""
    doc = (Path(__file__).resolve().parents[1] / "docs" / "retention.md").read_text()
    example = doc[doc.index("## A worked example"):]
    policy_text = re.search(r"```toml\n(.*?)```", example, re.S).group(1)
    shown = re.search(r"The decisions.*?```\n(.*?)```", example, re.S).group(1).splitlines()
    losses = {500: 2.91, 1000: 2.40, 1500: 2.12, 2000: 1.97, 2500: 1.88, 3000: 1.93, 3500: 2.01,
              4000: 2.05}
    run = write_run(tmp_path / "results", tuple(range(500, 5000, 500)), best=2500, in_progress=(4500,),
                    evals={s: {"eval_loss": v} for s, v in losses.items()}, name="llama-lora")
    (run / "checkpoint-1500" / KEEP_FILE).write_text("")
    set_age(run / "checkpoint-1500", 7 * DAY)
    policy = load_policy(write_policy(tmp_path, policy_text))
    lines = ["llama-lora"] + [f"  {str(action).upper():<7} {name:<20} {', '.join(reasons)}".rstrip()
                              for name, (action, reasons) in decide_on(tmp_path / "results", policy).items()]
    assert lines == [line.rstrip() for line in shown]


def test_two_roots_with_the_same_relative_paths_are_told_apart(tmp_path):
    a = write_run(tmp_path / "a", (100, 200))
    b = write_run(tmp_path / "b", (100, 200))
    os.link(a / "checkpoint-100" / "optimizer.pt", b / "checkpoint-200" / "shared.pt")
    result = api.scan(str(tmp_path / "a"), str(tmp_path / "b"), now=NOW, min_age_s=HOUR)
    links = link_index(result.checkpoints)
    linked = {(c.dir.root, c.path) for c in result.checkpoints if links.linked(c)}
    assert linked == {(str(tmp_path / "a"), "run/checkpoint-100"), (str(tmp_path / "b"), "run/checkpoint-200")}
