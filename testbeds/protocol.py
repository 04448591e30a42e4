"""The domain-shift protocols: `fine_tune_split` (pre-train, fine-tune on one domain, test on the others)
and the leave-one-domain-out protocol of DomainBed (Gulrajani & Lopez-Paz, ICLR 2021, "In Search of
Lost Domain Generalization", facebookresearch/DomainBed `domainbed/scripts/train.py` and
`model_selection.py`): hold each domain out in turn, train on the others, select the checkpoint by
"training-domain validation" (the best accuracy on held-out parts of the training domains) and
report the held-out domain's test accuracy at that checkpoint, one column per held-out domain plus
the average.

As in DomainBed, each training domain is split on its own seed, `derive_seed(seed, "lodo", domain)`,
of `int(len(domain) * holdout_fraction)` validation examples, so a domain's train/val split is the
same whichever other domain is held out. Unlike DomainBed (which tests on the held-out domain's
80% "in" split) the test set is the whole held-out domain: nothing of it is used for anything else.

A domain suite is any object with the fields of `testbeds.domains.DomainSuite` (name, domains,
num_classes, pixel_max, mean, std); this module only reads them. Domains are decoded to tensors
with `testbeds.sources.decode_images`, the one decoder of the suite.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

import torch
from torch import Tensor

from shared.seeding import derive_seed
from shared.stats import mean_std
from testbeds.sources import decode_images, label_column

if TYPE_CHECKING:
    from datasets import Dataset


class SuiteLike(Protocol):
    """The fields of `testbeds.domains.DomainSuite` that the protocol reads (read-only, so a frozen
    dataclass satisfies it)."""

    @property
    def name(self) -> str: ...
    @property
    def domains(self) -> Mapping[str, Dataset]: ...
    @property
    def num_classes(self) -> int: ...
    @property
    def pixel_max(self) -> float: ...
    @property
    def mean(self) -> tuple[float, ...]: ...
    @property
    def std(self) -> tuple[float, ...]: ...


@dataclass(frozen=True)
class DomainSplit:
    """One leave-one-domain-out task: x float32 normalised as (pixels / pixel_max - mean) / std per
    channel, y int64; `val` is the training domains' held-out parts (model selection only)."""

    held_out: str
    train_domains: tuple[str, ...]
    train: tuple[Tensor, Tensor]
    val: tuple[Tensor, Tensor]
    test: tuple[Tensor, Tensor]


def _check_fraction(holdout_fraction: float) -> None:
    ok = not isinstance(holdout_fraction, bool) and isinstance(holdout_fraction, (int, float))
    if not ok or not 0.0 < holdout_fraction < 1.0:
        raise ValueError(f"holdout_fraction: expected a number in (0, 1), got {holdout_fraction!r}")


def _check_normalisation(suite: SuiteLike) -> None:
    if not isinstance(suite.pixel_max, (int, float)) or not math.isfinite(suite.pixel_max) or suite.pixel_max <= 0:
        raise ValueError(f"pixel_max: expected a finite number > 0, got {suite.pixel_max!r}")
    if not suite.mean or len(suite.mean) != len(suite.std):
        raise ValueError(f"mean, std: expected one value per channel each, got {suite.mean!r} and {suite.std!r}")
    if not all(math.isfinite(s) and s > 0 for s in suite.std):
        raise ValueError(f"std: expected finite values > 0, got {suite.std!r}")


def _held_out_names(all_domains: Sequence[str], domains: Sequence[str] | str | None) -> list[str]:
    if domains is None:
        return list(all_domains)
    names = [domains] if isinstance(domains, str) else list(domains)
    allowed = ", ".join(all_domains)
    if not names:
        raise ValueError(f"domains: expected at least one domain to hold out (or None for all). Allowed: {allowed}")
    for name in names:
        if name not in all_domains:
            raise ValueError(f"domains: unknown domain {name!r}. Allowed: {allowed}")
        if names.count(name) > 1:
            raise ValueError(f"domains: {name!r} is named twice")
    return names


def leave_one_domain_out(
    suite: SuiteLike,
    *,
    holdout_fraction: float = 0.2,
    seed: int = 0,
    domains: Sequence[str] | str | None = None,
) -> list[DomainSplit]:
    """One `DomainSplit` per held-out domain (all of the suite's, in its order, or those named in
    `domains`): train = the other domains minus a seeded `holdout_fraction` of each, val = those
    parts concatenated (training-domain validation), test = the whole held-out domain."""
    _check_fraction(holdout_fraction)
    _check_normalisation(suite)
    all_domains = list(suite.domains)
    if len(all_domains) < 2:
        raise ValueError(f"domains: leave-one-domain-out needs at least 2 domains, suite {suite.name!r} has "
                         f"{len(all_domains)} ({', '.join(all_domains) or 'none'})")
    held_out = _held_out_names(all_domains, domains)
    tensors = _domain_tensors(suite)
    parts = _domain_parts(tensors, holdout_fraction, seed)

    splits = []
    for test_name in held_out:
        train_names = tuple(name for name in all_domains if name != test_name)
        val_size = sum(len(parts[name][1]) for name in train_names)
        if val_size == 0:
            raise ValueError(f"holdout_fraction: {holdout_fraction} of the training domains of {test_name!r} "
                             "leaves no validation example; use a larger fraction")
        splits.append(DomainSplit(test_name, train_names, _take(tensors, parts, train_names, 0),
                                  _take(tensors, parts, train_names, 1), tensors[test_name]))
    return splits


def _domain_tensors(suite: SuiteLike) -> dict[str, tuple[Tensor, Tensor]]:
    """Every domain of the suite as (x, y), checked: non-empty, labels in range, one input shape."""
    tensors: dict[str, tuple[Tensor, Tensor]] = {}
    encode = getattr(suite, "encode", None)  # text suites encode their inputs; image suites decode pixels
    for name in suite.domains:
        ds = suite.domains[name]
        if len(ds) == 0:
            raise ValueError(f"domains: domain {name!r} of suite {suite.name!r} has no examples")
        x = encode(ds) if encode is not None else decode_images(ds, suite.pixel_max, tuple(suite.mean), tuple(suite.std))
        y = torch.from_numpy(label_column(ds))
        if y.numel() and (int(y.min()) < 0 or int(y.max()) >= suite.num_classes):
            raise ValueError(f"label: domain {name!r} has labels outside 0..{suite.num_classes - 1}")
        tensors[name] = (x, y)
    shapes = {name: tuple(x.shape[1:]) for name, (x, _) in tensors.items()}
    if len(set(shapes.values())) > 1:
        raise ValueError(f"image: the domains' examples differ in shape: {shapes}")
    return tensors


def _domain_parts(tensors: Mapping[str, tuple[Tensor, Tensor]], holdout_fraction: float, seed: int
                  ) -> dict[str, tuple[Tensor, Tensor]]:
    """Each domain's (kept, held-out) positions, from (seed, domain) only, as DomainBed's
    seed_hash(trial_seed, env_i): the same whatever else the protocol does with the domains."""
    parts: dict[str, tuple[Tensor, Tensor]] = {}
    for name, (x, _) in tensors.items():
        n = len(x)
        n_val = int(n * holdout_fraction)
        order = torch.randperm(n, generator=torch.Generator().manual_seed(derive_seed(seed, "lodo", name)))
        parts[name] = (order[n_val:].sort().values, order[:n_val].sort().values)  # subsets in storage order
    return parts


def _take(tensors: Mapping[str, tuple[Tensor, Tensor]], parts: Mapping[str, tuple[Tensor, Tensor]],
          names: Sequence[str], part: int) -> tuple[Tensor, Tensor]:
    """The kept (part 0) or held-out (part 1) examples of the named domains, concatenated."""
    rows = [(tensors[n][0][parts[n][part]], tensors[n][1][parts[n][part]]) for n in names]
    return torch.cat([x for x, _ in rows]), torch.cat([y for _, y in rows])


@dataclass(frozen=True)
class FineTuneSplit:
    """Pre-train, then fine-tune on one domain, then test on the domains the fine-tuning never saw
    (TRAM's cross-domain setting, Sherborne et al. ICLR 2024: fine-tune on one language or domain,
    evaluate zero-shot on the others)."""

    target: str
    pretrain_domains: tuple[str, ...]
    test_domains: tuple[str, ...]
    pretrain: tuple[Tensor, Tensor]  # the pre-training domains minus their held-out parts
    train: tuple[Tensor, Tensor]  # the target domain minus its held-out part
    val: tuple[Tensor, Tensor]  # the target domain's held-out part (model selection only)
    test: tuple[Tensor, Tensor]  # the held-out parts of every other domain, none seen in training


def fine_tune_split(suite: SuiteLike, target: str, *, pretrain_domains: Sequence[str] | None = None,
                    holdout_fraction: float = 0.2, seed: int = 0) -> FineTuneSplit:
    """Every domain is split once (`holdout_fraction` held out, seeded per domain). Pre-training uses the
    kept parts of `pretrain_domains` (default: every domain but the target); fine-tuning the target's
    kept part, validated on its held-out part; the test set is the held-out parts of all the other
    domains, so no test example is seen in pre-training or fine-tuning."""
    _check_fraction(holdout_fraction)
    _check_normalisation(suite)
    all_domains = list(suite.domains)
    if target not in all_domains:
        raise ValueError(f"target_domain: unknown domain {target!r}. Allowed: {', '.join(all_domains)}")
    others = [d for d in all_domains if d != target]
    if not others:
        raise ValueError(f"target_domain: suite {suite.name!r} has no other domain to test on")
    source = list(others if pretrain_domains is None else pretrain_domains)
    for name in source:
        if name not in others:
            raise ValueError(f"pretrain_domains: {name!r} is not a domain other than the target. "
                             f"Allowed: {', '.join(others)}")
    if not source:
        raise ValueError("pretrain_domains: expected at least one domain to pre-train on")
    tensors = _domain_tensors(suite)
    parts = _domain_parts(tensors, holdout_fraction, seed)
    val = _take(tensors, parts, [target], 1)
    if len(val[1]) == 0:
        raise ValueError(f"holdout_fraction: {holdout_fraction} of {target!r} leaves no validation example")
    return FineTuneSplit(target, tuple(source), tuple(others), _take(tensors, parts, source, 0),
                         _take(tensors, parts, [target], 0), val, _take(tensors, parts, others, 1))


def select_by_validation(history: Sequence[Mapping[str, float]], key: str = "val_acc") -> Mapping[str, Any]:
    """The record of `history` (e.g. one per epoch) with the highest `key`, the first on ties:
    DomainBed's training-domain validation, which keeps the checkpoint of best validation accuracy."""
    if not history:
        raise ValueError("history: expected at least one record")
    best: Mapping[str, Any] | None = None
    for i, record in enumerate(history):
        if key not in record:
            raise ValueError(f"history[{i}]: no {key!r} (keys: {', '.join(map(str, record)) or 'none'})")
        value = record[key]
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise ValueError(f"history[{i}].{key}: expected a finite number, got {value!r}")
        if best is None or value > best[key]:
            best = record
    assert best is not None
    return best


def _cell(results: Mapping[str, Mapping[str, Any]], method: str, domain: str) -> list[float]:
    row = results[method]
    if domain not in row:
        raise ValueError(f"results[{method!r}][{domain!r}]: missing (every method needs every held-out domain)")
    value = row[domain]
    values = [value] if isinstance(value, (int, float)) and not isinstance(value, bool) else list(value)
    if not values or not all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
                             for v in values):
        raise ValueError(f"results[{method!r}][{domain!r}]: expected a finite number or a non-empty list of them, "
                         f"got {value!r}")
    return [float(v) for v in values]


def lodo_table(
    results: Mapping[str, Mapping[str, float | Sequence[float]]],
    domains: Sequence[str],
    *,
    stat: str = "mean",
) -> list[dict[str, Any]]:
    """The leave-one-domain-out table: one row per method (in `results`' order) with "method", one
    column per held-out domain (in `domains`' order) and "avg", the mean over the domains.

    results[method][domain] is the test accuracy at the selected checkpoint, or a list of them (one
    per seed). stat="mean" (default) gives the mean over seeds; stat="std" the separate table of
    sample standard deviations (None for a single value), whose "avg" is the std over seeds of the
    per-seed average over domains (seed i of each domain taken together; None if the cells have
    different numbers of seeds). Domains in `results` but not in `domains` are left out."""
    if stat not in ("mean", "std"):
        raise ValueError(f"stat: unknown value {stat!r}. Allowed: mean, std")
    columns = list(domains) if not isinstance(domains, str) else [domains]
    if not columns:
        raise ValueError("domains: expected at least one held-out domain")
    for name in columns:
        if name in ("method", "avg"):
            raise ValueError(f"domains: {name!r} is a column of its own; rename the domain")
        if columns.count(name) > 1:
            raise ValueError(f"domains: {name!r} is named twice")
    if not results:
        raise ValueError("results: expected at least one method")
    rows = []
    for method in results:
        cells = {d: _cell(results, method, d) for d in columns}
        row: dict[str, Any] = {"method": method}
        if stat == "mean":
            row.update({d: mean_std(v)[0] for d, v in cells.items()})
            row["avg"] = sum(row[d] for d in columns) / len(columns)
        else:
            row.update({d: mean_std(v)[1] for d, v in cells.items()})
            counts = {len(v) for v in cells.values()}
            if len(counts) == 1:
                per_seed = [sum(cells[d][i] for d in columns) / len(columns) for i in range(counts.pop())]
                row["avg"] = mean_std(per_seed)[1]
            else:
                row["avg"] = None
        rows.append(row)
    return rows
