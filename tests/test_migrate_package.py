"""The shape of ``ckpt_tools.migrate``: every module imports on its own, the loader depends on
the package and never the other way round, and planning never imports torch."""

import json
import pkgutil
import subprocess
import sys

import pytest

import ckpt_tools.migrate

MODULES = sorted(f"ckpt_tools.migrate.{m.name}" for m in pkgutil.iter_modules(ckpt_tools.migrate.__path__))
# the modules that compute tensors; every other module of the package must not import torch
TORCH_MODULES = {"ckpt_tools.migrate." + m for m in
                 ("decompose", "lowrank", "peft_model", "tensor_source", "verify")}


def _imported_after(statement: str) -> set[str]:
    """The modules in ``sys.modules`` after ``statement`` runs in a fresh interpreter."""
    code = f"import json, sys\n{statement}\nprint(json.dumps(sorted(sys.modules)))"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    return set(json.loads(proc.stdout.splitlines()[-1]))


def test_the_package_has_the_modules_it_documents():
    assert {"ckpt_tools.migrate." + m for m in ("plan", "extract", "write", "execute", "verify",
                                                "errors", "lowrank")} <= set(MODULES)


@pytest.mark.parametrize("module", MODULES)
def test_each_module_imports_alone_without_the_loader(module):
    loaded = _imported_after(f"import {module}")
    assert "ckpt_tools.loader" not in loaded
    assert ("torch" in loaded) == (module in TORCH_MODULES)


def test_the_loader_imports_extract_and_extract_does_not_import_the_loader():
    assert "ckpt_tools.migrate.extract" in _imported_after("import ckpt_tools.loader")
    assert "ckpt_tools.loader" not in _imported_after("import ckpt_tools.migrate.extract")


def test_planning_a_migrate_imports_no_torch(results_tree, tmp_path):
    root, _, now = results_tree
    loaded = _imported_after(
        "from ckpt_tools.migrate import MigrateOptions, plan_migrate\n"
        f"plan = plan_migrate({str(root)!r}, {str(tmp_path / 'dst')!r}, now={now!r})\n"
        "assert plan.to_migrate")
    assert "torch" not in loaded and "ckpt_tools.loader" not in loaded


def test_the_converter_module_keeps_the_names_the_readme_gives():
    from ckpt_tools import converter, migrate
    assert converter.plan_migrate is migrate.plan_migrate
    assert converter.execute_migrate is migrate.execute_migrate


def test_a_plans_problems_are_problem_values_printed_as_before(tmp_path):
    from ckpt_tools.migrate import MigrateOptions, MigratePlan
    from ckpt_tools.problems import PERMISSION_DENIED, Problem
    from ckpt_tools.report import render_migrate_plan
    problem = Problem(PERMISSION_DENIED, "run_a", "cannot list it: Permission denied")
    plan = MigratePlan(str(tmp_path / "src"), str(tmp_path / "dst"), MigrateOptions(), (),
                       problems=(problem,))
    doc = plan.to_dict()
    assert doc["problems"] == [{"code": "permission-denied", "path": "run_a",
                                "message": "cannot list it: Permission denied",
                                "severity": "error"}]
    again = MigratePlan.from_dict(json.loads(json.dumps(doc)))
    assert again == plan and again.problems[0].is_error
    assert render_migrate_plan(plan)[-1] == (
        "error: run_a: permission-denied: cannot list it: Permission denied")
