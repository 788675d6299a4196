"""Checking a launch's arguments against the kernel's signature, and packing
them into the ``void**`` the kernel entry unpacks.

CuPy passes whatever it is given: a Python ``int`` as 8 bytes, a Python
``float`` as a double, a float32 array where ``__half*`` is declared. The
kernel then reads garbage. Here every argument is checked against the
parameter's concrete type (read from the compiled module, so after template
substitution) and a mismatch raises KernelArgumentError naming the kernel,
the argument's index and name, what was expected and what was given.
"""

from __future__ import annotations

import ctypes
import dataclasses
from collections.abc import Sequence
from typing import Any

import numpy as np

from .errors import KernelArgumentError

# (kind, bytes per lane) -> C++ spelling; kinds as in shim/dcn_entry.h.
_SCALAR_NAMES = {
    ("f", 4): "float", ("f", 8): "double",
    ("i", 1): "signed char", ("i", 2): "short", ("i", 4): "int", ("i", 8): "long long",
    ("u", 1): "unsigned char", ("u", 2): "unsigned short", ("u", 4): "unsigned int",
    ("u", 8): "unsigned long long",
    ("b", 1): "bool", ("c", 1): "char", ("h", 2): "__half", ("B", 2): "__nv_bfloat16",
    ("v", 0): "void",
}
_VECTOR_PREFIXES = {
    ("f", 4): "float", ("f", 8): "double", ("i", 4): "int", ("u", 4): "uint", ("i", 2): "short",
    ("u", 2): "ushort", ("i", 1): "char", ("u", 1): "uchar", ("i", 8): "longlong",
    ("u", 8): "ulonglong",
}
# (kind, bytes per lane) -> the dtype name an array or scalar must have.
_DTYPES = {
    ("f", 4): "float32", ("f", 8): "float64", ("h", 2): "float16", ("B", 2): "bfloat16",
    ("i", 1): "int8", ("i", 2): "int16", ("i", 4): "int32", ("i", 8): "int64",
    ("u", 2): "uint16", ("u", 4): "uint32", ("u", 8): "uint64", ("b", 1): "bool",
}
_NUMPY_SCALAR_HINT = {"float32": "numpy.float32", "int32": "numpy.int32",
                      "uint32": "numpy.uint32", "float16": "numpy.float16"}


class ParamDesc(ctypes.Structure):
    """Mirror of ``dcn::ParamDesc`` in shim/dcn_entry.h."""

    _fields_ = [("kind", ctypes.c_char), ("is_pointer", ctypes.c_ubyte),
                ("is_const", ctypes.c_ubyte), ("lanes", ctypes.c_ubyte), ("size", ctypes.c_uint)]


@dataclasses.dataclass(frozen=True)
class Param:
    """One kernel parameter, with its concrete type after template substitution."""

    index: int
    name: str
    declared: str  # the parameter as written in the source ("" if unknown)
    kind: str
    is_pointer: bool
    is_const: bool
    lanes: int
    size: int

    @classmethod
    def from_desc(cls, index: int, desc: ParamDesc, name: str, declared: str) -> Param:
        return cls(index, name, declared, desc.kind.decode(), bool(desc.is_pointer),
                   bool(desc.is_const), desc.lanes, desc.size)

    @property
    def value_type(self) -> str:
        """The C++ type of the value (of the pointee, for pointers)."""
        if self.kind == "s":
            return f"struct of {self.size} bytes"
        if self.lanes > 1:
            if self.kind in "hB":
                return _SCALAR_NAMES[(self.kind, self.size)] + "2"
            return _VECTOR_PREFIXES[(self.kind, self.size)] + str(self.lanes)
        return _SCALAR_NAMES[(self.kind, self.size)]

    @property
    def cxx_type(self) -> str:
        if self.is_pointer:
            return ("const " if self.is_const else "") + self.value_type + "*"
        return self.value_type

    @property
    def dtype(self) -> str | None:
        """The dtype an array (pointer) or scalar (value) must have; None: any."""
        if self.is_pointer and (self.kind in "cvs" or (self.kind, self.size) == ("u", 1)):
            return None  # raw bytes: char*, unsigned char*, void*, struct*
        return _DTYPES.get((self.kind, self.size))

    def describe(self) -> str:
        declared = f" (declared `{self.declared}`)" if self.declared else ""
        return f"argument {self.index} '{self.name}'{declared}"


@dataclasses.dataclass(frozen=True)
class ArrayArg:
    """An array argument as the launch sees it: address and size in bytes."""

    obj: Any  # keeps the array alive during the launch
    address: int
    nbytes: int
    writable: bool


def check_and_pack(kernel_name: str, params: Sequence[Param], args: Sequence[Any]
                   ) -> tuple[list[ArrayArg | bytes], ctypes.Array]:
    """Checks ``args`` against ``params``; returns the per-argument values
    (ArrayArg for pointers, raw bytes for values) and the packed ``void**``."""
    if not isinstance(args, (tuple, list)):
        raise KernelArgumentError(
            f"kernel '{kernel_name}': args must be a tuple of arguments, got {type(args).__name__}")
    if len(args) != len(params):
        names = ", ".join(f"{p.cxx_type} {p.name}" for p in params)
        raise KernelArgumentError(
            f"kernel '{kernel_name}' takes {len(params)} argument(s) ({names}), "
            f"but {len(args)} were given")
    values = [_check(kernel_name, p, a) for p, a in zip(params, args, strict=True)]
    return values, pack(values)


def pack(values: Sequence[ArrayArg | bytes]) -> ctypes.Array:
    """The ``void*[n]`` the kernel entry unpacks: slot i points at argument
    i's bytes (a pointer's bytes being its address), each 16-byte aligned as a
    float4 argument needs. The storage hangs off the returned array."""
    raw = [v.address.to_bytes(8, "little") if isinstance(v, ArrayArg) else v for v in values]
    offsets = np.cumsum([0] + [-(-max(len(r), 1) // 16) * 16 for r in raw])
    storage = np.zeros(int(offsets[-1]) + 16, dtype=np.uint8)
    base = storage.ctypes.data + (-storage.ctypes.data) % 16
    for r, offset in zip(raw, offsets, strict=False):
        ctypes.memmove(base + int(offset), r, len(r))
    array = (ctypes.c_void_p * max(len(raw), 1))(*(base + int(o) for o in offsets[:len(raw)]))
    array._storage = storage
    return array


def _check(kernel: str, param: Param, arg: Any) -> ArrayArg | bytes:
    where = f"kernel '{kernel}', {param.describe()}"
    if arg is None and param.is_pointer:
        return ArrayArg(None, 0, 0, True)  # a null pointer, as CuPy passes None
    array = as_array(arg, where)
    if param.is_pointer:
        if array is None:
            raise KernelArgumentError(
                f"{where}: expected an array of {param.value_type} ({_dtype_text(param)}) for "
                f"`{param.cxx_type}`, got {_describe_value(arg)}")
        if param.dtype is not None and array[1] != param.dtype:
            raise KernelArgumentError(
                f"{where}: expected a {param.dtype} array for `{param.cxx_type}`, got a "
                f"{array[1]} array")
        if not param.is_const and not array[0].writable:
            raise KernelArgumentError(
                f"{where}: read-only array passed for the non-const `{param.cxx_type}`")
        return array[0]
    if array is not None:
        raise KernelArgumentError(
            f"{where}: expected a {param.value_type} value, got a {array[1]} array")
    return _value_bytes(where, param, arg)


def as_array(arg: Any, where: str) -> tuple[ArrayArg, str] | None:
    """(ArrayArg, dtype name) for a NumPy array or CPU torch tensor, else None."""
    module = type(arg).__module__
    if module.startswith("cupy"):
        raise KernelArgumentError(
            f"{where}: a CuPy array was given to the CPU emulator; pass a NumPy array")
    if isinstance(arg, np.ndarray):
        if not arg.flags.c_contiguous:
            raise KernelArgumentError(
                f"{where}: the array is not C-contiguous (strides {arg.strides}); a kernel "
                "indexes it as dense memory: pass numpy.ascontiguousarray(...)")
        return ArrayArg(arg, arg.ctypes.data, arg.nbytes, arg.flags.writeable), arg.dtype.name
    if module.startswith("torch") and type(arg).__name__ in ("Tensor", "Parameter"):
        if arg.device.type != "cpu":
            raise KernelArgumentError(
                f"{where}: a {arg.device} tensor was given to the CPU emulator; pass a CPU tensor")
        if not arg.is_contiguous():
            raise KernelArgumentError(
                f"{where}: the tensor is not contiguous (strides {tuple(arg.stride())}); a kernel "
                "indexes it as dense memory: pass tensor.contiguous()")
        dtype = str(arg.dtype).removeprefix("torch.")
        nbytes = arg.numel() * arg.element_size()
        return ArrayArg(arg, arg.data_ptr(), nbytes, True), dtype
    return None


def _value_bytes(where: str, param: Param, arg: Any) -> bytes:
    expected = param.dtype
    if param.kind == "s" or param.lanes > 1:
        raw = bytes(arg) if isinstance(arg, (bytes, bytearray, np.void, ctypes.Structure)) else None
        if raw is None or len(raw) != param.size * param.lanes:
            raise KernelArgumentError(
                f"{where}: expected {param.size * param.lanes} raw bytes (bytes, numpy.void or a "
                f"ctypes.Structure) for `{param.cxx_type}`, got {_describe_value(arg)}")
        return raw
    if isinstance(arg, np.generic):
        if arg.dtype.name != expected:
            raise KernelArgumentError(
                f"{where}: expected a {expected} scalar for `{param.cxx_type}`, got "
                f"numpy.{arg.dtype.name}")
        return arg.tobytes()
    if isinstance(arg, bool):
        if param.kind != "b":
            raise KernelArgumentError(f"{where}: expected a {expected} scalar for "
                                      f"`{param.cxx_type}`, got a Python bool")
        return np.bool_(arg).tobytes()
    if isinstance(arg, int):
        if expected not in ("int64", "uint64"):
            hint = _NUMPY_SCALAR_HINT.get(expected, f"numpy.{expected}")
            raise KernelArgumentError(
                f"{where}: a Python int for `{param.cxx_type}`: CuPy passes Python ints as 64-bit "
                f"integers, so the kernel would read garbage; pass {hint}({arg})")
        return np.array(arg, dtype=expected).tobytes()
    if isinstance(arg, float):
        if expected != "float64":
            hint = _NUMPY_SCALAR_HINT.get(expected, f"numpy.{expected}")
            raise KernelArgumentError(
                f"{where}: a Python float for `{param.cxx_type}`: CuPy passes Python floats as "
                f"double, so the kernel would read garbage; pass {hint}({arg})")
        return np.float64(arg).tobytes()
    raise KernelArgumentError(
        f"{where}: expected a {expected} scalar for `{param.cxx_type}`, got {_describe_value(arg)}")


def _dtype_text(param: Param) -> str:
    return f"dtype {param.dtype}" if param.dtype else "any dtype"


def _describe_value(arg: Any) -> str:
    if isinstance(arg, np.generic):
        return f"numpy.{arg.dtype.name} scalar"
    return f"{type(arg).__module__}.{type(arg).__qualname__}".removeprefix("builtins.")
