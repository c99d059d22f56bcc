"""Reading the official EDM2 network pickles without running any of their code (docs/design.md §10).

The official files are plain `pickle.dump`s of a dict {'ema', 'encoder', 'dataset_kwargs', 'loss_fn'}. Objects
of the official classes pickle as a call to `torch_utils.persistence._reconstruct_persistent_obj(meta)` whose
`meta` carries the Python source of the defining module (`module_src`), which the official loader executes.
A standard unpickler would run whatever the file names. `SafeUnpickler` instead resolves only an allow-list
of globals, and turns every object of a foreign class into an `InertObject` (class name + state), so that
loading runs no code from the file: `module_src` is read as a string and dropped, never executed.

Allowed (what plain pickles of torch modules, tensors and numpy arrays need):
- tensors: `torch._utils._rebuild_tensor_v2`, `_rebuild_parameter`, `_rebuild_parameter_with_state`; storages
  pickle as `torch.storage._load_from_bytes(b)` where `b` is a `torch.save` archive: that is loaded with
  `torch.load(weights_only=True)`, torch's own restricted unpickler, instead of the unrestricted original;
- `_codecs.encode` for latin-1 text only (how protocols 0-2 spell bytes);
- `collections.OrderedDict`, `builtins.dict / list / tuple / set / frozenset / slice / complex / bytearray /
  object`, torch dtypes, `torch.device`, `torch.Size`;
- numpy `_reconstruct` / `scalar` / `_frombuffer` (both `numpy.core` and `numpy._core`), `numpy.ndarray`,
  `numpy.dtype`;
- records instead of objects: `torch_utils.persistence._reconstruct_persistent_obj` (official classes),
  `torch.nn.modules.*` classes (e.g. ModuleDict; never imported), `copyreg._reconstructor` for those;
  `dnnlib.util.EasyDict` becomes a dict.
Anything else raises UnsafePickleError naming the global; nothing from the file has run at that point.

Callables are handed to the unpickler as fresh wrappers and fresh classes per load, so a crafted BUILD opcode
cannot modify torch's or this module's functions and classes for the rest of the process.
"""

from __future__ import annotations

import _compat_pickle
import collections
import io
import os
import pickle
import re
import warnings
from typing import Any, Callable

import numpy as np
import torch

from training.model_files import ModelFileError

try:
    from numpy._core import multiarray as _multiarray, numeric as _numeric  # numpy >= 2
except ImportError:  # pragma: no cover
    from numpy.core import multiarray as _multiarray, numeric as _numeric  # numpy 1.x

PERSISTENT_RECONSTRUCT = "torch_utils.persistence._reconstruct_persistent_obj"
EASYDICT = "dnnlib.util.EasyDict"
TORCH_MODULE_PREFIX = "torch.nn.modules."
TORCH_DTYPE_NAMES = (
    "float16", "float32", "float64", "bfloat16", "half", "float", "double",
    "uint8", "int8", "int16", "int32", "int64", "short", "int", "long", "bool",
)


class UnsafePickleError(ModelFileError):
    """The pickle references a global outside the allow-list; nothing from it was executed."""


class InertObject:
    """An object of a class that was not imported: its class name, its origin and its pickled state.

    origin: 'persistent' for official persistent classes (class_name is the bare name, e.g. 'Precond'),
    'global' for allowed foreign classes (class_name is the dotted path, e.g. 'torch.nn.modules.container.ModuleDict').
    """

    def __init__(self, class_name: str, origin: str, state: Any = None, version: Any = None):
        self.class_name = class_name
        self.origin = origin
        self.state = state
        self.version = version

    def __setstate__(self, state: Any) -> None:  # the BUILD opcode
        self.state = state

    @property
    def init_args(self) -> tuple:
        """Positional constructor arguments recorded by the official persistence wrapper."""
        args = self.state.get("_init_args") if isinstance(self.state, dict) else None
        return tuple(args) if args is not None else ()

    @property
    def init_kwargs(self) -> dict:
        """Keyword constructor arguments recorded by the official persistence wrapper."""
        kwargs = self.state.get("_init_kwargs") if isinstance(self.state, dict) else None
        return dict(kwargs) if kwargs is not None else {}

    def __repr__(self) -> str:
        return f"InertObject({self.class_name!r}, origin={self.origin!r})"


def _fresh_wrapper(fn: Callable, name: str) -> Callable:
    def call(*args, **kwargs):
        return fn(*args, **kwargs)

    call.__name__ = call.__qualname__ = name
    return call


def _load_storage_from_bytes(data: bytes) -> Any:
    """A pickled torch storage: a `torch.save` archive, read with torch's weights-only unpickler."""
    if not isinstance(data, (bytes, bytearray)):
        raise UnsafePickleError(f"torch.storage._load_from_bytes expects bytes, got {type(data).__name__}")
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*TypedStorage is deprecated.*")
        return torch.load(io.BytesIO(bytes(data)), weights_only=True, map_location="cpu")


def _latin1_bytes(text: str, encoding: str = "latin1") -> bytes:
    """Stand-in for `_codecs.encode`, which protocols 0-2 use to spell bytes objects; latin-1 only."""
    if not isinstance(text, str) or encoding not in ("latin1", "latin-1"):
        raise UnsafePickleError(f"_codecs.encode is allowed only for latin-1 text, got encoding {encoding!r}")
    return text.encode("latin1")


def _persistent_record(meta: Any) -> InertObject:
    """Stand-in for `_reconstruct_persistent_obj`: keeps the class name and state, drops `module_src` unread."""
    if not isinstance(meta, dict) or meta.get("type") != "class" or not isinstance(meta.get("class_name"), str):
        raise ModelFileError(
            "persistent-object record must be a dict with type 'class' and a class_name, "
            f"got {type(meta).__name__} with keys {sorted(meta) if isinstance(meta, dict) else '-'}"
        )
    state = meta.get("state")
    state = dict(state) if isinstance(state, dict) else state
    return InertObject(meta["class_name"], "persistent", state, meta.get("version"))


def _allowed_globals() -> dict[str, Any]:
    """The allow-list, built afresh for every load (see the module docstring)."""
    import torch._utils
    import torch.storage  # noqa: F401  (the names below are looked up by string)

    class EasyDictRecord(dict):
        def __setstate__(self, state: Any) -> None:  # attributes of the official EasyDict carry no data
            pass

    table: dict[str, Any] = {
        "torch._utils._rebuild_tensor_v2": _fresh_wrapper(torch._utils._rebuild_tensor_v2, "_rebuild_tensor_v2"),
        "torch._utils._rebuild_parameter": _fresh_wrapper(torch._utils._rebuild_parameter, "_rebuild_parameter"),
        "torch._utils._rebuild_parameter_with_state": _fresh_wrapper(
            torch._utils._rebuild_parameter_with_state, "_rebuild_parameter_with_state"
        ),
        "torch.storage._load_from_bytes": _fresh_wrapper(_load_storage_from_bytes, "_load_from_bytes"),
        "_codecs.encode": _fresh_wrapper(_latin1_bytes, "encode"),
        "torch.device": torch.device,
        "torch.Size": torch.Size,
        "collections.OrderedDict": collections.OrderedDict,
        "builtins.dict": dict,
        "builtins.list": list,
        "builtins.tuple": tuple,
        "builtins.set": set,
        "builtins.frozenset": frozenset,
        "builtins.slice": slice,
        "builtins.complex": complex,
        "builtins.bytearray": bytearray,
        "builtins.object": object,
        "numpy.ndarray": np.ndarray,
        "numpy.dtype": np.dtype,
        PERSISTENT_RECONSTRUCT: _fresh_wrapper(_persistent_record, "_reconstruct_persistent_obj"),
        EASYDICT: EasyDictRecord,
    }
    for prefix in ("numpy.core.multiarray", "numpy._core.multiarray"):  # numpy 1.x and 2.x spellings
        table[f"{prefix}._reconstruct"] = _multiarray._reconstruct
        table[f"{prefix}.scalar"] = _multiarray.scalar
    for prefix in ("numpy.core.numeric", "numpy._core.numeric"):  # arrays under pickle protocol 5
        table[f"{prefix}._frombuffer"] = _fresh_wrapper(_numeric._frombuffer, "_frombuffer")
    for name in TORCH_DTYPE_NAMES:
        table[f"torch.{name}"] = getattr(torch, name)
    return table


class SafeUnpickler(pickle.Unpickler):
    """`pickle.Unpickler` that resolves only the allow-list of the module docstring."""

    def __init__(self, file: Any, source: str = "<pickle>"):
        super().__init__(file)
        self.source = source
        self._table = _allowed_globals()
        self._record_types: dict[str, type] = {}

    def _record_type(self, dotted: str) -> type:
        """A throwaway class whose instances are InertObjects named `dotted` (for NEWOBJ / copyreg)."""
        if dotted not in self._record_types:

            def new(cls, *args, **kwargs):
                return InertObject(dotted, "global")

            self._record_types[dotted] = type("InertRecordType", (), {"__new__": new, "record_name": dotted})
        return self._record_types[dotted]

    def _reconstructor(self, cls: Any, base: Any, state: Any) -> Any:
        """Stand-in for `copyreg._reconstructor` (protocols 0 and 1): only for record types and EasyDict."""
        if cls is self._table[EASYDICT] and base is dict:
            return cls(state or {})
        if not (isinstance(cls, type) and cls in self._record_types.values()):
            raise UnsafePickleError(f"{self.source}: copyreg._reconstructor used with {cls!r}, which is not allowed")
        return InertObject(cls.record_name, "global")

    def find_class(self, module: str, name: str) -> Any:
        # Protocols 0-2 spell some names the Python 2 way (copy_reg, __builtin__); map them as pickle does.
        if (module, name) in _compat_pickle.NAME_MAPPING:
            module, name = _compat_pickle.NAME_MAPPING[(module, name)]
        module = _compat_pickle.IMPORT_MAPPING.get(module, module)
        dotted = f"{module}.{name}"
        if dotted in self._table:
            return self._table[dotted]
        if dotted == "copyreg._reconstructor":
            return self._reconstructor
        if module.startswith(TORCH_MODULE_PREFIX) and re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", name):
            return self._record_type(dotted)
        raise UnsafePickleError(
            f"{self.source}: refused to load the global {dotted!r}: it is not in the allow-list of network "
            "pickles (tensors, numpy arrays, plain containers, official persistent objects); nothing from the "
            "file was executed"
        )

    def persistent_load(self, pid: Any) -> Any:
        raise UnsafePickleError(
            f"{self.source}: the pickle uses persistent ids ({pid!r:.60}); official network pickles do not, "
            "and torch.save archives are not model files of this project"
        )


def load_official_pickle(path: str | os.PathLike) -> Any:
    """Unpickle `path` with SafeUnpickler: tensors, arrays and containers, official objects as InertObjects."""
    source = os.fspath(path)
    try:
        with open(path, "rb") as f:
            return SafeUnpickler(f, source).load()
    except ModelFileError:
        raise
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, IndexError, KeyError,
            RuntimeError, MemoryError, UnicodeDecodeError) as e:  # fmt: skip
        raise ModelFileError(f"{source}: truncated or corrupt pickle ({type(e).__name__}: {e})") from e
