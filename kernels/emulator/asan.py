"""asan mode: run one launch under AddressSanitizer, in a subprocess.

memcheck sees only writes; out-of-bounds *reads* need instrumented code.
This mode builds the module and the runtime with ``-fsanitize=address`` and
runs the launch in a fresh Python with libasan preloaded (Python itself is
not instrumented, so the sanitizer cannot live in this process). The child
allocates each array at its exact size, so the first byte past its end is an
ASan redzone; it sends the arrays back after a clean launch. Arguments whose
memory overlaps (dcnv4's backward passes one buffer as grad_offset and
grad_mask) share one allocation spanning them all, at the same relative
offsets, so a write through one is seen through the other and no copy back
overwrites another's writes. An ASan report
becomes an AddressSanitizerError naming the argument the access fell next to
and the kernel's source line.

The child is ``python -m kernels.emulator.asan PAYLOAD RESULT``; the payload
carries the source, options, name expressions, kernel name, launch shape and
the arguments' bytes.
"""

from __future__ import annotations

import ctypes
import functools
import json
import os
import pickle
import re
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

from . import errors
from .arguments import ArrayArg, Param, pack
from .errors import AddressSanitizerError, EmulatorError
from .toolchain import compiler

CHILD_TIMEOUT_S = 900
_ASAN_OPTIONS = ("detect_leaks=0:halt_on_error=1:abort_on_error=0:symbolize=1:"
                 "allocator_may_return_null=1:detect_stack_use_after_return=0")


@functools.cache
def libasan() -> str:
    path = subprocess.run([compiler(), "-print-file-name=libasan.so"], capture_output=True,
                          text=True, check=True).stdout.strip()
    if not os.path.isabs(path) or not os.path.exists(path):
        raise EmulatorError(f"asan mode needs libasan; {compiler()} does not ship it")
    return os.path.realpath(path)


def launch(module, kernel: str, grid: tuple[int, int, int], block: tuple[int, int, int],
           shared_mem: int, values: Sequence[ArrayArg | bytes], params: Sequence[Param]) -> None:
    """Runs ``kernel`` of ``module`` (a RawModule) under ASan; copies written
    arrays back into ``values``' arrays. Raises what the launch found."""
    buffers, places = _shared_buffers(values)
    payload = {
        "code": module.code, "options": module.options,
        "name_expressions": module.name_expressions, "kernel": kernel,
        "grid": grid, "block": block, "shared_mem": shared_mem,
        "buffers": [(ctypes.string_at(address, nbytes), writable)
                    for address, nbytes, writable in buffers],
        # A null pointer (address 0) stays null: no buffer, so no redzone to hit.
        "args": [places.get(i) if isinstance(v, ArrayArg) else v for i, v in enumerate(values)],
    }
    with tempfile.TemporaryDirectory(prefix="dcnbench-asan-") as tmp:
        payload_path, result_path = Path(tmp) / "payload.pkl", Path(tmp) / "result.pkl"
        regions_path = Path(tmp) / "regions.json"
        payload_path.write_bytes(pickle.dumps(payload))
        package_root = str(Path(__file__).resolve().parents[2])
        env = dict(os.environ,
                   LD_PRELOAD=" ".join(filter(None, (libasan(), os.environ.get("LD_PRELOAD")))),
                   ASAN_OPTIONS=_ASAN_OPTIONS, DCNBENCH_EMULATOR_MODE="normal",
                   PYTHONPATH=os.pathsep.join(filter(None, (package_root,
                                                            os.environ.get("PYTHONPATH")))))
        child = subprocess.run(
            [sys.executable, "-m", __name__, str(payload_path), str(result_path),
             str(regions_path)],
            env=env, capture_output=True, text=True, timeout=CHILD_TIMEOUT_S)
        if not result_path.exists():
            regions = json.loads(regions_path.read_text()) if regions_path.exists() else []
            raise _child_failure(kernel, child, regions, params)
        result = pickle.loads(result_path.read_bytes())
    if "error" in result:
        raise getattr(errors, result["error"], EmulatorError)(result["message"])
    for index, data in result["buffers"].items():
        ctypes.memmove(buffers[index][0], data, len(data))


def _shared_buffers(values: Sequence[ArrayArg | bytes]
                    ) -> tuple[list[tuple[int, int, bool]], dict[int, tuple[int, int, int, bool]]]:
    """Groups the non-null array arguments whose memory overlaps: returns the
    buffers (address, nbytes, written by any of them) and, per argument index,
    (buffer index, byte offset in it, nbytes, writable)."""
    arrays = sorted((v.address, i) for i, v in enumerate(values)
                    if isinstance(v, ArrayArg) and v.address)
    buffers: list[list] = []
    owner: dict[int, int] = {}
    for address, index in arrays:
        value = values[index]
        if buffers and address < buffers[-1][0] + buffers[-1][1]:
            last = buffers[-1]
            last[1] = max(last[1], address + value.nbytes - last[0])
            last[2] = last[2] or value.writable
        else:
            buffers.append([address, value.nbytes, value.writable])
        owner[index] = len(buffers) - 1
    places = {i: (b, values[i].address - buffers[b][0], values[i].nbytes, values[i].writable)
              for i, b in owner.items()}
    return [tuple(b) for b in buffers], places


def _child_failure(kernel: str, child: subprocess.CompletedProcess, regions: list,
                   params: Sequence[Param]) -> EmulatorError:
    report = child.stderr
    header = re.search(r"ERROR: AddressSanitizer: ([\w-]+)", report)
    if not header:
        tail = "\n".join(report.splitlines()[-30:])
        return EmulatorError(f"kernel '{kernel}': the asan child exited with status "
                             f"{child.returncode} without a report:\n{tail}")
    what = [f"kernel '{kernel}': AddressSanitizer: {header.group(1)}"]
    access = re.search(r"(READ|WRITE) of size (\d+)", report)
    if access:
        what.append(f"{access.group(1)} of {access.group(2)} byte(s)")
    location = re.search(r"is located (\d+) bytes (to the right of|after|to the left of|before|"
                         r"inside of) (\d+)-byte region \[(0x[0-9a-f]+),", report)
    if location:
        offset, relation, size, start = location.groups()
        relation = {"to the right of": "after", "to the left of": "before"}.get(relation, relation)
        argument = next((params[i].describe() for i, address, _ in regions
                         if address == int(start, 16)), f"a {size}-byte heap block")
        what.append(f"{offset} byte(s) {relation} the end of {argument} ({size} bytes)"
                    if relation == "after" else f"{offset} byte(s) {relation} {argument}")
    frame = re.search(r"#\d+ 0x[0-9a-f]+ in (.+?) (\S*source\.cu:\d+)", report)
    if frame:
        what.append(f"at {os.path.basename(frame.group(2))} in {frame.group(1)}")
    excerpt = "\n".join(line for line in report.splitlines()[:40] if line.strip())
    return AddressSanitizerError(", ".join(what) + "\n\nASan report:\n" + excerpt)


def _child_main(payload_path: str, result_path: str, regions_path: str) -> None:
    from .module import _ModuleBuild, execute  # the child only: keeps the import graph one-way

    payload = pickle.loads(Path(payload_path).read_bytes())
    build = _ModuleBuild(payload["code"], payload["options"], payload["name_expressions"])
    entry = build.entries("asan")[payload["kernel"]]
    libc = ctypes.CDLL(None)
    libc.malloc.restype = ctypes.c_void_p
    libc.malloc.argtypes = [ctypes.c_size_t]
    addresses = []
    for data, _ in payload["buffers"]:
        address = libc.malloc(len(data))  # exact size: the next byte is a redzone
        ctypes.memmove(address, data, len(data))
        addresses.append(address)
    values, regions = [], []
    for index, arg in enumerate(payload["args"]):
        if isinstance(arg, bytes):
            values.append(arg)
        elif arg is None:
            values.append(ArrayArg(None, 0, 0, False))
        else:
            buffer, offset, nbytes, writable = arg
            values.append(ArrayArg(None, addresses[buffer] + offset, nbytes, writable))
            regions.append((index, addresses[buffer] + offset, nbytes))
    Path(regions_path).write_text(json.dumps(regions))  # read by the parent if ASan kills us
    try:
        execute(entry, payload["grid"], payload["block"], payload["shared_mem"], pack(values))
        result = {"buffers": {b: ctypes.string_at(addresses[b], len(data))
                              for b, (data, writable) in enumerate(payload["buffers"])
                              if writable}}
    except EmulatorError as error:
        result = {"error": type(error).__name__, "message": str(error)}
    Path(result_path).write_bytes(pickle.dumps(result))


if __name__ == "__main__":
    _child_main(*sys.argv[1:4])
