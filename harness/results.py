"""Result storage: one directory per run, ``metadata.json`` and ``results.jsonl``.

Rows are appended to ``results.jsonl`` one JSON object per line, each written
whole and flushed as soon as its case finishes, so an interrupted run keeps
every finished row and ``--resume`` carries on from there. A last line without
its newline is a row whose write was cut short; readers ignore it and a
resumed run cuts it off. Every field is documented in
``docs/results-schema.md``; ``SCHEMA_VERSION`` changes whenever a field
changes meaning or goes away, and ``load`` migrates every older version it
knows (``migrate_row``).

Timing samples are kept whole: each measurement's samples as little-endian
float32, base64-encoded (``encode_samples`` / ``decode_samples``), about 5.3
bytes a sample.
"""

from __future__ import annotations

import base64
import collections
import contextlib
import dataclasses
import fcntl
import json
import math
import os
import socket
import uuid
import warnings
from collections import Counter
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from harness.environment import utc_now

SCHEMA_VERSION = 2
READABLE_VERSIONS = (1, SCHEMA_VERSION)  # what readers take; migrate_row brings each to the current
# v1 rows had these metrics as columns of their own; v2 keeps them in ``metrics``.
V1_METRIC_COLUMNS = ("tflops", "gbps", "roofline_fraction", "speedup")
METADATA = "metadata.json"
RESULTS = "results.jsonl"
LOCK = "run.lock"
STATUSES = ("ok", "fail", "xfail", "error", "skipped")
DIRECTIONS = ("forward", "backward")


class DamagedRunWarning(UserWarning):
    """A damaged line of a run's ``results.jsonl``, skipped by a reader."""


@dataclasses.dataclass
class Row:
    """One case × implementation × direction. See docs/results-schema.md."""

    case_id: str
    op: str
    impl: str
    impl_kind: str
    direction: str
    dtype: str
    mode: str
    params: dict[str, Any]
    seed: int
    device: str
    status: str = "ok"
    reason: str = ""
    traceback: str | None = None
    reference_device: str | None = None
    kernel_variant: str | None = None
    rel_l2: float | None = None
    max_abs: float | None = None
    nonfinite: int | None = None
    worst_tensor: str | None = None
    tol_rel_l2: float | None = None
    tol_max_abs: float | None = None
    tensors: dict[str, dict[str, float]] | None = None
    deterministic: bool | None = None
    timing_skipped: str | None = None
    timer: str | None = None  # the method that timed the row (harness.timing.METHODS)
    timing_note: str | None = None  # why a fallback method timed it
    time_median_ms: float | None = None  # device time, as the samples below
    time_iqr_ms: float | None = None
    time_min_ms: float | None = None
    time_samples: int | None = None
    time_noisy: bool | None = None
    sm_clock_mhz: int | None = None
    gpu_temp_c: int | None = None
    flops: float | None = None
    bytes: float | None = None
    # measurement name -> its samples (encode_samples): time_ms (device time),
    # host_us and as_called_ms on a GPU
    samples: dict[str, str] | None = None
    metrics: dict[str, float] = dataclasses.field(default_factory=dict)  # harness.metrics
    measured: dict[str, Any] = dataclasses.field(default_factory=dict)  # for the metrics
    rechecked: bool | None = None  # the last timed call's output matched the reference too
    impl_source: str = ""  # the module that registered the implementation (plugins)
    counters: dict[str, float] | None = None  # `run --device counters`: docs/counters.md
    device_index: int | None = None  # the GPU's index on the host, for a worker pinned to one
    device_name: str | None = None  # that GPU's name
    reproduce: str = ""
    finished_at: str = ""
    schema_version: int = SCHEMA_VERSION


def encode_samples(samples: Iterable[float]) -> str:
    """Samples as base64 of little-endian float32 (compact, exact enough for times)."""
    return base64.b64encode(np.asarray(list(samples), dtype="<f4").tobytes()).decode("ascii")


def decode_samples(text: str) -> np.ndarray:
    """The float32 array ``encode_samples`` wrote."""
    return np.frombuffer(base64.b64decode(text), dtype="<f4")


def _check_version(version: Any, where: str) -> None:
    if isinstance(version, bool) or version not in READABLE_VERSIONS:
        raise ValueError(f"{where}: results schema version {version!r} is unknown; this "
                         f"dcnbench reads versions {', '.join(map(str, READABLE_VERSIONS))}")


def migrate_row(row: dict[str, Any]) -> dict[str, Any]:
    """A stored row of any known schema version as a current one.

    v1 -> v2: ``tflops``, ``gbps``, ``roofline_fraction`` and ``speedup`` move
    into ``metrics`` (with ``time_ms`` from ``time_median_ms``); v1 kept no
    samples, measured values or re-check, which stay empty.
    """
    version = row.get("schema_version", 1)
    _check_version(version, "row")
    if version == SCHEMA_VERSION:
        return row
    row = dict(row)
    metrics = {name: row.pop(name) for name in V1_METRIC_COLUMNS if name in row}
    metrics["time_ms"] = row.get("time_median_ms")
    row.update(metrics={k: v for k, v in metrics.items() if v is not None}, samples=None,
               measured={}, rechecked=None, timing_note=None, impl_source="",
               schema_version=SCHEMA_VERSION)
    return row


def row_key(row: dict[str, Any]) -> tuple[str, str, str]:
    """What identifies a row in a run: (case id, implementation, direction)."""
    return (row["case_id"], row["impl"], row["direction"])


def _finite_or_none(value: Any) -> Any:
    """JSON has no NaN or Inf: a non-finite number is stored as null."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite_or_none(v) for k, v in value.items()}
    return value


class RunDir:
    """A run directory being written."""

    def __init__(self, path: Path):
        self.path = Path(path)

    @property
    def metadata_path(self) -> Path:
        return self.path / METADATA

    @property
    def results_path(self) -> Path:
        return self.path / RESULTS

    def create(self, metadata: dict[str, Any]) -> dict[str, Any]:
        """Start a new run (refusing a directory that already holds one); returns
        the metadata as stored."""
        if self.metadata_path.exists():
            raise FileExistsError(
                f"{self.path} already holds a run; pass --resume to continue it "
                "or choose another --out"
            )
        self.path.mkdir(parents=True, exist_ok=True)
        stored = {"schema_version": SCHEMA_VERSION, **metadata, "run_uuid": uuid.uuid4().hex}
        self.write_metadata(stored)
        self.results_path.touch()
        return stored

    def write_metadata(self, metadata: dict[str, Any]) -> None:
        self.metadata_path.write_text(json.dumps(metadata, indent=2, allow_nan=False) + "\n")

    def reopen(self) -> tuple[dict[str, Any], list[dict[str, Any]]]:
        """Open an existing run for appending: its metadata and finished rows.

        Cuts off a row whose write was interrupted, so the next one starts on
        a line of its own.
        """
        if not self.metadata_path.is_file():
            raise FileNotFoundError(f"{self.path}: no {METADATA}; expected a run directory")
        metadata = read_metadata(self.path)
        if metadata.get("schema_version", 1) != SCHEMA_VERSION:
            raise ValueError(
                f"{self.path}: results schema version {metadata.get('schema_version')}, "
                f"expected {SCHEMA_VERSION}; start a new run"
            )
        text, complete = _complete_lines(self.path)
        if complete != text:
            self.results_path.write_text(complete)
        return metadata, read_rows(self.path, strict=True)

    @contextlib.contextmanager
    def lock(self):
        """Hold the run directory's lock while writing into it: refuses, naming the
        holder's pid and host, while another live process holds it. The lock is an
        ``flock`` on ``run.lock``, so the system releases it when its holder dies
        however it dies (kill -9 too), and the next run takes it over."""
        self.path.mkdir(parents=True, exist_ok=True)
        with (self.path / LOCK).open("a+") as f:
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                f.seek(0)
                holder = f.read().strip() or "a process that has not said who it is"
                raise RunDirLocked(f"{self.path}: another run is writing into it ({holder}); "
                                   "wait for it to finish or choose another --out") from None
            f.truncate(0)
            f.write(f"pid {os.getpid()} on host {socket.gethostname()}, since {utc_now()}\n")
            f.flush()
            yield

    def append(self, row: Row) -> dict[str, Any]:
        """Write ``row`` (stamped with the time) and return it as stored.

        Raises :class:`RowNotWritten` when the write fails (a full disk): the
        file then ends with the last whole row, as before the call.
        """
        row.finished_at = utc_now()
        stored = _finite_or_none(dataclasses.asdict(row))
        line = memoryview((json.dumps(stored, allow_nan=False) + "\n").encode())
        # Unbuffered: a failed write raises here, not again when the file closes.
        with self.results_path.open("ab", buffering=0) as f:
            end = f.seek(0, os.SEEK_END)
            try:
                while line:
                    line = line[f.write(line):]
            except OSError as error:
                f.truncate(end)  # the part of the line that made it (truncating takes no space)
                raise RowNotWritten(
                    f"{self.results_path}: a finished row could not be written "
                    f"({error.strerror or error})"
                ) from error
        return stored


class RunDirLocked(OSError):
    """Another live process is writing into the run directory."""


class RowNotWritten(OSError):
    """A row could not be appended to a run (the disk is full, say); the rows
    before it are intact."""


def read_metadata(run_dir: Path) -> dict[str, Any]:
    """A run's ``metadata.json``, checked: a JSON object of a readable schema
    version with its ``suite`` (``{name, ...}``). Raises ValueError naming the
    file and what is wrong."""
    path = Path(run_dir) / METADATA
    try:
        metadata = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(f"{path}: not JSON ({exc}); expected the run's metadata object") from None
    if not isinstance(metadata, dict):
        raise ValueError(f"{path}: expected a JSON object, got a {type(metadata).__name__}")
    _check_version(metadata.get("schema_version", 1), str(path))
    suite = metadata.get("suite")
    if not isinstance(suite, dict) or not isinstance(suite.get("name"), str):
        raise ValueError(f"{path}: expected 'suite' to be {{name, path, sha256, description}}, "
                         f"got {suite!r}")
    return metadata


def _complete_lines(run_dir: Path) -> tuple[str, str]:
    """``results.jsonl``'s text, and the same without a last line cut short."""
    path = Path(run_dir) / RESULTS
    text = path.read_text(errors="replace") if path.exists() else ""
    return text, text[: text.rfind("\n") + 1]


# The fields every reader relies on, with their JSON types.
_REQUIRED = {"case_id": str, "op": str, "impl": str, "impl_kind": str, "direction": str,
             "dtype": str, "mode": str, "params": dict, "status": str}


def _row_damage(row: Any) -> str | None:
    """What makes a parsed line no row (None for a row)."""
    if not isinstance(row, dict):
        return f"expected a JSON object, got a {type(row).__name__}"
    missing = [name for name in _REQUIRED if name not in row]
    if missing:
        return f"missing {', '.join(missing)}"
    wrong = [f"{name} is a {type(row[name]).__name__}, expected {kind.__name__}"
             for name, kind in _REQUIRED.items() if not isinstance(row[name], kind)]
    if wrong:
        return "; ".join(wrong)
    if row["direction"] not in DIRECTIONS or row["status"] not in STATUSES:
        return (f"direction {row['direction']!r} / status {row['status']!r}: expected one of "
                f"{DIRECTIONS} / {STATUSES}")
    return None


def read_rows(run_dir: Path, *, strict: bool = False) -> list[dict[str, Any]]:
    """Every complete row of a run, in the order they finished, migrated to the
    current schema.

    A damaged line (not JSON, blank, not a row object) is skipped with a
    DamagedRunWarning naming the file and line, or with ``strict`` (resume:
    rows must not be lost) raises ValueError asking for that line's repair. A
    row of an unknown schema version raises ValueError either way.
    """
    path = Path(run_dir) / RESULTS
    _, complete = _complete_lines(run_dir)
    rows = []
    for number, line in enumerate(complete.split("\n")[:-1], start=1):
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            problem = f"not JSON ({exc.msg})" if line.strip("\0 \t\r") else "a blank line"
        else:
            problem = _row_damage(row)
        if problem is None:
            _check_version(row.get("schema_version", 1), f"{path}:{number}")
            rows.append(migrate_row(row))
        elif strict:
            raise ValueError(f"{path}:{number}: {problem}; repair or delete that line")
        else:
            warnings.warn(f"{path}:{number}: {problem}; line skipped", DamagedRunWarning,
                          stacklevel=2)
    return rows


def _run_dirs(path: Path) -> list[tuple[str, Path]]:
    """``path`` itself when it is a run, else every run below it at any depth
    (results/ holds results/local/<run>, results/<device>/<run>, ...), each
    with its id: its path relative to ``path`` (the run's name for ``path``
    itself), so results/local/X and results/cpu/X stay two runs."""
    if (path / METADATA).is_file():
        return [(path.resolve().name, path)]
    found = sorted(p.parent for p in path.glob(f"**/{METADATA}"))
    if not found:
        raise FileNotFoundError(f"{path}: neither a run directory nor a folder of run directories")
    return [(run.relative_to(path).as_posix(), run) for run in found]


def _identified_runs(paths: Iterable[str | Path]) -> list[tuple[str, Path]]:
    """Every run under ``paths`` once, with an id no other of them has: its
    path relative to the argument it was found under, or where two arguments
    give the same id (two runs named X passed by name), the path as given."""
    runs: dict[Path, tuple[str, Path]] = {}
    for path in paths:
        for run_id, run_dir in _run_dirs(Path(path)):
            runs.setdefault(run_dir.resolve(), (run_id, run_dir))
    ids = Counter(run_id for run_id, _ in runs.values())
    return [(run_dir.as_posix() if ids[run_id] > 1 else run_id, run_dir)
            for run_id, run_dir in runs.values()]


def load(paths: str | Path | Iterable[str | Path]) -> pd.DataFrame:
    """Rows of one or several runs as a DataFrame.

    ``paths`` is a run directory, a folder holding run directories at any
    depth, or a list of either, of any schema version (rows are migrated). Each
    row gains ``run_id`` (its run's path relative to the folder it was found
    in, or the run's name when given itself: unique among the runs loaded);
    parameters are spread into
    ``params.<name>`` columns; every registered metric (``harness.metrics``) gets
    a column of its name (NaN where a row has none); ``samples`` holds each
    row's decoded samples ({measurement: float32 array}, or None).
    ``df.attrs["metadata"]`` maps each ``run_id`` to its metadata.
    """
    from harness.metrics import METRICS  # here: it brings torch, which reading rows does not need

    if isinstance(paths, (str, Path)):
        paths = [paths]
    rows, metadata = [], {}
    for run_id, run_dir in _identified_runs(paths):
        metadata[run_id] = read_metadata(run_dir)
        rows += [{"run_id": run_id, **row} for row in read_rows(run_dir)]
    nested = {name: [row.pop(name, None) for row in rows]
              for name in ("samples", "metrics", "measured")}
    columns = ["run_id"] + [f.name for f in dataclasses.fields(Row) if f.name not in nested]
    frame = pd.json_normalize(rows, max_level=1) if rows else pd.DataFrame(columns=columns)
    frame["samples"] = [None if s is None else {k: decode_samples(v) for k, v in s.items()}
                        for s in nested["samples"]]
    frame["metrics"] = [m or {} for m in nested["metrics"]]
    frame["measured"] = [m or {} for m in nested["measured"]]
    names = list(METRICS) + sorted({k for m in frame["metrics"] for k in m} - set(METRICS))
    for name in names:
        frame[name] = [m.get(name, np.nan) for m in frame["metrics"]]
    frame.attrs["metadata"] = metadata
    return frame


@dataclasses.dataclass
class Merged:
    """What ``merge`` wrote and what it found missing or worth a warning."""

    rows: int
    missing: list[str]  # shards that are not among the runs, cases a shard did not finish
    warnings: list[str]


def merge(run_dirs: Iterable[str | Path], out: str | Path) -> Merged:
    """Join the runs of one suite (the shards of a ``--shard K/N`` sweep) into ``out``.

    The runs must share the suite's name and hash, device and seed (else
    ``ValueError``), and hold no row twice (else ``ValueError`` naming the
    rows); runs of different code commits are joined with a warning. The
    merged metadata is the first run's, with ``merged_from`` (every run's id,
    shard and commit) in place of ``shard``.
    """
    paths = [Path(p) for p in run_dirs]
    if len(paths) < 2:
        raise ValueError(f"merge: expected two or more run directories, got {len(paths)}")
    metadata = [read_metadata(p) for p in paths]
    first = metadata[0]
    for path, meta in zip(paths[1:], metadata[1:], strict=True):
        for key, value in (("suite name", lambda m: m["suite"]["name"]),
                           ("suite sha256", lambda m: m["suite"]["sha256"]),
                           ("device", lambda m: m["device"]), ("seed", lambda m: m["seed"])):
            if value(meta) != value(first):
                raise ValueError(f"merge: {path} has {key} {value(meta)!r}, {paths[0]} has "
                                 f"{value(first)!r}; expected shards of one suite run")
    warnings = []
    commits = {str(p): (m.get("git") or {}).get("commit") for p, m in zip(paths, metadata,
                                                                          strict=True)}
    if len(set(commits.values())) > 1:
        warnings.append("the runs were made from different commits: " + ", ".join(
            f"{p} at {c}" for p, c in commits.items()))
    rows, seen, duplicated = [], {}, []
    for path in paths:
        for row in read_rows(path):
            key = row_key(row)
            if key in seen:
                duplicated.append(f"{' '.join(key)} (in {seen[key]} and {path})")
            seen[key] = path
            rows.append(row)
    if duplicated:
        shown = "; ".join(duplicated[:5])
        more = f" and {len(duplicated) - 5} more" if len(duplicated) > 5 else ""
        raise ValueError(f"merge: {len(duplicated)} rows are in more than one run: {shown}{more}")
    missing = []
    shards = [m.get("shard") for m in metadata]
    counts = {s["count"] for s in shards if s}
    if len(counts) == 1:
        count = counts.pop()
        present = {s["index"] for s in shards if s}
        missing += [f"shard {k}/{count}" for k in range(1, count + 1) if k not in present]
    finished = collections.Counter(row["case_id"] for row in rows)
    for path, shard in zip(paths, shards, strict=True):
        if shard:
            missing += [f"{case_id} (shard {shard['index']}/{shard['count']}, {path}): "
                        f"{finished[case_id]} of its {planned} rows"
                        for case_id, planned in shard["cases"].items()
                        if finished[case_id] < planned]
    merged = {key: value for key, value in first.items() if key != "shard"}
    merged["run_id"] = Path(out).name
    merged["merged_from"] = [{"run_id": m["run_id"], "shard": (m.get("shard") or {}).get("index"),
                              "git": m.get("git")} for m in metadata]
    target = RunDir(Path(out))
    with target.lock():
        target.create(merged)
        with target.results_path.open("a") as f:
            f.writelines(json.dumps(row, allow_nan=False) + "\n" for row in rows)
    return Merged(len(rows), missing, warnings)
