"""Suite files: which cases a run sweeps, and with which implementations.

A suite is a TOML file in ``suites/`` (the format is documented in
``docs/harness.md``). Every sweep names operators, fixed parameters, axes
swept as a cartesian product, groups of tied parameters, filters, dtypes,
input modes and implementations, and expands into cases. Loading checks the
file's structure with pydantic (``SuiteTable``: known keys, their types) and
then every name and value against the registry (operators, their parameters
and the parameters' types, implementations, dtypes, modes), so a malformed
suite fails before anything runs, with the file, the key, what was expected
and what came.
"""

from __future__ import annotations

import ast
import dataclasses
import hashlib
import itertools
import json
import math
import operator as pyop
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StrictBool,
    StrictFloat,
    StrictInt,
    StrictStr,
    ValidationError,
)

from harness import plugins, registry
from harness.cases import Case

SUITES_DIR = Path(__file__).resolve().parent.parent / "suites"
# A suite's axes multiply: the count is checked before any point is made, so a
# few lines cannot ask for millions of cases (the largest suite in suites/ has
# a few thousand).
MAX_SUITE_CASES = 100_000
# Filters are small expressions: bounded so that evaluating one stays cheap.
MAX_FILTER_NODES = 200
MAX_FILTER_STRING = 10_000

class SuiteError(ValueError):
    """A malformed suite file; the message names the file, the key and what was expected."""


# --- the file's structure -------------------------------------------------------------
# Each field's description says what is expected there, for the error messages. Values
# whose type depends on the operator (parameters, axes, names) are checked against the
# registry afterwards.

class _Table(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class SweepTable(_Table):
    op: StrictStr | list[StrictStr] = Field(description="a string or list")
    impls: Any = Field(None, description="a list of names or \"all\"")
    dtypes: Any = Field(None, description="a list of names or \"all\"")
    modes: Any = Field(None, description="a list of names or \"all\"")
    backward: StrictBool = Field(False, description="a boolean")
    params: dict[str, Any] = Field(default_factory=dict, description="a table")
    axes: dict[str, Any] = Field(default_factory=dict, description="a table")
    tied: dict[str, Any] = Field(default_factory=dict, description="a table")
    filters: list[Any] = Field(default_factory=list, description="a list")


class OverrideTable(_Table):
    """Keys of a sweep that ``override`` replaces in every sweep of a suite."""

    impls: Any = Field(None, description="a list of names or \"all\"")
    dtypes: Any = Field(None, description="a list of names or \"all\"")
    modes: Any = Field(None, description="a list of names or \"all\"")
    backward: StrictBool = Field(False, description="a boolean")


class SuiteTable(_Table):
    description: StrictStr = Field(description="a string")
    seed: StrictInt = Field(0, description="an integer")
    extends: StrictStr | None = Field(None, description="a string")
    override: dict[str, Any] = Field(default_factory=dict, description="a table")
    sweep: list[SweepTable] = Field(min_length=1, description="a list")
    plugins: list[StrictStr] = Field(default_factory=list, description="a list of module names")
    case_timeout: StrictInt | StrictFloat | None = Field(
        None, gt=0, description="a positive number of seconds")


def _validated(model: type[BaseModel], data: Any, where: _Where) -> Any:
    """``data`` as ``model``, or a SuiteError naming the first bad key."""
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise SuiteError(_message(exc.errors()[0], model, where)) from None


def _message(error: dict, model: type[BaseModel], where: _Where) -> str:
    """A pydantic error as "<file>: <key>: <what was expected>, got <what came>"."""
    key, current, field = where, model, None
    for part in error["loc"]:
        if isinstance(part, int):
            key = key.at(f"[{part}]")
            continue
        if current is None or part not in current.model_fields:
            if error["type"] == "extra_forbidden":
                return (f"{key.at(part)}: unknown key; expected one of: "
                        f"{', '.join(sorted(current.model_fields))}")
            break
        key, field = key.at(part), current.model_fields[part]
        inner = [a for a in getattr(field.annotation, "__args__", ()) if isinstance(a, type)]
        current = next((a for a in (field.annotation, *inner)
                        if isinstance(a, type) and issubclass(a, BaseModel)), None)
    if field is not None and field.annotation == list[SweepTable] and error["type"] != "missing":
        return f"{where.at('sweep')}: expected one or more [[sweep]] tables"
    expected = field.description if field is not None else "a table"
    if error["type"] == "missing":
        return f"{key}: missing; expected {expected}"
    return f"{key}: expected {expected}, got {_show(error['input'])}"


@dataclasses.dataclass(frozen=True)
class SuiteCase:
    """A case of a suite with the implementations to run and whether to run backward."""

    case: Case
    impls: tuple[str, ...]
    backward: bool


@dataclasses.dataclass(frozen=True)
class Suite:
    name: str
    path: Path
    description: str
    seed: int
    sha256: str  # of the file's bytes (and of the suites it extends), for the run metadata
    cases: tuple[SuiteCase, ...]
    plugins: tuple[str, ...] = ()  # modules imported before the sweeps are expanded
    case_timeout: float | None = None  # seconds a worker's row may take (--case-timeout)


def resolve_path(name_or_path: str) -> Path:
    """A suite given by name (``suites/NAME.toml``) or by path."""
    path = Path(name_or_path)
    if path.suffix == ".toml" or path.exists():
        return path
    return SUITES_DIR / f"{name_or_path}.toml"


def available_suites() -> list[str]:
    return sorted(p.stem for p in SUITES_DIR.glob("*.toml"))


def load(name_or_path: str) -> Suite:
    """Parse, check and expand a suite. Raises ``SuiteError``."""
    path = resolve_path(name_or_path)
    if not path.is_file():
        raise SuiteError(
            f"{name_or_path}: no such suite; expected a path to a .toml file or one of: "
            f"{', '.join(available_suites())}"
        )
    data, digest, label = _read_with_bases(path, seen=())
    where = _Where(label)
    table = _validated(SuiteTable, data, where)
    try:
        plugins.load(table.plugins, route=f"suite {path}")
    except plugins.PluginError as exc:
        raise SuiteError(f"{where.at('plugins')}: {exc}") from None
    sweeps = table.sweep
    cases: dict[str, tuple[SuiteCase, str]] = {}
    for index, sweep in enumerate(sweeps):
        sweep_where = where.at(f"sweep[{index}]")
        for suite_case in _expand_sweep(sweep, sweep_where, MAX_SUITE_CASES - len(cases)):
            case_id = suite_case.case.id
            if case_id in cases:
                raise SuiteError(
                    f"{sweep_where}: case {case_id} is also produced by {cases[case_id][1]}; "
                    "expected every case once"
                )
            cases[case_id] = (suite_case, sweep_where.key)
    if not cases:
        raise SuiteError(f"{where}: the sweeps produce no case; expected at least one")
    return Suite(
        name=path.stem,
        path=path,
        description=table.description,
        seed=table.seed,
        sha256=digest,
        cases=tuple(suite_case for suite_case, _ in cases.values()),
        plugins=tuple(table.plugins),
        case_timeout=table.case_timeout,
    )


def _read_with_bases(path: Path, seen: tuple[Path, ...]) -> tuple[dict[str, Any], str, str]:
    """The file's table with ``extends`` and ``override`` applied, a digest of every
    file it was made from, and how errors in its sweeps name those files."""
    where = _Where(str(path))
    raw = path.read_bytes()
    try:
        data = tomllib.loads(raw.decode())
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise SuiteError(f"{path}: not valid TOML: {exc}") from None
    digest = hashlib.sha256(raw)
    label = str(path)
    if "extends" in data:
        extends = data["extends"]
        if not isinstance(extends, str):
            raise SuiteError(f"{where.at('extends')}: expected a string, got {_show(extends)}")
        base_path = resolve_path(extends)
        if base_path.resolve() in seen + (path.resolve(),):
            raise SuiteError(f"{where.at('extends')}: {base_path} extends itself")
        if not base_path.is_file():
            raise SuiteError(f"{where.at('extends')}: no suite {extends!r}")
        base, base_digest, base_label = _read_with_bases(base_path, seen + (path.resolve(),))
        digest.update(base_digest.encode())
        label = f"{path} (extends {base_label})"
        if "sweep" in data:
            raise SuiteError(f"{where.at('sweep')}: a suite that extends another takes its "
                             "sweeps; expected no sweep of its own")
        data = {**base, **{k: v for k, v in data.items() if k not in ("extends", "sweep")}}
        if "base_sweeps" in data:
            data["sweep"] = _base_sweeps(data.pop("base_sweeps"), base.get("sweep"),
                                         where.at("base_sweeps"), extends)
    if "override" in data:
        override = _validated(OverrideTable, data.pop("override"), where.at("override"))
        replaced = override.model_dump(exclude_unset=True)
        sweeps = data.get("sweep")
        if isinstance(sweeps, list):
            data["sweep"] = [{**s, **replaced} if isinstance(s, dict) else s for s in sweeps]
    return data, digest.hexdigest(), label


def _base_sweeps(picked: Any, sweeps: Any, where: _Where, extends: str) -> list[Any]:
    """The base's sweeps at the indices ``picked`` (a suite that extends another may take
    some of them only: those its override can apply to)."""
    count = len(sweeps) if isinstance(sweeps, list) else 0
    if not (isinstance(picked, list) and picked and all(
            type(i) is int and 0 <= i < count for i in picked)):
        raise SuiteError(f"{where}: expected a non-empty list of indices of {extends}'s "
                         f"{count} sweeps (0 to {count - 1}), got {_show(picked)}")
    return [sweeps[i] for i in picked]


def _expand_sweep(sweep: SweepTable, where: _Where, budget: int) -> list[SuiteCase]:
    """The sweep's cases; SuiteError if they would be more than ``budget``
    (what MAX_SUITE_CASES leaves after the sweeps before)."""
    op_names = [sweep.op] if isinstance(sweep.op, str) else sweep.op
    if not op_names:
        raise SuiteError(f"{where.at('op')}: expected an operator name or a list of them, "
                         f"got {_show(op_names)}")
    expanded = []
    for op_name in op_names:
        try:
            op = registry.get_operator(op_name)
        except registry.RegistryError as exc:
            raise SuiteError(f"{where.at('op')}: {exc}") from None
        expanded += _expand_op(op, sweep, where, budget - len(expanded))
    return expanded


def _expand_op(op: registry.Operator, sweep: SweepTable, where: _Where,
               budget: int) -> list[SuiteCase]:
    all_impls = [impl.name for impl in registry.implementations_of(op.name)]
    impls = _names(sweep.impls, where.at("impls"), all_impls, default=all_impls)
    dtypes = _names(sweep.dtypes, where.at("dtypes"), list(op.tolerances), default=["float32"])
    modes = _names(sweep.modes, where.at("modes"), list(op.input_modes), default=["random"])
    backward = sweep.backward

    fixed = sweep.params
    for name, value in fixed.items():
        _check_param(op, where.at("params").at(name), name, value)
    axes = sweep.axes
    for name, values in axes.items():
        _check_axis(op, where.at("axes").at(name), name, values)
    tied = sweep.tied
    for group, entries in tied.items():
        key = where.at("tied").at(group)
        if not isinstance(entries, list) or not entries or not all(
            isinstance(e, dict) for e in entries
        ):
            raise SuiteError(f"{key}: expected a non-empty list of parameter tables, "
                             f"got {_show(entries)}")
        for i, entry in enumerate(entries):
            for name, value in entry.items():
                _check_param(op, key.at(f"[{i}]").at(name), name, value)
    _check_set_once(fixed, axes, tied, where)
    filters = [
        Filter(text, where.at(f"filters[{i}]"), op) for i, text in enumerate(sweep.filters)
    ]

    axis_points = [[(name, v) for v in values] for name, values in axes.items()]
    group_points = [list(entries) for entries in tied.values()]
    factors = {**{f"axes.{name}": len(values) for name, values in axes.items()},
               **{f"tied.{group}": len(entries) for group, entries in tied.items()},
               "dtypes": len(dtypes), "modes": len(modes)}
    count = math.prod(factors.values())
    if count > budget:
        product = " × ".join(f"{key} ({n})" for key, n in factors.items())
        raise SuiteError(f"{where}: {op.name}: {product} = {count:,} cases; expected at most "
                         f"{MAX_SUITE_CASES:,} in the whole suite ({budget:,} left for this "
                         "sweep): split the suite or drop axis values")
    cases = []
    for combo in itertools.product(*axis_points, *group_points):
        overrides = dict(fixed)
        for part in combo:
            overrides.update(part.items() if isinstance(part, dict) else [part])
        try:
            params = op.resolve(overrides)
        except ValueError as exc:
            raise SuiteError(f"{where}: point {overrides}: {exc}") from None
        try:
            kept = all(f(params) for f in filters)
        except FilterError as exc:
            case_id = Case(op, params, dtypes[0], modes[0]).id
            raise SuiteError(f"{exc.filter.where}: {exc.filter.text!r} on case {case_id}: "
                             f"{exc}") from None
        if kept:
            try:
                cases += [
                    SuiteCase(Case(op, params, dtype, mode), tuple(impls), backward)
                    for dtype in dtypes
                    for mode in modes
                ]
            except ValueError as exc:  # a parameter one of the dtypes cannot take
                raise SuiteError(f"{where}: point {overrides}: {exc}") from None
    return cases


def _check_set_once(fixed: dict, axes: dict, tied: dict, where: _Where) -> None:
    """Each parameter is set in one place only: ``params``, ``axes`` or one tied group."""
    places: dict[str, str] = {}
    sources = [("params", fixed.keys()), ("axes", axes.keys())]
    sources += [(f"tied.{group}", {n for e in entries for n in e}) for group, entries in tied.items()]
    for place, names in sources:
        for name in names:
            if name in places:
                raise SuiteError(f"{where.at(place).at(name)}: also set in "
                                 f"{where.at(places[name])}; expected each parameter once")
            places[name] = place


class FilterError(Exception):
    """A filter that cannot be evaluated at a point (load turns it into a SuiteError)."""

    def __init__(self, filter: Filter, message: str):
        super().__init__(message)
        self.filter = filter


class Filter:
    """A boolean expression over a case's parameters, e.g. ``"C_out >= C_in"``.

    Parsed with ``ast`` and evaluated by walking the tree: only parameter
    names, numbers, booleans, strings, arithmetic, comparisons and
    and/or/not are accepted, so a suite file cannot run code.
    """

    BINARY = {ast.Add: pyop.add, ast.Sub: pyop.sub, ast.Mult: pyop.mul,
              ast.Div: pyop.truediv, ast.FloorDiv: pyop.floordiv, ast.Mod: pyop.mod}
    COMPARE = {ast.Eq: pyop.eq, ast.NotEq: pyop.ne, ast.Lt: pyop.lt, ast.LtE: pyop.le,
               ast.Gt: pyop.gt, ast.GtE: pyop.ge}
    UNARY = {ast.Not: pyop.not_, ast.USub: pyop.neg}

    def __init__(self, text: Any, where: _Where, op: registry.Operator):
        if not isinstance(text, str):
            raise SuiteError(f"{where}: expected an expression string, got {_show(text)}")
        self.text = text
        self.where = where
        try:
            self.tree = ast.parse(text, mode="eval").body
        except SyntaxError as exc:
            raise SuiteError(f"{where}: {text!r} is not an expression: {exc.msg}") from None
        except (RecursionError, MemoryError):
            self._too_large()
        if sum(1 for _ in ast.walk(self.tree)) > MAX_FILTER_NODES:
            self._too_large()
        self._check(self.tree, op)

    def _too_large(self) -> None:
        raise SuiteError(f"{self.where}: {self.text[:80]!r}... is too large; expected an "
                         f"expression of at most {MAX_FILTER_NODES} names, numbers and operators")

    def _check(self, node: ast.AST, op: registry.Operator) -> None:
        if isinstance(node, ast.Name):
            if node.id not in op.params:
                raise SuiteError(f"{self.where}: unknown name {node.id!r} in {self.text!r}; "
                                 f"expected a parameter of {op.name}: {', '.join(op.params)}")
            return
        allowed = (
            (isinstance(node, ast.Constant) and isinstance(node.value, (int, float, str)))
            or (isinstance(node, ast.BinOp) and type(node.op) in self.BINARY)
            or (isinstance(node, ast.UnaryOp) and type(node.op) in self.UNARY)
            or (isinstance(node, ast.Compare) and all(type(o) in self.COMPARE for o in node.ops))
            or isinstance(node, ast.BoolOp)
        )
        if not allowed:
            raise SuiteError(
                f"{self.where}: {ast.unparse(node)!r} in {self.text!r} is not allowed; expected "
                "parameter names, numbers, arithmetic, comparisons and and/or/not"
            )
        for child in ast.iter_child_nodes(node):
            if not isinstance(child, (ast.operator, ast.cmpop, ast.unaryop, ast.boolop)):
                self._check(child, op)

    def __call__(self, params: Mapping[str, Any]) -> bool:
        """Whether the point holds; FilterError where the expression cannot be
        evaluated there (a division by zero, a string compared with a number)."""
        try:
            return bool(self._eval(self.tree, params))
        except (ArithmeticError, TypeError, ValueError) as exc:
            raise FilterError(self, str(exc)) from None

    def _binary(self, op: ast.operator, left: Any, right: Any) -> Any:
        if isinstance(op, ast.Mod) and isinstance(left, str):
            raise ValueError("a string on the left of % (string formatting) is not allowed")
        if isinstance(op, ast.Mult) and (isinstance(left, str) or isinstance(right, str)):
            text, times = (left, right) if isinstance(left, str) else (right, left)
            if isinstance(times, int) and len(text) * times > MAX_FILTER_STRING:
                raise ValueError(f"a string of {len(text) * times:,} characters; expected at "
                                 f"most {MAX_FILTER_STRING:,}")
        return self.BINARY[type(op)](left, right)

    def _eval(self, node: ast.AST, params: Mapping[str, Any]) -> Any:
        match node:
            case ast.Name(id=name):
                return params[name]
            case ast.Constant(value=value):
                return value
            case ast.BinOp(left=left, op=op, right=right):
                return self._binary(op, self._eval(left, params), self._eval(right, params))
            case ast.UnaryOp(op=op, operand=operand):
                return self.UNARY[type(op)](self._eval(operand, params))
            case ast.BoolOp(op=ast.And(), values=values):
                return all(self._eval(v, params) for v in values)
            case ast.BoolOp(op=ast.Or(), values=values):
                return any(self._eval(v, params) for v in values)
            case ast.Compare(left=left, ops=ops, comparators=comparators):
                lhs = self._eval(left, params)
                for cmp, right in zip(ops, comparators, strict=True):
                    rhs = self._eval(right, params)
                    if not self.COMPARE[type(cmp)](lhs, rhs):
                        return False
                    lhs = rhs
                return True
        raise AssertionError(f"unchecked node {ast.dump(node)}")  # _check rejects these


@dataclasses.dataclass(frozen=True)
class _Where:
    """A position in a suite file, printed as ``suites/x.toml: sweep[2].axes.N``."""

    file: str
    key: str = ""

    def at(self, part: str) -> _Where:
        joiner = "" if not self.key or part.startswith("[") else "."
        return _Where(self.file, f"{self.key}{joiner}{part}")

    def __str__(self) -> str:
        return f"{self.file}: {self.key}" if self.key else self.file


_TYPE_NAMES = {bool: "boolean", int: "integer", float: "number", str: "string",
               list: "list", dict: "table"}


def _describe(kind: type | tuple[type, ...]) -> str:
    kinds = kind if isinstance(kind, tuple) else (kind,)
    return " or ".join(_TYPE_NAMES[k] for k in kinds)


def _a(kind: type | tuple[type, ...]) -> str:
    """``_describe`` with its article: "an integer", "a string or list"."""
    text = _describe(kind)
    return f"an {text}" if text[0] in "aeiou" else f"a {text}"


def _show(value: Any) -> str:
    """A value as TOML would write it, for error messages."""
    try:
        return json.dumps(value)
    except TypeError:
        return repr(value)


def _is(value: Any, kind: type | tuple[type, ...]) -> bool:
    """``isinstance`` where a bool is not an integer and an integer is a number."""
    kinds = kind if isinstance(kind, tuple) else (kind,)
    if isinstance(value, bool):
        return bool in kinds
    if isinstance(value, int) and float in kinds:
        return True
    return isinstance(value, kinds)


def _names(names: Any, where: _Where, choices: list[str], default: list[str]) -> list[str]:
    """A list of names out of ``choices``, or "all" of them; ``default`` when not given."""
    if names is None:
        return default
    if names == "all":
        return choices
    if not isinstance(names, list) or not names:
        raise SuiteError(f"{where}: expected a non-empty list of names or \"all\", "
                         f"got {_show(names)}")
    for name in names:
        if name not in choices:
            raise SuiteError(f"{where}: {_show(name)} is not one of: {', '.join(choices)}")
    return names


def _param_kind(op: registry.Operator, where: _Where, name: str) -> type:
    if name not in op.params:
        raise SuiteError(f"{where}: {op.name} has no parameter {name!r}; "
                         f"expected one of: {', '.join(op.params)}")
    return type(op.params[name])


def _check_param(op: registry.Operator, where: _Where, name: str, value: Any) -> None:
    kind = _param_kind(op, where, name)
    if not _is(value, kind):
        raise SuiteError(f"{where}: expected {_a(kind)}, got {_show(value)}")


def _check_axis(op: registry.Operator, where: _Where, name: str, values: Any) -> None:
    kind = _param_kind(op, where, name)
    if not isinstance(values, list) or not values or not all(_is(v, kind) for v in values):
        raise SuiteError(f"{where}: expected a non-empty list of {_describe(kind)}s, "
                         f"got {_show(values)}")
