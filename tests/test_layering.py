"""The import rules of llmreg's layers: losses import torch only; the lab trains with no Trainer."""

import ast
from pathlib import Path

import pytest


PACKAGE = Path(__file__).parents[1] / "llmreg"


def imported_modules(path: Path) -> set[str]:
    modules = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            modules.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            modules.add(node.module)
            modules.update(f"{node.module}.{alias.name}" for alias in node.names)
    return modules


@pytest.mark.parametrize("path", sorted((PACKAGE / "losses").rglob("*.py")), ids=str)
def test_losses_import_only_torch_the_standard_library_and_each_other(path):
    allowed_roots = {"torch", "math", "typing", "dataclasses", "collections", "functools", "__future__"}
    modules = {m for m in imported_modules(path) if not m.startswith("llmreg.losses")}
    roots = {module.split(".")[0] for module in modules}
    assert roots <= allowed_roots, f"{path.name} imports {sorted(roots - allowed_roots)}"


# Below the lab: scoring and generation with a bare model (pure torch and a forward), which the lab and the methods
# share.
SHARED_MODULES = ("llmreg.scoring", "llmreg.generation")


@pytest.mark.parametrize("path", sorted((PACKAGE / "lab").rglob("*.py")), ids=str)
def test_lab_imports_no_trainer_and_nothing_above_it(path):
    modules = imported_modules(path)
    forbidden = {m for m in modules if m.split(".")[0] in {"trl", "accelerate", "deepspeed", "peft"}}
    forbidden |= {m for m in modules if m.endswith(".Trainer") or m.startswith("llmreg.") and
                  not m.startswith(("llmreg.lab", *SHARED_MODULES))}
    assert not forbidden, f"{path.name} imports {sorted(forbidden)}"


@pytest.mark.parametrize("module", SHARED_MODULES)
def test_scoring_and_generation_import_no_trainer_and_nothing_of_the_lab(module):
    modules = imported_modules(PACKAGE.parent / (module.replace(".", "/") + ".py"))
    forbidden = {m for m in modules if m.split(".")[0] in {"trl", "accelerate", "deepspeed", "peft", "transformers"}}
    forbidden |= {m for m in modules if m.startswith("llmreg.") and not m.startswith(("llmreg.losses",
                                                                                       *SHARED_MODULES))}
    assert not forbidden, f"{module} imports {sorted(forbidden)}"


# Method code: the trainers, their shared helpers and the FTaaS pipeline. The lab's judges and scorers reach it as
# arguments (the recipes pass them) or as spec strings resolved at run time, never as imports.
METHOD_CODE = sorted([*(p for folder in ("booster", "reweight", "rpg", "rspo", "spin", "lora_dropout", "unlearn",
                                         "ftaas") for p in (PACKAGE / folder).rglob("*.py")),
                      *(PACKAGE / name for name in ("preference_utils.py", "trainer_utils.py", "l1_penalty.py"))])


@pytest.mark.parametrize("path", METHOD_CODE, ids=str)
def test_method_code_imports_nothing_from_the_lab(path):
    lab = sorted(m for m in imported_modules(path) if m == "llmreg.lab" or m.startswith("llmreg.lab."))
    assert not lab, f"{path.relative_to(PACKAGE.parent)} imports {lab}"


def test_the_layout_exists():
    root = PACKAGE.parent
    for folder in ("llmreg/losses", "llmreg/lab", "recipes/configs", "accelerate_configs", "benchmarks", "docs"):
        assert (root / folder).is_dir(), folder


METHOD_FOLDERS = ("rpg", "rspo", "spin", "booster", "lora_dropout", "unlearn", "reweight")


@pytest.mark.parametrize("path", sorted(p for m in METHOD_FOLDERS for p in (PACKAGE / m).rglob("*.py")), ids=str)
def test_method_folders_import_nothing_above_them(path):
    # Imports point down: a trainer never reaches up to the multi-stage loops or the recipe/CLI entry points.
    modules = imported_modules(path)
    above = {m for m in modules if m.startswith(("llmreg.selfplay", "llmreg.ftaas", "llmreg.recipe_utils",
                                                  "llmreg.cli", "recipes"))}
    other_methods = {m for m in modules if m.startswith("llmreg.") and m.split(".")[1] in METHOD_FOLDERS
                     and m.split(".")[1] != path.parent.name}
    assert not above and not other_methods, f"{path.name} imports {sorted(above | other_methods)}"


@pytest.mark.parametrize("path", sorted(p for loop in ("selfplay", "ftaas") for p in (PACKAGE / loop).rglob("*.py")),
                         ids=str)
def test_the_multi_stage_loops_do_not_import_entry_points(path):
    modules = imported_modules(path)
    assert not {m for m in modules if m.startswith(("llmreg.recipe_utils", "llmreg.cli", "recipes"))}


def test_no_test_module_imports_another():
    # Shared helpers live in tests/helpers.py (and tests/loss_audit.py): importing a test module from another runs its
    # module-level setup and collects nothing, and moving a test then breaks an unrelated file.
    tests = Path(__file__).parent
    importers = {path.relative_to(tests).as_posix(): sorted(m for m in imported_modules(path)
                                                             if m.split(".")[0].startswith("test_"))
                 for path in sorted(tests.rglob("*.py"))}
    assert not {path: modules for path, modules in importers.items() if modules}
