"""Placeholder for the CUDA-only ``sgl_kernel`` package, so SGLang's CPU path can be imported.

SGLang imports ``sgl_kernel`` (and submodules such as ``sgl_kernel.kvcacheio``) at module level in many
files, even when the server runs on the CPU with ``--attention-backend torch_native``; the real wheel
loads libcuda on import and fails on a machine without a GPU. Every attribute and submodule here is a
placeholder that imports and can be subclassed or looked into, but raises when called, so a code path
that really needs a CUDA kernel fails loudly instead of computing something wrong.

Put ``tools/sglang_cpu/sgl_kernel_stub`` first on PYTHONPATH of the SGLang server process only.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import sys
import types

__version__ = "0.0.0+cpu-placeholder"
IS_PLACEHOLDER = True  # lets a test or a log line tell this package from the real one


class KernelUnavailableError(NotImplementedError):
    """Raised when SGLang calls a CUDA kernel that this CPU placeholder cannot provide."""


class _Placeholder:
    """Stands for any object of the real package: attribute access nests, calling raises."""

    def __init__(self, qualname: str):
        self._qualname = qualname

    def __getattr__(self, name: str) -> "_Placeholder":
        if name.startswith("__") and name.endswith("__"):
            raise AttributeError(name)  # keep copy/pickle/inspect protocols honest
        return _Placeholder(f"{self._qualname}.{name}")

    def __call__(self, *args, **kwargs):
        raise KernelUnavailableError(
            f"{self._qualname} is a CUDA kernel from sgl_kernel, which is only a placeholder in this "
            "CPU SGLang environment (tools/sglang_cpu). Launch with --device cpu --attention-backend "
            "torch_native, or run on a GPU machine with the real sglang-kernel wheel.")

    def __mro_entries__(self, bases):
        return (object,)  # `class X(sgl_kernel.Foo)` builds a plain class

    def __bool__(self) -> bool:
        return False  # feature probes such as `if sgl_kernel.foo:` read "not available"

    def __repr__(self) -> str:
        return f"<sgl_kernel placeholder {self._qualname}>"


class _PlaceholderModule(types.ModuleType):
    """A (sub)module whose missing attributes are placeholders."""

    def __getattr__(self, name: str):
        if name.startswith("__") and name.endswith("__"):
            raise AttributeError(name)
        return _Placeholder(f"{self.__name__}.{name}")


class _SubmoduleFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Makes every ``sgl_kernel.<anything>`` import succeed with a placeholder module."""

    def find_spec(self, fullname, path=None, target=None):
        if fullname.startswith(__name__ + "."):
            return importlib.machinery.ModuleSpec(fullname, self, is_package=True)
        return None

    def create_module(self, spec):
        module = _PlaceholderModule(spec.name)
        module.__path__ = []  # a package, so deeper submodules resolve too
        return module

    def exec_module(self, module):
        pass


def __getattr__(name: str):  # PEP 562: top-level names such as `from sgl_kernel import rmsnorm`
    if name.startswith("__") and name.endswith("__"):
        raise AttributeError(name)
    return _Placeholder(f"{__name__}.{name}")


if not any(isinstance(finder, _SubmoduleFinder) for finder in sys.meta_path):
    sys.meta_path.insert(0, _SubmoduleFinder())
