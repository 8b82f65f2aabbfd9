"""A pickle reader that builds numpy arrays and plain containers, and nothing else.

The CIFAR-100 "python version" files are pickled dicts of numpy arrays. A pickle can name any
callable (``os.system``) and have the reader call it, so a plain ``pickle.load`` of a file
from the internet runs whatever its author chose. :class:`ArrayUnpickler` allows only the few
numpy globals an array's pickle needs and refuses every other one with a one-line
:class:`ClipretError` before anything is called.
"""

from __future__ import annotations

import importlib
import io
import pickle
from typing import Any

from clipret.errors import ClipretError

__all__ = ["ALLOWED", "ArrayUnpickler", "load_arrays"]

# (module, name) pairs an ndarray's pickle refers to, under numpy 1 and numpy 2 module names.
ALLOWED = frozenset({
    ("numpy.core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "_reconstruct"),
    ("numpy.core.multiarray", "scalar"),
    ("numpy._core.multiarray", "scalar"),
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
})


class ArrayUnpickler(pickle.Unpickler):
    """``pickle.Unpickler`` whose :meth:`find_class` resolves only :data:`ALLOWED`."""

    def __init__(self, file: Any, what: str) -> None:
        super().__init__(file, encoding="bytes")  # the CIFAR files were pickled by Python 2
        self.what = what

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in ALLOWED:
            raise ClipretError(f"refusing to read {self.what}: it asks to call {module}.{name}, which a dataset of arrays "
                               "never needs; the file is not genuine, fetch it again from the official page")
        if module.startswith("numpy.core."):  # numpy 2 keeps numpy.core only as a deprecated alias
            module = module.replace("numpy.core.", "numpy._core.", 1)
            try:
                importlib.import_module(module)
            except ImportError:
                module = module.replace("numpy._core.", "numpy.core.", 1)
        return getattr(importlib.import_module(module), name)


def load_arrays(data: bytes, what: str) -> Any:
    """Unpickle ``data`` (the bytes of ``what``) with :class:`ArrayUnpickler`; a broken pickle is a one-line error."""
    try:
        return ArrayUnpickler(io.BytesIO(data), what).load()
    except ClipretError:
        raise
    except Exception as exc:  # truncated or garbled data: UnpicklingError, EOFError, ValueError, ...
        raise ClipretError(f"{what} is not a readable pickle ({type(exc).__name__}: {exc}); fetch it again") from None
