"""Finding the task that ``--task`` names: a built-in name, ``package.module:Name`` or ``path/to/file.py:Name``."""

from __future__ import annotations

import importlib
import importlib.util
import sys
from pathlib import Path

from trainer.core.errors import UsageError
from trainer.core.task import Task

# Built-in tasks by name; each entry is imported only when chosen.
BUILT_IN = {
    "mnist-mlp": "trainer.tasks.mnist_mlp:MnistMLP",
    "shakespeare-char": "trainer.tasks.shakespeare_char:ShakespeareChar",
}
FORMS = "a built-in task (" + ", ".join(BUILT_IN) + "), package.module:Name or path/to/file.py:Name"


def find_task(spec: str) -> type[Task]:
    """The ``Task`` subclass ``spec`` names; a one-line ``UsageError`` naming the problem otherwise."""
    target = BUILT_IN.get(spec, spec)
    where, colon, name = target.rpartition(":")
    if not colon or not where or not name:
        raise UsageError(f"--task {spec}: no such task; give {FORMS}")
    if where.endswith(".py") or "/" in where or "\\" in where:
        namespace = _load_file(Path(where), spec)
    else:
        try:
            namespace = vars(importlib.import_module(where))
        except ImportError as exc:
            raise UsageError(
                f"--task {spec}: cannot import {where} ({exc}); check the module name and PYTHONPATH"
            ) from None
    found = namespace.get(name)
    if found is None:
        raise UsageError(f"--task {spec}: {where} defines no {name}; name a Task subclass it defines")
    if not (isinstance(found, type) and issubclass(found, Task)):
        raise UsageError(f"--task {spec}: {name} in {where} is not a subclass of trainer.Task; see docs/tasks.md")
    return found


def _load_file(path: Path, spec: str) -> dict:
    """Run a task file as a module of its own, importable by name so pickling and DDP hooks can find it."""
    if not path.is_file():
        raise UsageError(f"--task {spec}: {path} does not exist; give the path of a .py file that defines the task")
    module_name = "trainer_task_" + "".join(c if c.isalnum() else "_" for c in str(path.resolve()))
    if module_name in sys.modules:
        return vars(sys.modules[module_name])
    module_spec = importlib.util.spec_from_file_location(module_name, path)
    assert module_spec is not None and module_spec.loader is not None
    module = importlib.util.module_from_spec(module_spec)
    sys.modules[module_name] = module
    try:
        module_spec.loader.exec_module(module)
    except Exception as exc:
        del sys.modules[module_name]
        raise UsageError(f"--task {spec}: {path} failed to load ({type(exc).__name__}: {exc})") from None
    return vars(module)


def spec_of(task_class: type[Task]) -> str:
    """How to find ``task_class`` again (what the run's config records): its built-in name, its file, or its module."""
    for name, target in BUILT_IN.items():
        if target == f"{task_class.__module__}:{task_class.__qualname__}":
            return name
    module = sys.modules.get(task_class.__module__)
    path = getattr(module, "__file__", None)
    from_file = task_class.__module__ == "__main__" or task_class.__module__.startswith("trainer_task_")
    if from_file and path:
        return f"{Path(path).resolve()}:{task_class.__qualname__}"
    return f"{task_class.__module__}:{task_class.__qualname__}"
