"""The registry: operators and the implementations that compute them.

An *operator* is one function of the contract (``../shared/ops-semantics.md``):
its parameters with defaults, the tensors it takes, one input generator, FLOP
and byte counts, per-dtype tolerances and whether it has a backward.

An *implementation* is one way to compute an operator: our CuPy kernels, the
float64 reference, or a peer users would otherwise pick. Adding one is a
single registered ``prepare`` function::

    @implementation("deform_conv2d", "torchvision", kind="peer",
                    devices=("cpu", "cuda"), dtypes=("float32", "float16"))
    def torchvision_deform_conv2d(inputs, params):
        kwargs = conv_arguments(params)           # once per case
        return functools.partial(torchvision.ops.deform_conv2d, inputs["input"], ..., **kwargs)

``prepare(inputs, params)`` takes the generated input tensors (a dict keyed
by the contract's tensor names) and the case's full parameter dict, does
everything that is not the operator's work (argument checks, layout
conversion, imports, workspace allocation, value checks and so every host
synchronisation) and returns ``call``: a function of no arguments that
computes the output tensor and nothing else. The harness times ``call``
alone (``docs/timing.md``). Backward passes go through autograd of ``call``'s
output, so an implementation's gradients are whatever its autograd (or its
own ``torch.autograd.Function``) computes.

Implementations, operators and metrics from outside this repository register
the same way from a plugin module (``harness.plugins``).
"""

from __future__ import annotations

import dataclasses
import importlib
from collections.abc import Callable, Mapping
from contextlib import AbstractContextManager
from typing import Any, Literal

import torch

DTYPES: dict[str, torch.dtype] = {
    "float64": torch.float64,
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
}
KERNEL_DTYPES = ("float32", "float16", "bfloat16")
ImplKind = Literal["kernel", "reference", "peer", "baseline"]
IMPL_KINDS: tuple[str, ...] = ("kernel", "reference", "peer", "baseline")
DEVICES = ("cpu", "cuda")


class RegistryError(LookupError):
    """An unknown operator or implementation, or a conflicting registration."""


@dataclasses.dataclass(frozen=True)
class Tolerance:
    """Largest accepted errors against the float64 reference.

    ``rel_l2`` bounds ||out - ref|| / ||ref||; ``max_abs`` bounds
    max |out - ref| relative to max |ref| (so it scales with the data).
    ``why`` says where the numbers come from; it is shown in docs and reports.
    """

    rel_l2: float
    max_abs: float
    why: str


@dataclasses.dataclass(frozen=True)
class CaseTolerance:
    """The bounds of the ``dtype`` cases whose parameters have the values ``params``
    (a float32 case computed on TF32, say), in place of the dtype's.

    ``backward`` judges the gradients; None: ``forward`` judges them too.
    """

    params: Mapping[str, Any]
    dtype: str
    forward: Tolerance
    backward: Tolerance | None = None

    def applies(self, params: Mapping[str, Any], dtype: str) -> bool:
        return dtype == self.dtype and all(params.get(k) == v for k, v in self.params.items())


@dataclasses.dataclass(frozen=True)
class TensorSpec:
    """One tensor of an operator: its contract name, shape and role."""

    name: str
    shape: str  # as written in the contract, e.g. "[N, C_in, H, W]"
    differentiable: bool = True  # has a gradient in the backward check
    optional: bool = False  # absent for some parameter values (e.g. bias)


@dataclasses.dataclass(frozen=True)
class Operator:
    """One operator of the contract.

    ``make_inputs(params, dtype, device, generator, mode)`` returns the input
    tensors keyed by name, drawn from ``generator`` (a seeded
    ``torch.Generator`` on the CPU) and rounded to ``dtype`` (a
    ``torch.dtype``) on ``device`` (a device string, "cpu" or "cuda"); ``mode``
    picks one of ``input_modes`` ("random" or an edge-case generator such as
    "integer_offsets"). ``flops(params)`` and ``bytes(params, itemsize)``
    count the forward pass; ``backward_flops`` and ``backward_bytes`` the
    backward, when the operator has one. ``backward_tolerances`` judge the
    gradients when they need other bounds than ``tolerances`` (longer sums,
    atomics); without it the gradients are judged by ``tolerances``.
    ``baseline`` names the implementation speedups are measured against,
    ``output_dtype`` the dtype each produced tensor must have,
    ``id_keys`` / ``id_pairs`` how the case id writes the parameters and
    ``sampling_view`` draws a saved case (``harness.sampling``): what is
    particular to an operator is declared here, never in the harness core.
    ``case_tolerances`` judge particular cases by other bounds than their
    dtype's; ``validate_dtype(params, dtype)`` rejects a parameter value the
    dtype cannot take; ``requirement(params)`` names, in words, what a case asks
    of an implementation beyond the operator (TF32 products, say; None for an
    ordinary case): only an implementation that says it honours it runs such a
    case (``Implementation.declines``), the others' rows are skipped.
    """

    name: str
    summary: str
    params: Mapping[str, Any]  # every parameter with its default, in id order
    tensors: tuple[TensorSpec, ...]
    make_inputs: Callable[..., dict[str, torch.Tensor]]
    flops: Callable[[Mapping[str, Any]], float]
    bytes: Callable[[Mapping[str, Any], int], float]
    tolerances: Mapping[str, Tolerance]  # keyed by dtype name
    has_backward: bool = True
    backward_flops: Callable[[Mapping[str, Any]], float] | None = None
    backward_bytes: Callable[[Mapping[str, Any], int], float] | None = None
    input_modes: tuple[str, ...] = ("random",)
    baseline: str = ""  # implementation that speedups are measured against
    forward_only_modes: tuple[str, ...] = ()  # modes on a kink: no gradient check
    validate: Callable[[Mapping[str, Any]], None] | None = None
    backward_tolerances: Mapping[str, Tolerance] | None = None
    # Case ids (harness.cases): a short key per parameter (others are written under
    # their own name without underscores), and parameter pairs written as one token:
    # first -> (second, key, always both), e.g. kernel_h -> ("kernel_w", "k", True).
    id_keys: Mapping[str, str] = dataclasses.field(default_factory=dict)
    id_pairs: Mapping[str, tuple[str, str, bool]] = dataclasses.field(default_factory=dict)
    # The view of where one output samples its input (reports' sampling page), from a
    # saved case's params and arrays; None for an operator without one.
    sampling_view: Callable[[Mapping[str, Any], Mapping[str, Any]], Any] | None = None
    # The dtype (name) an implementation must return for tensor ``name`` ("output",
    # "grad_<input>") of a case at ``dtype``; None: the case's dtype, for every tensor.
    output_dtype: Callable[[str, str], str] | None = None
    case_tolerances: tuple[CaseTolerance, ...] = ()
    validate_dtype: Callable[[Mapping[str, Any], str], None] | None = None
    requirement: Callable[[Mapping[str, Any]], str | None] | None = None
    # Boolean parameters the case id names only when true (added after ids were in
    # use: the ids of the cases that leave them false stay what they were).
    id_flags_if_true: tuple[str, ...] = ()

    def expected_dtype(self, tensor: str, dtype: str) -> str:
        """The dtype an implementation's ``tensor`` must have in a case at ``dtype``."""
        return dtype if self.output_dtype is None else self.output_dtype(tensor, dtype)

    def tolerance(self, dtype: str, direction: str,
                  params: Mapping[str, Any] | None = None) -> Tolerance:
        """The bounds that judge ``direction`` ("forward" or "backward") at ``dtype``: the
        first of ``case_tolerances`` that applies to the case's ``params``, else the
        dtype's (``params`` None: the dtype's)."""
        for special in self.case_tolerances:
            if params is not None and special.applies(params, dtype):
                if direction == "backward" and special.backward is not None:
                    return special.backward
                return special.forward
        table = self.tolerances
        if direction == "backward" and self.backward_tolerances is not None:
            table = self.backward_tolerances
        try:
            return table[dtype]
        except KeyError:
            raise RegistryError(
                f"operator {self.name!r} has no {direction} tolerance for {dtype}; "
                f"it has: {', '.join(table)}"
            ) from None

    def resolve(self, overrides: Mapping[str, Any]) -> dict[str, Any]:
        """Full parameter dict: defaults overridden by ``overrides``.

        Unknown names and values of the wrong type raise ``ValueError`` naming
        the parameter and what was expected.
        """
        unknown = sorted(set(overrides) - set(self.params))
        if unknown:
            raise ValueError(
                f"operator {self.name!r} has no parameter {unknown[0]!r}; "
                f"expected one of: {', '.join(self.params)}"
            )
        resolved = dict(self.params)
        for key, value in overrides.items():
            resolved[key] = _coerce(self.name, key, value, self.params[key])
        if self.validate is not None:
            self.validate(resolved)
        return resolved


def _coerce(op: str, key: str, value: Any, default: Any) -> Any:
    """Give ``value`` the type of the parameter's default, or say why not."""
    kind = type(default)
    if kind is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "1", "0"):
            return value.lower() in ("true", "1")
        if isinstance(value, int) and value in (0, 1):
            return bool(value)
    elif kind is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, str):
            try:
                return int(value)
            except ValueError:
                pass
    elif kind is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
    else:
        return value
    raise ValueError(
        f"parameter {key!r} of operator {op!r} expects {kind.__name__}, "
        f"got {value!r} ({type(value).__name__})"
    )


@dataclasses.dataclass(frozen=True)
class Implementation:
    """One way to compute an operator.

    ``prepare(inputs, params)`` returns the timed call (module docstring);
    ``forward(inputs, params)`` prepares and calls once. ``available(device)``
    returns ``None`` when the implementation can run on ``device`` here, or
    the reason it cannot (a missing package, no GPU ...).
    """

    op: str
    name: str
    kind: ImplKind
    devices: tuple[str, ...]
    dtypes: tuple[str, ...]
    prepare: Callable[[Mapping[str, torch.Tensor], Mapping[str, Any]], Callable[[], Any]]
    available: Callable[[str], str | None] = lambda device: None
    has_backward: bool = True
    emulated_on: tuple[str, ...] = ()  # devices where it runs through kernels.emulator
    # dtype -> why a *peer* is known to miss the contract's accuracy there (it
    # computes in that dtype, say). Such a peer's finite out-of-tolerance rows
    # are "xfail": recorded with their errors, not failing the run. Our own
    # kernels and references can never declare one.
    known_inaccurate: Mapping[str, str] = dataclasses.field(default_factory=dict)
    description: str = ""
    source: str = ""  # the module that registered it (a plugin's, for outside ones)
    # A baseline that computes a related operator on the same inputs (torchvision's
    # roi_align for the deformable RoI pools): that operator's reference judges it.
    judged_as: str = ""
    # (params, device, direction) -> why it does not honour the case's
    # ``Operator.requirement`` there, or None when it does; None: it honours none.
    declines: Callable[[Mapping[str, Any], str, str], str | None] | None = None

    def forward(self, inputs: Mapping[str, torch.Tensor], params: Mapping[str, Any]) -> Any:
        """Prepare and call once: the output tensor."""
        return self.prepare(inputs, params)()

    def unavailable_reason(self, device: str, dtype: str) -> str | None:
        """Why this implementation cannot run ``dtype`` on ``device``, or None."""
        if dtype not in self.dtypes:
            return f"{self.op}/{self.name} does not take {dtype} (takes {', '.join(self.dtypes)})"
        return self.unavailable_on(device)

    def declined(self, op: Operator, params: Mapping[str, Any], device: str,
                 direction: str) -> str | None:
        """Why this implementation does not run the case of ``op`` with ``params`` on
        ``device`` in ``direction``: the case's requirement it does not honour; None
        when the case has none or it honours it."""
        needed = op.requirement(params) if op.requirement is not None else None
        if needed is None:
            return None
        if self.declines is None:
            return f"{self.op}/{self.name} does not say it honours {needed}"
        reason = self.declines(params, device, direction)
        if reason is None:
            return None
        return f"{self.op}/{self.name} does not honour {needed}: {reason}"

    def unavailable_on(self, device: str) -> str | None:
        """Why this implementation cannot run on ``device`` here, or None.

        A device in ``emulated_on`` counts as one it runs on.
        """
        runs_on = self.devices + tuple(d for d in self.emulated_on if d not in self.devices)
        if device not in runs_on:
            return f"{self.op}/{self.name} does not run on {device} (runs on {', '.join(runs_on)})"
        if device == "cuda" and not torch.cuda.is_available():
            return "no CUDA device here"
        return self.available(device)

    def is_emulated(self, device: str) -> bool:
        """Whether running on ``device`` goes through ``kernels.emulator``."""
        return device in self.emulated_on


def kernel_availability(module: str) -> Callable[[str], str | None]:
    """``available`` for our CuPy kernels in ``module`` (e.g. "kernels.ops.dcnv3").

    On a GPU they launch through CuPy, on the CPU through ``kernels.emulator``;
    the reason names what is missing here.
    """

    def available(device: str) -> str | None:
        backend = "cupy" if device == "cuda" else "kernels.emulator"
        for name in (module, backend):
            try:
                importlib.import_module(name)
            except (ImportError, OSError) as error:
                return f"{name} is not importable: {error}"
        if device == "cuda" and not torch.cuda.is_available():
            return "no CUDA GPU visible to torch"
        return None

    return available


OPERATORS: dict[str, Operator] = {}
IMPLEMENTATIONS: dict[tuple[str, str], Implementation] = {}
# Observers of every checked call (never of a timed one), registered by the modules
# that know the kernels (harness.operators.launches): each returns a context manager
# whose value, called after the call, gives the row fields to set ({} for none).
CHECK_OBSERVERS: list[Callable[[], AbstractContextManager[Callable[[], dict[str, Any]]]]] = []
# The counter of a checked call's emulated launches (``dcnbench run --device counters``),
# registered by harness.operators.launches: ``counter(case, impl_name, direction)`` is a
# context manager whose value, called after the call, gives the row's ``counters`` (None
# when the call launched no emulated kernel).
LAUNCH_COUNTERS: list[Callable[..., AbstractContextManager[Callable[[], dict[str, float] | None]]]] = []


def register_operator(op: Operator) -> Operator:
    if op.name in OPERATORS:
        raise RegistryError(f"operator {op.name!r} is registered twice")
    OPERATORS[op.name] = op
    return op


def implementation(
    op: str,
    name: str,
    *,
    kind: ImplKind,
    devices: tuple[str, ...] = DEVICES,
    dtypes: tuple[str, ...] = KERNEL_DTYPES,
    available: Callable[[str], str | None] | None = None,
    has_backward: bool = True,
    emulated_on: tuple[str, ...] = (),
    known_inaccurate: Mapping[str, str] | None = None,
    description: str | None = None,
    judged_as: str = "",
    declines: Callable[[Mapping[str, Any], str, str], str | None] | None = None,
) -> Callable[[Callable], Callable]:
    """Decorator registering ``prepare(inputs, params) -> call`` as an implementation
    of the registered operator ``op``; ``description`` defaults to the first line of
    its docstring. ``judged_as`` names the related operator a baseline computes
    (its reference judges the rows; the row's case stays ``op``'s, so speedups
    join). ``declines(params, device, direction)`` says why it does not honour a
    case's ``Operator.requirement`` (None when it does)."""
    if kind not in IMPL_KINDS:
        raise RegistryError(f"implementation kind must be one of {IMPL_KINDS}, got {kind!r}")
    if judged_as and kind != "baseline":
        raise RegistryError(f"{op}/{name}: only a baseline may be judged as another operator "
                            f"({judged_as!r}), not a {kind}")
    if known_inaccurate and kind != "peer":
        raise RegistryError(
            f"{op}/{name}: only peers may declare known_inaccurate dtypes, not a {kind}"
        )

    def register(fn: Callable) -> Callable:
        key = (op, name)
        if op not in OPERATORS:  # a plugin imported first: the built-in operators now
            import harness.operators  # noqa: F401  (registers on import)
        if op not in OPERATORS:
            raise RegistryError(
                f"implementation {op}/{name} names an unknown operator {op!r}; register the "
                f"operator first (known: {', '.join(sorted(OPERATORS)) or 'none'})"
            )
        if key in IMPLEMENTATIONS:
            raise RegistryError(f"implementation {op}/{name} is registered twice")
        IMPLEMENTATIONS[key] = Implementation(
            op=op,
            name=name,
            kind=kind,
            devices=tuple(devices),
            dtypes=tuple(dtypes),
            prepare=fn,
            available=available or (lambda device: None),
            has_backward=has_backward,
            emulated_on=tuple(emulated_on),
            known_inaccurate=dict(known_inaccurate or {}),
            description=description or (fn.__doc__ or "").strip().split("\n")[0],
            source=getattr(fn, "__module__", "") or "",
            judged_as=judged_as,
            declines=declines,
        )
        return fn

    return register


# What registered modules add to a run's metadata: name -> a function returning a
# JSON-able value (the installed peers' versions and builds, say).
RUN_METADATA: dict[str, Callable[[], Any]] = {}


def register_run_metadata(name: str, provide: Callable[[], Any]) -> None:
    if name in RUN_METADATA:
        raise RegistryError(f"run metadata {name!r} is registered twice")
    RUN_METADATA[name] = provide


def run_metadata() -> dict[str, Any]:
    """Every registered module's contribution to a run's metadata, by name."""
    load_all()
    return {name: provide() for name, provide in RUN_METADATA.items()}


def load_all() -> None:
    """Import every module that registers operators and implementations: the
    built-in ones, then the installed plugins (``harness.plugins``)."""
    import harness.operators  # noqa: F401  (registers on import)
    from harness import plugins

    plugins.load_entry_points()


def get_operator(name: str) -> Operator:
    load_all()
    try:
        return OPERATORS[name]
    except KeyError:
        raise RegistryError(
            f"unknown operator {name!r}; expected one of: {', '.join(sorted(OPERATORS))}"
        ) from None


def implementations_of(op: str) -> list[Implementation]:
    get_operator(op)
    return [impl for (o, _), impl in IMPLEMENTATIONS.items() if o == op]


def get_implementation(op: str, name: str) -> Implementation:
    impls = implementations_of(op)
    for impl in impls:
        if impl.name == name:
            return impl
    raise RegistryError(
        f"operator {op!r} has no implementation {name!r}; "
        f"expected one of: {', '.join(i.name for i in impls)}"
    )


def reference_of(op: str) -> Implementation:
    """The operator's implementation of kind "reference": the float64 oracle."""
    references = [impl for impl in implementations_of(op) if impl.kind == "reference"]
    if len(references) != 1:
        raise RegistryError(
            f"operator {op!r} needs exactly one implementation of kind 'reference', "
            f"has {len(references)}"
        )
    return references[0]
