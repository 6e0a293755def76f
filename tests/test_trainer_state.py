"""trainer_state.json: which checkpoint is the best of its run, and the eval metrics at each one.

Against the real ``best/`` run of the ordinary Trainer runs (``load_best_model_at_end``, eval every
step, best checkpoint not the last), copied wherever a test changes it.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import ckpt_tools
from ckpt_tools.checkpoint_reads import MAX_JSON_BYTES
from ckpt_tools.trainer_state import parse_trainer_state

REPO = Path(__file__).resolve().parents[1]
STATE = "trainer_state.json"


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "ckpt_tools.cli", *map(str, args)], capture_output=True,
                          text=True, cwd=REPO)


def audit_json(root) -> dict:
    proc = run_cli("audit", "--json", "--min-age", "0", root)
    assert proc.stderr == ""
    return json.loads(proc.stdout)


@pytest.fixture(scope="module")
def best_run(ordinary_runs):
    """(the best/ run's directory, the name of its best checkpoint per the manifest, its newest state)."""
    root, manifest = ordinary_runs
    (best,) = [e for e in manifest.values() if e.run == "best" and e.best]
    newest = max((e for e in manifest.values() if e.run == "best" and e.step is not None), key=lambda e: e.step)
    state = json.loads((root / newest.path / STATE).read_text())
    return root / "best", Path(best.path).name, state


def copied_run(best_run, tmp_path, name="moved/elsewhere/run") -> Path:
    dst = tmp_path / name
    shutil.copytree(best_run[0], dst)
    return dst


def by_path(doc) -> dict:
    return {c["path"]: c for c in doc["checkpoints"]}


def test_audit_json_marks_exactly_the_recorded_best_checkpoint(ordinary_runs, best_run):
    root, manifest = ordinary_runs
    _, best_name, state = best_run
    assert best_name == "checkpoint-2"   # the fixture's promise: the best is not the last
    doc = audit_json(root)
    marked = [c["path"] for c in doc["checkpoints"] if c["best_of_run"]]
    assert marked == [f"best/{best_name}"]
    (run,) = [r for r in doc["runs"] if r["path"] == "best"]
    assert run["best_checkpoint"] == f"best/{best_name}"
    assert run["best_metric"] == state["best_metric"]
    assert run["best_model_checkpoint"] == state["best_model_checkpoint"]
    assert run["metric_for_best_model"] == "eval_loss"   # what the fixture trains with
    assert run["trainer_state"] == f"best/checkpoint-{state['global_step']}/{STATE}"
    assert run["best_checkpoint_missing"] is False
    # runs without load_best_model_at_end name no best
    others = [r for r in doc["runs"] if r["path"] != "best" and r["trainer_state"] is not None]
    assert others and all(r["best_checkpoint"] is None and not r["best_checkpoint_missing"] for r in others)


def test_each_checkpoint_gets_the_eval_logged_at_its_step(ordinary_runs, best_run):
    root, _ = ordinary_runs
    _, _, state = best_run
    evals = {e["step"]: e for e in state["log_history"] if "eval_loss" in e}
    found = by_path(audit_json(root))
    for step in (2, 4, 6):
        c = found[f"best/checkpoint-{step}"]
        assert c["metrics_step"] == step
        assert c["metrics"]["eval_loss"] == evals[step]["eval_loss"]
    final = found["best/final"]
    assert final["metrics"] is None and final["metrics_step"] is None and final["best_of_run"] is False
    # a run that never evaluated has no metrics, its checkpoints no mark
    full = [c for p, c in found.items() if p.startswith("full/checkpoint-")]
    assert full and all(c["metrics"] is None and c["best_of_run"] is False for c in full)


def test_audit_table_shows_the_mark_beside_the_best_checkpoint_only(ordinary_runs, best_run):
    root, _ = ordinary_runs
    _, _, state = best_run
    proc = run_cli("audit", "--no-progress", "--min-age", "0", root)
    lines = proc.stdout.splitlines()
    start = lines.index(next(line for line in lines if line.startswith("best  (")))
    header, *rows = lines[start + 1:start + 5]
    assert header.split() == ["CHECKPOINT", "STEP", "STATUS", "KIND", "LAYOUT", "SIZE", "RECLAIMABLE",
                              "PROBLEMS", "BEST"]
    marked = [r for r in rows if "* best" in r]
    assert len(marked) == 1 and marked[0].split()[0] == "checkpoint-2"
    assert f"eval_loss {state['best_metric']:.6g}" in marked[0]
    # every other run's table keeps its columns
    headers = [line for line in lines if line.lstrip().startswith("CHECKPOINT")]
    assert sum("BEST" in h for h in headers) == 1
    assert "Traceback" not in proc.stdout + proc.stderr


def test_a_moved_run_still_finds_its_best_checkpoint_by_name(best_run, tmp_path):
    moved = copied_run(best_run, tmp_path)
    doc = audit_json(tmp_path / "moved")
    (run,) = doc["runs"]
    assert not run["best_model_checkpoint"].startswith(str(tmp_path))   # the path of training time
    assert run["best_checkpoint"] == "elsewhere/run/checkpoint-2"
    assert [c["path"] for c in doc["checkpoints"] if c["best_of_run"]] == ["elsewhere/run/checkpoint-2"]
    assert moved.exists()


def test_a_best_checkpoint_rotated_away_marks_none_and_says_so(best_run, tmp_path):
    run_dir = copied_run(best_run, tmp_path, "rotated")
    shutil.rmtree(run_dir / "checkpoint-2")
    doc = audit_json(run_dir)
    assert not any(c["best_of_run"] for c in doc["checkpoints"])
    (run,) = doc["runs"]
    assert run["best_checkpoint"] is None and run["best_checkpoint_missing"] is True
    assert run["best_model_checkpoint"].endswith("checkpoint-2") and run["best_metric"] is not None
    text = run_cli("audit", "--no-progress", "--min-age", "0", run_dir).stdout
    assert "BEST" not in text
    (note,) = [line for line in text.splitlines() if "note:" in line]
    assert "checkpoint-2" in note and "no longer in this run" in note


def test_a_checkpoint_between_evals_gets_the_last_eval_before_it(best_run, tmp_path):
    run_dir = copied_run(best_run, tmp_path, "sparse-evals")
    newest = run_dir / "checkpoint-6" / STATE
    state = json.loads(newest.read_text())
    # the same history as if evaluation had run every third step: no eval at step 4
    state["log_history"] = [e for e in state["log_history"] if "eval_loss" not in e or e["step"] % 3 == 0]
    newest.write_text(json.dumps(state, indent=2))
    step3 = next(e for e in state["log_history"] if e.get("step") == 3 and "eval_loss" in e)
    found = {c.path: c for c in ckpt_tools.scan(str(run_dir), min_age_s=0).checkpoints}
    c4 = found["checkpoint-4"]
    assert c4.evaluation.step == 3
    assert c4.evaluation.as_dict()["eval_loss"] == step3["eval_loss"]
    assert found["checkpoint-6"].evaluation.step == 6
    assert found["checkpoint-2"].evaluation is None   # no eval at or before step 2 any more
    doc = by_path(audit_json(run_dir))
    assert doc["checkpoint-4"]["metrics_step"] == 3 and doc["checkpoint-4"]["step"] == 4


def test_a_malformed_newest_state_is_passed_over_with_a_warning_not_an_error(best_run, tmp_path):
    run_dir = copied_run(best_run, tmp_path, "bad-state")
    before = {c["path"]: c["status"] for c in audit_json(run_dir)["checkpoints"]}
    newest = run_dir / "checkpoint-6" / STATE
    newest.write_bytes(newest.read_bytes()[:200])   # cut short, as a full disk leaves it
    doc = audit_json(run_dir)
    assert {c["path"]: c["status"] for c in doc["checkpoints"]} == before
    assert all(not c["problems"] for c in doc["checkpoints"])
    (run,) = doc["runs"]
    assert run["trainer_state"] == f"checkpoint-4/{STATE}"
    assert run["best_checkpoint"] == "checkpoint-2"   # checkpoint-4's state names it too
    (warning,) = run["problems"]
    assert warning["path"] == f"checkpoint-6/{STATE}" and warning["severity"] == "warning"
    found = by_path(doc)
    assert found["checkpoint-6"]["metrics"] is None   # checkpoint-4's history does not reach step 6
    assert found["checkpoint-4"]["metrics_step"] == 4
    shown = run_cli("audit", "--no-progress", "--min-age", "0", run_dir).stdout   # no -v needed
    assert f"warning: checkpoint-6/{STATE}: bad-json:" in shown


def test_parse_trainer_state_refuses_what_is_not_a_bounded_trainer_state(best_run):
    _, _, state = best_run
    raw = json.dumps(state).encode()
    parsed = parse_trainer_state(raw)
    assert parsed.global_step == state["global_step"] and parsed.best_name == "checkpoint-2"
    assert isinstance(parse_trainer_state(raw + b" " * (MAX_JSON_BYTES + 1 - len(raw))), str)
    assert isinstance(parse_trainer_state(b"[1, 2]"), str)
    assert isinstance(parse_trainer_state(b'{"log_history": []}'), str)   # no global_step
    assert isinstance(parse_trainer_state(json.dumps(state | {"log_history": {}}).encode()), str)
    assert isinstance(parse_trainer_state(b"\xff\xfe{}"), str)
    # a NaN metric (json writes it so) is kept as unknown, never as a float JSON cannot hold
    nan = json.dumps(state | {"log_history": [{"eval_loss": float("nan"), "step": 1}]}).encode()
    assert parse_trainer_state(nan).evaluations[0].as_dict() == {"eval_loss": None}
