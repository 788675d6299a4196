"""The peers users install from PyPI, registered as implementations of our operators.

- ``torch_ms_deform_attn`` (torch-ms-deform-attn 0.1.1) for ``ms_deform_attn``:
  CPU and CUDA, built in CI (``nox -s peers``).
- ``deformops_<backend>`` (deformops 3.0.1; eager, triton, cuda) for
  ``ms_deform_attn``, ``deform_conv2d`` and ``modulated_deform_conv2d``: the
  GPU image only (Python >= 3.12).
- ``dcnv4_official`` (DCNv4 1.0.0.post2) for ``dcnv4`` and ``ms_deform_attn``
  (softmax cases): built on the GPU machine by ``scripts/gpu-check.sh``.

Adapters live in ``kernels.peers.<package>``: layout, coordinate and softmax
conventions are converted in prepare, outside the timed call. Each peer's
``available`` says why it is absent, and ``peer_metadata()`` (the run's
metadata) records the installed versions and builds. ``PRECISION`` says, per
implementation and dtype, whether the peer computes in that dtype or upcasts:
the peers page shows it.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from harness.operators.conv2d import conv_arguments
from harness.operators.dcnv3 import core_arguments
from harness.operators.ms_deform_attn import TENSORS
from harness.registry import IMPLEMENTATIONS, KERNEL_DTYPES, implementation, register_run_metadata
from kernels.peers import dcnv4_official, deformops, torch_ms_deform_attn

# (op, implementation) -> dtype -> "native" / "upcast to float32" / ...
PRECISION: dict[tuple[str, str], Mapping[str, str]] = {}


def peer_metadata() -> dict[str, Any]:
    """The run's ``peers`` metadata: each peer package's installed version and build ({}
    for an absent one), and how every registered implementation computes each dtype
    ("op/impl" -> dtype -> ``precision_of``), which the report's peers page shows."""
    return {
        "packages": {"torch-ms-deform-attn": torch_ms_deform_attn.metadata(),
                     "deformops": deformops.metadata(), "DCNv4": dcnv4_official.metadata()},
        "precision": {f"{op}/{impl.name}": {dtype: precision_of(op, impl.name, dtype)
                                            for dtype in impl.dtypes}
                      for (op, _), impl in IMPLEMENTATIONS.items() if impl.kind != "reference"},
    }


register_run_metadata("peers", peer_metadata)


def _msda_tensors(inputs):
    return [inputs[name] for name in TENSORS]


# --- torch-ms-deform-attn ---------------------------------------------------

@implementation("ms_deform_attn", "torch_ms_deform_attn", kind="peer",
                dtypes=("float32", "float16", "bfloat16"),
                available=torch_ms_deform_attn.available)
def _torch_ms_deform_attn(inputs, params):
    """torch-ms-deform-attn 0.1.1 (Deformable DETR's extension; half upcast to float32 inside)."""
    return torch_ms_deform_attn.prepare_ms_deform_attn(*_msda_tensors(inputs),
                                                       softmax=params["softmax"])


PRECISION[("ms_deform_attn", "torch_ms_deform_attn")] = torch_ms_deform_attn.PRECISION


# --- deformops ---------------------------------------------------------------

def _register_deformops(backend: str) -> None:
    name = f"deformops_{backend}"
    devices = deformops.BACKEND_DEVICES[backend]

    def msda(inputs, params):
        return deformops.prepare_ms_deform_attn(*_msda_tensors(inputs), softmax=params["softmax"],
                                                backend=backend)

    def conv(inputs, params):
        return deformops.prepare_deform_conv2d(
            inputs["input"], inputs["offset"], inputs.get("mask"), inputs["weight"],
            inputs.get("bias"), **conv_arguments(params), offset_groups=params["offset_groups"],
            backend=backend)

    implementation("ms_deform_attn", name, kind="peer", devices=devices, dtypes=KERNEL_DTYPES,
                   available=deformops.available,
                   description=f"deformops.registry.msda(backend=Backend.{backend.upper()})")(msda)
    for op in ("deform_conv2d", "modulated_deform_conv2d"):
        implementation(op, name, kind="peer", devices=devices, dtypes=KERNEL_DTYPES,
                       available=deformops.available,
                       description=f"deformops.registry.conv(backend=Backend.{backend.upper()}) "
                                   "on channels-last copies")(conv)
    for op in ("ms_deform_attn", "deform_conv2d", "modulated_deform_conv2d"):
        PRECISION[(op, name)] = dict.fromkeys(KERNEL_DTYPES, deformops.PRECISION[backend])


for _backend in deformops.BACKENDS:
    _register_deformops(_backend)


# --- DCNv4 -------------------------------------------------------------------

@implementation("dcnv4", "dcnv4_official", kind="peer", devices=("cuda",),
                dtypes=KERNEL_DTYPES, available=dcnv4_official.available)
def _dcnv4_official(inputs, params):
    """DCNv4 1.0.0.post2's DCNv4Function, as released (3×3 and D % 16 == 0 only)."""
    return dcnv4_official.prepare_dcnv4(inputs["input"], inputs["offset_mask"],
                                        **core_arguments(params))


@implementation("ms_deform_attn", "dcnv4_official", kind="peer", devices=("cuda",),
                dtypes=KERNEL_DTYPES, available=dcnv4_official.available)
def _dcnv4_flash_deform_attn(inputs, params):
    """DCNv4 1.0.0.post2's flash_deform_attn as its released module calls it (softmax cases)."""
    return dcnv4_official.prepare_ms_deform_attn(*_msda_tensors(inputs),
                                                 softmax=params["softmax"])


for _op in ("dcnv4", "ms_deform_attn"):
    PRECISION[(_op, "dcnv4_official")] = dcnv4_official.PRECISION


# How the other implementations compute a low-precision dtype.
OWN_PRECISION = {"kernel": "native storage, float32 arithmetic", "baseline": "native"}
GRIDSAMPLE_PRECISION = "native (every op in the dtype, grid_sample included)"


def precision_of(op: str, impl: str, dtype: str) -> str:
    """Whether ``impl`` computes ``dtype`` natively or upcasts, as far as known."""
    if (op, impl) in PRECISION:
        return PRECISION[(op, impl)].get(dtype, "–")
    if impl in ("pytorch_gridsample", "torch_compile"):
        return GRIDSAMPLE_PRECISION
    if impl == "torchvision":
        return "native (torchvision's kernels in the dtype)"
    found = IMPLEMENTATIONS.get((op, impl))
    return OWN_PRECISION.get(found.kind, "–") if found is not None else "–"
