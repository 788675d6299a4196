"""Cases: one operator with every parameter set, a dtype and an input mode.

A case id names all of that in a stable, readable form::

    deform_conv2d/N2_Cin64_Cout64_H28_W28_k3x3_s1_p1_d1_g1_og1_bias/float32/random

The middle part lists *every* parameter of the operator in its declared
order, so an id never depends on which parameters a suite file happened to
name, and the same case gets the same id in every suite and every run.
"""

from __future__ import annotations

import dataclasses
import shlex
from collections.abc import Mapping
from typing import Any

from harness.registry import Operator


def format_value(value: Any) -> str:
    """A parameter value as it appears in ids and on the command line."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        text = repr(value)  # shortest text that reads back as the same float
        return text[:-2] if text.endswith(".0") else text
    return str(value)


def params_token(params: Mapping[str, Any], op: Operator) -> str:
    """The parameter part of a case id, in the operator's declared order, with its
    ``id_keys`` and ``id_pairs``."""
    seconds = {second for second, _, _ in op.id_pairs.values()}
    tokens = []
    for name in op.params:
        value = params[name]
        if name in seconds:
            continue
        if name in op.id_pairs:
            second, key, always_both = op.id_pairs[name]
            other = params[second]
            both = always_both or other != value
            tokens.append(f"{key}{format_value(value)}x{format_value(other)}" if both
                          else f"{key}{format_value(value)}")
        elif isinstance(value, bool):
            if name in op.id_flags_if_true and not value:
                continue
            # A flag reads as its feature: "bias"/"nobias"; a negated one
            # ("no_trans") as "notrans"/"trans", never "nonotrans".
            feature = op.id_keys.get(name, name.removeprefix("no_").replace("_", ""))
            present = value != name.startswith("no_")
            tokens.append(feature if present else f"no{feature}")
        else:
            tokens.append(f"{op.id_keys.get(name, name.replace('_', ''))}{format_value(value)}")
    return "_".join(tokens)


@dataclasses.dataclass(frozen=True)
class Case:
    """One operator with every parameter set (``params`` is resolved, in the
    operator's order), a dtype name and an input mode; a parameter value the
    dtype cannot take (``Operator.validate_dtype``) raises ``ValueError``."""

    op: Operator
    params: Mapping[str, Any]
    dtype: str
    mode: str

    def __post_init__(self) -> None:
        if self.op.validate_dtype is not None:
            self.op.validate_dtype(self.params, self.dtype)

    @property
    def id(self) -> str:
        return f"{self.op.name}/{params_token(self.params, self.op)}/{self.dtype}/{self.mode}"

    def reproduce_command(self, impl: str, device: str, seed: int, backward: bool) -> str:
        """The ``dcnbench case`` command that runs this case again."""
        words = ["dcnbench", "case", self.op.name, "--param"]
        words += [f"{name}={format_value(value)}" for name, value in self.params.items()]
        words += ["--dtype", self.dtype, "--mode", self.mode, "--impl", impl,
                  "--device", device, "--seed", str(seed)]
        if backward:
            words.append("--backward")
        return shlex.join(words)


def make_case(op: Operator, overrides: Mapping[str, Any], dtype: str, mode: str) -> Case:
    """A case from parameter ``overrides`` (defaults fill the rest).

    Raises ``ValueError`` naming the bad parameter, dtype or mode.
    """
    if dtype not in op.tolerances:
        raise ValueError(
            f"operator {op.name!r} is not checked at dtype {dtype!r}; "
            f"expected one of: {', '.join(op.tolerances)}"
        )
    if mode not in op.input_modes:
        raise ValueError(
            f"operator {op.name!r} has no input mode {mode!r}; "
            f"expected one of: {', '.join(op.input_modes)}"
        )
    return Case(op, op.resolve(overrides), dtype, mode)
