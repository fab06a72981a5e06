"""Glue to the libraries people load models with, installed lazily.

``nf4kit.integrations.install()`` (run by ``import nf4kit``) arranges that:
- when ``transformers.quantizers.auto`` is imported (or already was), nf4kit's quantizer and config
  register with transformers (``nf4kit.integrations.transformers.register``);
- when ``peft.tuners.lora.model`` is imported (or already was), nf4kit's LoRA layers become PEFT's
  choice for nf4kit's 4-bit layers (``nf4kit.integrations.peft.register``).
Nothing is imported before the user imports those libraries, and a failure there is a warning,
never a failed import.
"""
from __future__ import annotations

import importlib
import importlib.abc
import sys
import threading
import warnings
from typing import Callable

# module whose import triggers the hook -> (nf4kit module, function)
HOOKS: dict[str, tuple[str, str]] = {
    "transformers.quantizers.auto": ("nf4kit.integrations.transformers", "register"),
    "peft.tuners.lora.model": ("nf4kit.integrations.peft", "register"),
}
_done: set[str] = set()
_lock = threading.RLock()


def _run(trigger: str) -> None:
    with _lock:
        if trigger in _done:
            return
        _done.add(trigger)
    module_name, func = HOOKS[trigger]
    try:
        module = importlib.import_module(module_name)
        if getattr(module.__spec__, "_initializing", False):
            return  # the user is importing that module itself, which registers at its end
        getattr(module, func)()
    except Exception as exc:  # never break the user's import of transformers / peft
        warnings.warn(f"nf4kit could not register with {trigger.split('.')[0]}: {type(exc).__name__}: {exc}",
                      RuntimeWarning, stacklevel=2)


class _LoaderWithHook(importlib.abc.Loader):
    """Runs the original loader, then the hook. Other attributes go to the original loader."""

    def __init__(self, loader, callback: Callable[[], None]):
        self._loader = loader
        self._callback = callback

    def create_module(self, spec):
        return self._loader.create_module(spec)

    def exec_module(self, module):
        self._loader.exec_module(module)
        self._callback()

    def __getattr__(self, name):
        return getattr(self._loader, name)


class _PostImportFinder(importlib.abc.MetaPathFinder):
    def find_spec(self, fullname, path, target=None):
        if fullname not in HOOKS or fullname in _done:
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(fullname, path, target)
            if spec is not None:
                break
        else:
            return None
        if spec.loader is None or not hasattr(spec.loader, "exec_module"):
            return spec
        spec.loader = _LoaderWithHook(spec.loader, lambda: _run(fullname))
        return spec


_finder = _PostImportFinder()


def install() -> None:
    """Register now with what is already imported, and hook what is imported later."""
    if not any(isinstance(f, _PostImportFinder) for f in sys.meta_path):
        sys.meta_path.insert(0, _finder)
    for trigger in HOOKS:
        if trigger in sys.modules:
            _run(trigger)
