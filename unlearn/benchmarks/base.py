"""The `Benchmark` every unlearning run and evaluation reads, the `BENCHMARKS` registry, and the loading
helpers the WMDP, MUSE and toy loaders share: local-path overrides, hub access that fails fast, schema checks.

All tables go through `datasets`; a table is loaded (and checked) on first access, so evaluating multiple
choice never downloads a corpus, and a missing gated corpus only matters to the run that needs it.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import socket
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import datasets
import huggingface_hub
import numpy as np
import pyarrow.compute as pc
import pyarrow.parquet as pq
from datasets import ClassLabel, Dataset, DatasetDict, Features, LargeList, List, Value

from shared.registry import Registry, UnknownNameError
from shared.runio import write_json

N_CHOICES = 4  # WMDP and MMLU questions have exactly four choices (A-D)
SECTIONS = ("mc", "corpora", "muse")
MANIFEST = "benchmark.json"  # written last by `save_benchmark`: a folder without it is incomplete
LOCAL_FORMATS = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv"}


class BenchmarkError(ValueError):
    """Bad or unreachable benchmark data; the message names the table (and the `paths` key that overrides it)."""


class UnknownSplitError(KeyError, ValueError):
    """An unknown table name in a benchmark section; a KeyError so `in` and `.get` keep working, and a
    ValueError like every other bad input (the command line's exit code 2)."""

    def __str__(self) -> str:  # KeyError would print the message quoted
        return str(self.args[0])


@dataclass(frozen=True)
class Schema:
    """The columns of one kind of table, in the types every loader returns (hub types are cast to these)."""

    name: str
    features: Features


MC = Schema(
    "multiple choice",
    Features({"question": Value("string"), "choices": List(Value("string")), "answer": Value("int64"),
              "subject": Value("string")}),
)
TEXT = Schema("text", Features({"text": Value("string")}))
QA = Schema("question answering", Features({"question": Value("string"), "answer": Value("string")}))
VERBMEM = Schema("verbatim memorisation", Features({"prompt": Value("string"), "gt": Value("string")}))


def table_schema(section: str, key: str) -> Schema:
    """The schema of table `key` in `section` ("mc", "corpora", "muse"), as the Benchmark fields define them."""
    if section == "mc":
        return MC
    if section == "corpora" or (section == "muse" and key.startswith("privleak_")):
        return TEXT
    if section == "muse" and key.startswith("verbmem_"):
        return VERBMEM
    if section == "muse" and key.startswith("knowmem_"):
        return QA
    raise BenchmarkError(f"{section}/{key}: unknown table; sections are {', '.join(SECTIONS)} and MUSE tables "
                         "start with verbmem_, knowmem_ or privleak_")


class Tables(Mapping[str, Dataset]):
    """The named tables of one benchmark section. A value may be a loader (a zero-argument callable): it runs
    on first access and its checked result is kept. `in`, `len` and iteration never load anything."""

    def __init__(self, where: str, tables: Mapping[str, Dataset | Callable[[], Dataset]]) -> None:
        self.where = where
        self._tables = dict(tables)

    def __getitem__(self, key: str) -> Dataset:
        if key not in self._tables:
            allowed = ", ".join(self._tables) or "none: this benchmark has no such tables"
            raise UnknownSplitError(f"{self.where}: unknown split {key!r}. Allowed: {allowed}")
        value = self._tables[key]
        if not isinstance(value, Dataset):
            value = self._tables[key] = value()
        return value

    def __contains__(self, key: object) -> bool:
        return key in self._tables

    def __iter__(self) -> Iterator[str]:
        return iter(self._tables)

    def __len__(self) -> int:
        return len(self._tables)

    def replaced(self, tables: Mapping[str, Dataset | Callable[[], Dataset]]) -> Tables:
        """A copy with some tables replaced (or added); nothing is loaded."""
        return Tables(self.where, {**self._tables, **tables})

    def __repr__(self) -> str:
        shown = [f"{k} ({v.num_rows} rows)" if isinstance(v, Dataset) else f"{k} (not loaded)"
                 for k, v in self._tables.items()]
        return f"Tables({self.where}: {', '.join(shown)})"


@dataclass
class Benchmark:
    """One unlearning benchmark in the WMDP and MUSE formats.

    mc: WMDP-format multiple choice, "forget" and "utility" (question: str, choices: 4 str, answer: int,
        subject: str, e.g. "biology", "high_school_biology"; lm-eval's task description reads "... about
        {subject with _ as spaces}.").
    corpora: column "text": "forget", "retain" (+ "holdout").
    muse: MUSE format (empty for WMDP): verbmem_forget (prompt, gt); knowmem_{forget,retain}_qa and
        knowmem_{forget,retain}_qa_icl (question, answer); privleak_{forget,retain,holdout} (text).
    models: named reference models (hub ids or folders), e.g. {"target": ..., "retrain": ...}.
    """

    name: str
    mc: Mapping[str, Dataset] = field(default_factory=dict)
    corpora: Mapping[str, Dataset] = field(default_factory=dict)
    muse: Mapping[str, Dataset] = field(default_factory=dict)
    models: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for section in SECTIONS:
            tables = getattr(self, section)
            if not isinstance(tables, Tables):
                setattr(self, section, Tables(f"{self.name}.{section}", tables))

    def sections(self) -> dict[str, Tables]:
        return {section: getattr(self, section) for section in SECTIONS}


BenchmarkLoader = Callable[..., Benchmark]  # (*, cache_dir, paths, subsets, seed) -> Benchmark
BENCHMARKS: Registry[BenchmarkLoader] = Registry("benchmark")


def load_benchmark(name: str, *, cache_dir: str | None = None, paths: Mapping[str, str | Path] | None = None,
                   subsets: Sequence[str] | None = None, seed: int = 0) -> Benchmark:
    """The benchmark registered as `name` ("toy", "wmdp", "muse-news", "muse-books"), or one saved by
    `save_benchmark` when `name` is its folder.

    cache_dir: the `datasets` cache for hub downloads and local files. paths: local copies replacing hub
    tables, by key (e.g. {"wmdp-bio": "bio.jsonl", "bio-forget-corpus": "bio-forget-corpus.jsonl"}): a
    .jsonl/.json/.parquet/.csv file or a folder (`save_to_disk` output or a hub snapshot). subsets: WMDP's
    domains (default all). seed: the toy's generator seed (the hub benchmarks are fixed).
    """
    if name not in BENCHMARKS and (Path(name) / MANIFEST).is_file():
        if subsets is not None or paths:
            raise BenchmarkError(f"benchmark: {name} is a saved benchmark folder; edit its files instead of "
                                 "passing subsets or paths")
        return load_saved_benchmark(name, cache_dir=cache_dir)
    try:
        loader = BENCHMARKS.get(name, field="benchmark")
    except UnknownNameError as err:
        raise UnknownNameError(f"{err} (or a folder written by save_benchmark)") from None
    return loader(cache_dir=cache_dir, paths=dict(paths or {}), subsets=subsets, seed=seed)


def check_name(name: str, allowed: Iterable[str], field: str, kind: str) -> str:
    """`name` in its canonical spelling, or an error naming `field`, a close match and the allowed values."""
    registry: Registry[tuple[str]] = Registry(kind)
    for value in allowed:
        registry.register(value)((value,))  # a tuple: the registry would import a registered str as "module:attr"
    try:
        return registry.get(name, field=field)[0]
    except UnknownNameError as err:
        raise BenchmarkError(str(err)) from None


def no_subsets(benchmark: str, subsets: Sequence[str] | None) -> None:
    if subsets is not None:
        raise BenchmarkError(f"subsets: {benchmark} has no subsets (only wmdp has: wmdp-bio, wmdp-cyber, wmdp-chem)")


def check_paths(paths: Mapping[str, str | Path], allowed: Iterable[str], benchmark: str) -> dict[str, Path]:
    """The `paths` overrides as existing Paths, keyed by their canonical key; an error for an unknown key or
    a path that does not exist."""
    allowed = list(allowed)
    checked = {}
    for key, value in paths.items():
        key = check_name(key, allowed, field=f"paths (for {benchmark})", kind="paths key")
        path = Path(value).expanduser()
        if not path.exists():
            raise BenchmarkError(f"paths[{key!r}]: {path} does not exist (give a .jsonl/.json/.parquet/.csv file "
                                 "or a folder)")
        checked[key] = path
    return checked


@dataclass(frozen=True)
class Source:
    """Where one table comes from: a hub data set (id, config, split), or the local copy under `paths[key]`."""

    key: str  # the `paths` key that replaces the hub copy, e.g. "wmdp-bio" or "knowmem/forget_qa"
    schema: Schema
    hub: str | None = None
    config: str | None = None
    split: str = "train"
    subject: str | None = None  # MC only: fills a missing "subject" column
    hint: str = ""  # extra advice when the table cannot be loaded (the gated corpus)

    def hub_name(self) -> str:
        config = f", config {self.config}" if self.config else ""
        return f"{self.hub}{config}, split {self.split}"


def source_loader(source: Source, *, cache_dir: str | None, path: Path | None) -> Callable[[], Dataset]:
    """A loader for `Tables`: the local copy at `path` if given, else the hub copy; checked."""
    return functools.partial(load_source, source, cache_dir=cache_dir, path=path)


def concat_loader(loaders: Sequence[Callable[[], Dataset]]) -> Callable[[], Dataset]:
    """One table made of several (WMDP's domains), loaded together on first access."""
    if len(loaders) == 1:
        return loaders[0]
    return lambda: datasets.concatenate_datasets([load() for load in loaders])


def load_source(source: Source, *, cache_dir: str | None = None, path: Path | None = None) -> Dataset:
    if path is not None:
        where = f"{source.key} ({path})"
        return check_table(read_local(path, source, where, cache_dir), source.schema, where, source.subject)
    where = f"{source.key} ({source.hub_name()})"
    return check_table(read_hub(source, where, cache_dir), source.schema, where, source.subject)


def read_local(path: Path, source: Source, where: str, cache_dir: str | None) -> Dataset:
    """A file through the matching `datasets` builder; a `save_to_disk` folder; or a hub snapshot folder."""
    try:
        if path.is_dir() and any((path / marker).exists() for marker in ("state.json", "dataset_dict.json")):
            data = datasets.load_from_disk(str(path))
            return _pick_split(data, source.split, where) if isinstance(data, DatasetDict) else data
        if path.is_dir():
            return datasets.load_dataset(str(path), source.config, split=source.split, cache_dir=cache_dir)
        builder = LOCAL_FORMATS.get(path.suffix.lower())
        if builder is None:
            raise BenchmarkError(f"{where}: unknown file type {path.suffix!r}. Allowed: {', '.join(LOCAL_FORMATS)} "
                                 "or a folder")
        if _is_empty_file(path):  # datasets fails on these with "Instruction 'train' corresponds to no data"
            raise BenchmarkError(f"{where}: the split is empty")
        return datasets.load_dataset(builder, data_files=str(path), split="train", cache_dir=cache_dir)
    except BenchmarkError:
        raise
    except Exception as err:  # datasets raises many types for unreadable files; say which table and why
        raise BenchmarkError(f"{where}: could not read it: {type(err).__name__}: {err}") from err


def _is_empty_file(path: Path) -> bool:
    """No rows, judged from parquet metadata or the first 4 KiB of a text file (corpora can be gigabytes)."""
    if path.suffix.lower() == ".parquet":
        return pq.read_metadata(path).num_rows == 0
    with path.open(encoding="utf-8", errors="replace") as handle:
        head = handle.read(4096)
    if len(head) == 4096:
        return False
    head = head.strip()
    return head in ("", "[]") or (path.suffix.lower() == ".csv" and len(head.splitlines()) <= 1)


def _pick_split(data: DatasetDict, split: str, where: str) -> Dataset:
    if split in data:
        return data[split]
    if len(data) == 1:
        return next(iter(data.values()))
    raise BenchmarkError(f"{where}: no split {split!r} in the saved DatasetDict. Found: {', '.join(data)}")


def read_hub(source: Source, where: str, cache_dir: str | None) -> Dataset:
    """The hub copy; without a network it fails at once (datasets would retry for about half a minute)."""
    advice = (f"pass a local copy as paths={{{source.key!r}: '/path/to/file.jsonl' or a save_to_disk folder}} "
              f"(columns: {', '.join(source.schema.features)})")
    if source.hub is None:
        raise BenchmarkError(f"{where}: no hub copy exists; {advice}")
    hint = f" {source.hint}" if source.hint else ""
    if not datasets.config.HF_HUB_OFFLINE and not hub_reachable(huggingface_hub.constants.ENDPOINT):
        raise BenchmarkError(
            f"{where}: the Hugging Face hub ({huggingface_hub.constants.ENDPOINT}) is unreachable.{hint} If the "
            f"data set is in the datasets cache ({cache_dir or datasets.config.HF_DATASETS_CACHE}), set "
            f"HF_HUB_OFFLINE=1 to load it from there; otherwise {advice}")
    try:
        return datasets.load_dataset(source.hub, source.config, split=source.split, cache_dir=cache_dir)
    except Exception as err:  # connection, gating, missing config/split: all mean "supply it another way"
        offline = " (HF_HUB_OFFLINE is set: only the cache was searched)" if datasets.config.HF_HUB_OFFLINE else ""
        raise BenchmarkError(f"{where}: could not load it from the hub{offline}: {type(err).__name__}: "
                             f"{err}.{hint} Otherwise {advice}") from err


@functools.lru_cache(maxsize=8)
def hub_reachable(endpoint: str, timeout_s: float = 3.0) -> bool:
    """One TCP connection attempt to the hub endpoint, remembered for the process."""
    url = urlparse(endpoint)
    port = url.port or (443 if url.scheme == "https" else 80)
    try:
        socket.create_connection((url.hostname, port), timeout=timeout_s).close()
    except OSError:
        return False
    return True


def _kind(feature: Any) -> str:
    """"str", "int" or "list[str]" for the feature types a column may have on the hub or in local files."""
    if isinstance(feature, ClassLabel):
        return "int"
    if isinstance(feature, Value):
        if feature.dtype in ("string", "large_string"):
            return "str"
        if feature.dtype.startswith(("int", "uint")):
            return "int"
    if isinstance(feature, (List, LargeList)) and _kind(feature.feature) == "str":
        return "list[str]"
    return repr(feature)


def check_table(ds: Dataset, schema: Schema, where: str, subject: str | None = None) -> Dataset:
    """`ds` reduced to the schema's columns in its types, or an error naming the table, the column (and the
    row) and what is allowed: missing columns, wrong types, nulls, an empty table, and for multiple choice a
    choices list that is not 4 long or an answer outside 0-3."""
    if schema is MC and "subject" not in ds.column_names and subject is not None:
        ds = ds.add_column("subject", [subject] * ds.num_rows)
    columns = list(schema.features)
    missing = [c for c in columns if c not in ds.column_names]
    if missing:
        raise BenchmarkError(f"{where}: missing column {missing[0]!r} for a {schema.name} table. Required: "
                             f"{', '.join(columns)}; found: {', '.join(ds.column_names) or 'none'}")
    for column in columns:
        want, got = _kind(schema.features[column]), _kind(ds.features[column])
        if got != want:
            raise BenchmarkError(f"{where}: column {column!r} must be {want}, got {got}")
    if ds.num_rows == 0:
        raise BenchmarkError(f"{where}: the split is empty")
    ds = ds.select_columns(columns)
    table = ds.with_format("arrow")[:]
    for column in columns:
        if table.column(column).null_count:
            nulls = np.flatnonzero(pc.is_null(table.column(column)).to_numpy())
            raise BenchmarkError(f"{where}: row {nulls[0]}: {column!r} is missing ({nulls.size} rows with nulls)")
    if schema is MC:
        _check_choices(table, where)
    return ds if ds.features == schema.features else ds.cast(schema.features)


def _check_choices(table: Any, where: str) -> None:
    lengths = pc.list_value_length(table.column("choices")).to_numpy()
    bad = np.flatnonzero(lengths != N_CHOICES)
    if bad.size:
        raise BenchmarkError(f"{where}: row {bad[0]}: 'choices' has {lengths[bad[0]]} items; WMDP-format questions "
                             f"have exactly {N_CHOICES} ({bad.size} rows differ)")
    if pc.list_flatten(table.column("choices")).null_count:
        raise BenchmarkError(f"{where}: a 'choices' list contains a null")
    answers = table.column("answer").to_numpy()
    bad = np.flatnonzero((answers < 0) | (answers >= N_CHOICES))
    if bad.size:
        raise BenchmarkError(f"{where}: row {bad[0]}: 'answer' is {answers[bad[0]]}; allowed: 0-{N_CHOICES - 1} "
                             "(the index of the correct choice)")


def save_benchmark(bench: Benchmark, folder: str | Path) -> Path:
    """Write every table as `<folder>/<section>/<key>.jsonl` and the manifest `benchmark.json` (last), so the
    data can be read and edited, loaded back with `load_benchmark(folder)`, or used as `paths` overrides."""
    folder = Path(folder)
    tables: dict[str, list[str]] = {}
    for section, section_tables in bench.sections().items():
        (folder / section).mkdir(parents=True, exist_ok=True)
        for key in section_tables:
            section_tables[key].to_json(folder / section / f"{key}.jsonl", lines=True)
            tables.setdefault(section, []).append(key)
    write_json(folder / MANIFEST, {"name": bench.name, "models": bench.models, "tables": tables})
    return folder


def load_saved_benchmark(folder: str | Path, *, cache_dir: str | None = None) -> Benchmark:
    """A benchmark written by `save_benchmark` (tables load and are checked on first access)."""
    folder = Path(folder)
    if not (folder / MANIFEST).is_file():
        raise BenchmarkError(f"{folder}: no {MANIFEST}; not a folder written by save_benchmark")
    manifest = json.loads((folder / MANIFEST).read_text())
    if not isinstance(manifest.get("name"), str) or not isinstance(manifest.get("tables"), dict):
        raise BenchmarkError(f"{folder / MANIFEST}: expected the keys 'name' (a string) and 'tables' (a mapping)")
    unknown = sorted(set(manifest.get("tables", {})) - set(SECTIONS))
    if unknown:
        raise BenchmarkError(f"{folder / MANIFEST}: unknown section {unknown[0]!r}. Allowed: {', '.join(SECTIONS)}")
    sections = {
        section: {key: source_loader(Source(f"{section}/{key}", table_schema(section, key)), cache_dir=cache_dir,
                                     path=folder / section / f"{key}.jsonl") for key in keys}
        for section, keys in manifest.get("tables", {}).items()
    }
    return Benchmark(name=manifest["name"], models=dict(manifest.get("models", {})), **sections)


def override_tables(bench: Benchmark, paths: Mapping[str, str | Path], *, cache_dir: str | None) -> Benchmark:
    """`bench` with the tables named "<section>/<key>" in `paths` replaced by those local files."""
    keys = [f"{section}/{key}" for section, tables in bench.sections().items() for key in tables]
    replaced: dict[str, dict[str, Callable[[], Dataset]]] = {}
    for key, path in check_paths(paths, keys, bench.name).items():
        section, _, table = key.partition("/")
        source = Source(key, table_schema(section, table))
        replaced.setdefault(section, {})[table] = source_loader(source, cache_dir=cache_dir, path=path)
    return dataclasses.replace(bench, **{s: bench.sections()[s].replaced(t) for s, t in replaced.items()})
