"""llmreg/_compat.py: each private symbol of TRL, transformers, accelerate, datasets, PEFT and huggingface_hub that
llmreg relies on is listed there, as it is in the installed libraries, and no other module of llmreg/ or recipes/ uses
one.

The rules, for every module but llmreg/_compat.py:
- imports: no private name or module of these libraries, and no name the library does not export (its top-level
  package re-exports it, or the module lists it in ``__all__``, or it is a module, or the module is in
  ``PUBLIC_MODULES``);
- attributes: a private name listed in ``CHECKED`` appears only as ``super().name`` inside the override ``def name``;
  any other private attribute must be one llmreg defines itself (or one of ``OTHER_PRIVATE``, outside this stack);
- classes: an llmreg class (or a ``*Mixin``, against the library classes llmreg subclasses) that overrides a private
  attribute of a library class has it listed in ``CHECKED``, and assigns no private attribute on ``self`` that the
  library class assigns too.
"""

import ast
import importlib
import importlib.metadata
import inspect
import pkgutil
import re
import textwrap
from pathlib import Path

import pytest

import llmreg
from llmreg._compat import CHECKED


ROOT = Path(__file__).parents[1]
LIBRARIES = ("trl", "transformers", "accelerate", "datasets", "peft", "huggingface_hub")

# Documented modules whose public names are API, though the module has no __all__ and the package does not re-export.
PUBLIC_MODULES = {
    "accelerate.utils": "accelerate's documented utilities (gather_object, broadcast_object_list, tqdm)",
    "transformers.modeling_outputs": "transformers' documented model outputs (CausalLMOutput)",
    "peft.tuners.tuners_utils": "PEFT's documented tuner base classes (BaseTunerLayer, the adapter layers' base)",
}
# Private attributes of libraries outside TRL's stack, which llmreg/_compat.py does not cover.
OTHER_PRIVATE = {
    "_actions": "argparse: a parser's actions (`llmreg run <method> --help`)",
    "_option_string_actions": "argparse: a parser's option strings (RecipeParser's did-you-mean hints)",
    "_foreach_add_": "torch: the in-place add of the ℓ1 penalty's and the anchor's gradients to every .grad at once",
    "_foreach_norm": "torch: every tensor's norm in one kernel (the weight perturbation's global norm)",
}


def is_private(name: str) -> bool:
    return re.fullmatch(r"_[A-Za-z]\w*", name) is not None and not name.endswith("__")


LISTED = {entry.name for entry in CHECKED if is_private(entry.name)}


def resolve(path: str):
    """``"trl.GRPOTrainer"`` → the class: the longest importable module, then attributes."""
    parts = path.split(".")
    for end in range(len(parts), 0, -1):
        try:
            found = importlib.import_module(".".join(parts[:end]))
        except ModuleNotFoundError:
            continue
        for part in parts[end:]:
            found = getattr(found, part)
        return found
    raise ModuleNotFoundError(path)


def assigned_on_self(cls, name: str) -> bool:
    return inspect.isclass(cls) and re.search(rf"\bself\.{re.escape(name)}\s*(:[^=\n]*)?=(?!=)",
                                              inspect.getsource(cls)) is not None


# --- the entries ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("entry", CHECKED, ids=lambda entry: f"{entry.owner}.{entry.name}")
def test_the_symbol_is_as_llmreg_checked_it(entry):
    library = entry.owner.split(".")[0]
    what = (f"{entry.owner}.{entry.name}: llmreg relies on it ({entry.note}); checked on {entry.checked}, installed "
            f"{library} {importlib.metadata.version(library)}. Read the note, fix its users, then the entry in "
            "llmreg/_compat.py.")
    try:
        owner = resolve(entry.owner)
    except (ImportError, AttributeError) as error:
        pytest.fail(f"{entry.owner} is gone ({error}). {what}")
    if entry.signature is None:
        assert hasattr(owner, entry.name) or assigned_on_self(owner, entry.name), f"It is gone. {what}"
        return
    assert hasattr(owner, entry.name), f"It is gone. {what}"
    now = str(inspect.signature(getattr(owner, entry.name)))
    assert now == entry.signature, f"Its signature changed. {what}\n  checked: {entry.signature}\n  now:     {now}"


def test_the_entries_are_one_line_each_and_name_their_library():
    assert len({(e.owner, e.name) for e in CHECKED}) == len(CHECKED), "an entry is listed twice"
    for entry in CHECKED:
        assert "\n" not in entry.note and entry.note, entry
        assert entry.checked.split()[0].lower() == entry.owner.split(".")[0].lower(), entry


# --- no private symbol outside llmreg/_compat.py -------------------------------------------------------------------


def is_public(module_name: str, name: str) -> bool:
    if is_private(name) or any(is_private(part) for part in module_name.split(".")):
        return False
    module = importlib.import_module(module_name)
    try:
        found = getattr(module, name)
    except AttributeError:  # a submodule not imported yet
        found = importlib.import_module(f"{module_name}.{name}")
    if inspect.ismodule(found) or name in getattr(module, "__all__", ()) or module_name in PUBLIC_MODULES:
        return True
    return getattr(importlib.import_module(module_name.split(".")[0]), name, None) is found


class AttributeUses(ast.NodeVisitor):
    """Every attribute access with the function it is in."""

    def __init__(self):
        self.functions, self.uses = [], []

    def visit_FunctionDef(self, node):
        self.functions.append(node.name)
        self.generic_visit(node)
        self.functions.pop()

    visit_AsyncFunctionDef = visit_FunctionDef

    def visit_Attribute(self, node):
        self.uses.append((node, self.functions[-1] if self.functions else None))
        self.generic_visit(node)


def private_uses(source: str, own: set[str]) -> list[str]:
    """The private symbols of TRL's stack that ``source`` uses outside llmreg/_compat.py; ``own``: the private names
    llmreg defines itself."""
    tree = ast.parse(source)
    problems = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module.split(".")[0] in LIBRARIES:
            problems += [f"line {node.lineno}: from {node.module} import {alias.name} is not exported"
                         for alias in node.names if not is_public(node.module, alias.name)]
        elif isinstance(node, ast.Import):
            problems += [f"line {node.lineno}: import {alias.name} is private" for alias in node.names
                         if alias.name.split(".")[0] in LIBRARIES and any(map(is_private, alias.name.split(".")))]
    visitor = AttributeUses()
    visitor.visit(tree)
    for node, function in visitor.uses:
        name = node.attr
        if not is_private(name):
            continue
        through_super = isinstance(node.value, ast.Call) and getattr(node.value.func, "id", None) == "super"
        if name in LISTED and not (through_super and function == name):
            problems.append(f"line {node.lineno}: .{name} (listed in llmreg/_compat.py: use its function there, or "
                            "super() inside the override)")
        elif name not in LISTED and name not in own and name not in OTHER_PRIVATE:
            problems.append(f"line {node.lineno}: .{name} is private to a library (list it in llmreg/_compat.py)")
    return problems


def own_private_names(paths) -> set[str]:
    """The private names llmreg defines: its functions, classes, aliases, and the attributes and names it assigns."""
    names = set()
    for path in paths:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                names.add(node.name)
            elif isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Store):
                names.add(node.attr)
            elif isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
                names.add(node.id)
            elif isinstance(node, ast.alias):
                names.add(node.asname or node.name.split(".")[0])
    return {name for name in names if is_private(name)} - LISTED


SOURCES = sorted(p for folder in ("llmreg", "recipes") for p in (ROOT / folder).rglob("*.py")
                 if p != ROOT / "llmreg" / "_compat.py")
OWN = own_private_names(SOURCES)


@pytest.mark.parametrize("path", SOURCES, ids=lambda path: str(path.relative_to(ROOT)))
def test_no_private_symbol_is_used_outside_compat(path):
    problems = private_uses(path.read_text(), OWN)
    assert not problems, f"{path.relative_to(ROOT)}:\n  " + "\n  ".join(problems)


PLANTED = {
    "an unexported function": "from trl.trainer.utils import pad\n",
    "a private name": "from datasets.fingerprint import _hash_python_lines\n",
    "a private module": "import transformers.integrations._private\n",
    "a listed attribute": "def log(trainer):\n    trainer._metrics['train']['loss'].append(1.0)\n",
    "a listed method on self": "class T:\n    def step(self, batch):\n        return self._prepare_inputs(batch)\n",
    "super() outside the override": "class T:\n    def loss(self, m, x):\n        return super()._compute_loss(m)\n",
    "an unlisted private attribute": "def name(model):\n    return model.config._commit_hash\n",
}
ALLOWED = {
    "public imports": "from trl import SFTTrainer\nfrom trl.models import prepare_deepspeed\nimport transformers\n",
    "super() in the override": "class T:\n    def _compute_loss(self, m):\n        return super()._compute_loss(m)\n",
    "llmreg's own": "class T:\n    def _helper(self):\n        return self._helper\n",
}


@pytest.mark.parametrize("source", PLANTED.values(), ids=PLANTED.keys())
def test_the_checker_catches_a_planted_use(source):
    assert private_uses(source, own={"_helper"})


@pytest.mark.parametrize("source", ALLOWED.values(), ids=ALLOWED.keys())
def test_the_checker_allows(source):
    assert private_uses(source, own={"_helper"}) == []


# --- overrides of private library attributes -----------------------------------------------------------------------


def library_classes(cls) -> list[type]:
    return [c for c in cls.__mro__ if c.__module__.split(".")[0] in LIBRARIES]


def unlisted_overrides(cls, bases) -> list[str]:
    """The private attributes of the library classes in the MROs of ``bases`` that ``cls`` overrides without an entry
    in CHECKED: a method's nearest definition (what super() calls) must be listed; for data, any along the MRO."""
    listed = {(resolve(entry.owner), entry.name) for entry in CHECKED}
    problems = []
    for name in filter(is_private, vars(cls)):
        for base in bases:
            definers = [c for c in library_classes(base) if name in vars(c)]
            if not definers:
                continue
            wanted = definers[:1] if callable(vars(definers[0])[name]) else definers
            if not any((c, name) in listed for c in wanted):
                problems.append(f"{cls.__qualname__}.{name} overrides {definers[0].__module__}."
                                f"{definers[0].__qualname__}.{name}: list it in llmreg/_compat.py")
    return list(dict.fromkeys(problems))


def shadowed_attributes(cls, bases) -> list[str]:
    """The private attributes ``cls`` assigns on ``self`` that a library class in the MROs of ``bases`` assigns too."""
    tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    assigned = {node.attr for node in ast.walk(tree) if isinstance(node, ast.Attribute)
                and isinstance(node.ctx, ast.Store) and getattr(node.value, "id", None) == "self"
                and is_private(node.attr)}
    return [f"{cls.__qualname__} assigns self.{name}, as {base.__module__}.{base.__qualname__} does"
            for base in {c for b in bases for c in library_classes(b)} for name in sorted(assigned)
            if assigned_on_self(base, name)]


def llmreg_classes() -> list[type]:
    modules = [importlib.import_module(info.name)
               for package in (llmreg, importlib.import_module("llmreg.recipes"))
               for info in pkgutil.walk_packages(package.__path__, package.__name__ + ".")
               if not info.name.endswith("__main__")]
    return [cls for module in modules for cls in vars(module).values()
            if inspect.isclass(cls) and cls.__module__ == module.__name__]


def checked_against(cls, every_library_class) -> list[type]:
    """A class is checked against its own MRO; a mixin against every library class that llmreg subclasses."""
    if cls.__name__.endswith("Mixin"):
        return every_library_class
    return [cls] if library_classes(cls) else []


def test_every_overridden_private_attribute_is_listed_and_none_is_shadowed():
    classes = llmreg_classes()
    every_library_class = sorted({c for cls in classes for c in library_classes(cls)}, key=str)
    problems = []
    for cls in classes:
        bases = checked_against(cls, every_library_class)
        if bases:
            problems += unlisted_overrides(cls, bases) + shadowed_attributes(cls, bases)
    assert any(cls.__name__ == "RPGTrainer" for cls in classes)
    assert not problems, "\n".join(problems)


def test_the_class_checks_catch_planted_overrides():
    from trl import SFTTrainer

    class Planted(SFTTrainer):
        def __init__(self):
            self._train_batch_size = 1  # transformers' Trainer keeps its own

        def _save_checkpoint(self, model, trial):  # TRL's and transformers', not listed
            pass

        def _set_signature_columns_if_needed(self):  # listed
            pass

    problems = unlisted_overrides(Planted, [Planted])
    assert len(problems) == 1 and ".Planted._save_checkpoint overrides " in problems[0]
    assert len(shadowed_attributes(Planted, [Planted])) == 1


def test_the_exceptions_are_still_needed():
    sources = "\n".join(path.read_text() for path in SOURCES)
    assert [name for name in OTHER_PRIVATE if f".{name}" not in sources] == []
    imported = set(re.findall(r"^\s*from ([\w.]+) import", sources, re.MULTILINE))
    assert [module for module in PUBLIC_MODULES if module not in imported] == []
