"""testbeds.protocol: DomainBed's leave-one-domain-out splits (shapes, disjointness, the validation
fraction of each training domain, seeds), training-domain validation and the results table, on
fake domain suites whose pixels are the examples' ids."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import pytest
import torch
from datasets import Array3D, ClassLabel, Dataset, Features

from testbeds.protocol import DomainSplit, fine_tune_split, leave_one_domain_out, lodo_table, select_by_validation


@dataclass(frozen=True)
class FakeSuite:
    """The fields of testbeds.domains.DomainSuite."""

    name: str
    domains: dict[str, Dataset]
    num_classes: int
    pixel_max: float = 1.0
    mean: tuple[float, ...] = (0.0,)
    std: tuple[float, ...] = (1.0,)
    definitions: dict[str, str] = field(default_factory=dict)


def id_domain(ids: range, num_classes: int = 3, shape: tuple[int, int, int] = (1, 2, 2)) -> Dataset:
    """A domain whose example i has every pixel equal to its id (so x identifies it after the
    identity normalisation) and label id % num_classes."""
    features = Features({"image": Array3D(shape=shape, dtype="float32"), "label": ClassLabel(num_classes=num_classes)})
    images = np.full((len(ids), *shape), 1.0, dtype=np.float32) * np.asarray(ids, dtype=np.float32)[:, None, None, None]
    return Dataset.from_dict({"image": images, "label": [i % num_classes for i in ids]}, features=features)


def id_suite(sizes: dict[str, int], num_classes: int = 3) -> FakeSuite:
    domains, start = {}, 0
    for name, n in sizes.items():
        domains[name] = id_domain(range(start, start + n), num_classes)
        start += n
    return FakeSuite("fake", domains, num_classes)


SIZES = {"art": 10, "photo": 20, "sketch": 15}
OFFSETS = {"art": 0, "photo": 10, "sketch": 30}


def ids(part: tuple[torch.Tensor, torch.Tensor]) -> list[int]:
    return part[0][:, 0, 0, 0].round().long().tolist()


def domain_of(i: int) -> str:
    return max((o, name) for name, o in OFFSETS.items() if o <= i)[1]


def test_one_split_per_domain_with_the_right_shapes() -> None:
    splits = leave_one_domain_out(id_suite(SIZES))
    assert [s.held_out for s in splits] == ["art", "photo", "sketch"]
    assert all(isinstance(s, DomainSplit) for s in splits)
    art = splits[0]
    assert art.train_domains == ("photo", "sketch")
    n_val = int(20 * 0.2) + int(15 * 0.2)  # DomainBed: int(len(env) * holdout_fraction) per training domain
    assert art.val[0].shape == (n_val, 1, 2, 2) and art.val[1].shape == (n_val,)
    assert art.train[0].shape == (35 - n_val, 1, 2, 2) and art.train[1].shape == (35 - n_val,)
    assert art.test[0].shape == (10, 1, 2, 2) and art.test[1].shape == (10,)
    for s in splits:
        for x, y in (s.train, s.val, s.test):
            assert x.dtype == torch.float32 and y.dtype == torch.int64
            assert torch.equal(y, torch.tensor([i % 3 for i in ids((x, y))]))  # labels stay with their images


@pytest.mark.parametrize("fraction", [0.2, 0.3, 0.5, 0.9])
def test_splits_are_disjoint_and_cover_every_domain(fraction: float) -> None:
    for s in leave_one_domain_out(id_suite(SIZES), holdout_fraction=fraction, seed=3):
        train, val, test = set(ids(s.train)), set(ids(s.val)), set(ids(s.test))
        assert len(train) == len(s.train[1]) and len(val) == len(s.val[1])  # no example twice
        assert not train & val and not train & test and not val & test
        assert test == set(range(OFFSETS[s.held_out], OFFSETS[s.held_out] + SIZES[s.held_out]))
        assert {domain_of(i) for i in train | val} == set(s.train_domains)
        assert len(train | val) == sum(SIZES[d] for d in s.train_domains)
        for d in s.train_domains:  # the validation fraction of each training domain
            assert sum(domain_of(i) == d for i in val) == int(SIZES[d] * fraction)


def test_normalisation_per_channel() -> None:
    shape = (3, 2, 2)
    features = Features({"image": Array3D(shape=shape, dtype="float32"), "label": ClassLabel(num_classes=2)})
    rng = np.random.default_rng(0)
    pixels = {d: rng.integers(0, 256, (6, *shape)).astype(np.float32) for d in ("a", "b")}
    domains = {d: Dataset.from_dict({"image": p, "label": [0, 1] * 3}, features=features) for d, p in pixels.items()}
    mean, std = (0.5, 0.4, 0.3), (0.25, 0.2, 0.1)
    suite = FakeSuite("rgb", domains, 2, 255.0, mean, std)
    split = leave_one_domain_out(suite, domains=["a"])[0]
    expected = (pixels["a"].astype(np.float64) / 255.0 - np.array(mean)[:, None, None]) / np.array(std)[:, None, None]
    np.testing.assert_allclose(split.test[0].numpy(), expected, rtol=1e-5, atol=1e-5)


def test_seeded_and_independent_of_the_global_rng() -> None:
    suite = id_suite(SIZES)
    state = torch.get_rng_state()
    a, b = leave_one_domain_out(suite, seed=7), leave_one_domain_out(suite, seed=7)
    assert torch.equal(state, torch.get_rng_state())
    for s, t in zip(a, b, strict=True):
        for part in ("train", "val", "test"):
            assert all(torch.equal(u, v) for u, v in zip(getattr(s, part), getattr(t, part), strict=True))
    other = leave_one_domain_out(suite, seed=8)
    assert any(set(ids(s.val)) != set(ids(t.val)) for s, t in zip(a, other, strict=True))


def test_a_domains_validation_part_does_not_depend_on_the_held_out_domain() -> None:
    splits = {s.held_out: s for s in leave_one_domain_out(id_suite(SIZES), seed=1)}
    # photo is a training domain when art or sketch is held out: the same photo examples validate both
    photo_val = [{i for i in ids(splits[h].val) if domain_of(i) == "photo"} for h in ("art", "sketch")]
    assert photo_val[0] == photo_val[1] and len(photo_val[0]) == 4


def test_named_domains() -> None:
    suite = id_suite(SIZES)
    assert [s.held_out for s in leave_one_domain_out(suite, domains=["sketch", "art"])] == ["sketch", "art"]
    assert [s.held_out for s in leave_one_domain_out(suite, domains="photo")] == ["photo"]
    with pytest.raises(ValueError, match=r"domains: unknown domain 'foto'. Allowed: art, photo, sketch"):
        leave_one_domain_out(suite, domains=["foto"])
    with pytest.raises(ValueError, match=r"domains: expected at least one domain"):
        leave_one_domain_out(suite, domains=[])
    with pytest.raises(ValueError, match=r"domains: 'art' is named twice"):
        leave_one_domain_out(suite, domains=["art", "art"])


def test_split_errors() -> None:
    suite = id_suite(SIZES)
    for bad in (0, 0.0, 1.0, 1.5, -0.1, True, "0.2", math.nan):
        with pytest.raises(ValueError, match=r"holdout_fraction: expected a number in \(0, 1\)"):
            leave_one_domain_out(suite, holdout_fraction=bad)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"needs at least 2 domains, suite 'fake' has 1 \(art\)"):
        leave_one_domain_out(id_suite({"art": 5}))
    with pytest.raises(ValueError, match=r"holdout_fraction: 0.2 of the training domains of 'a' leaves no validation"):
        leave_one_domain_out(id_suite({"a": 4, "b": 4}))  # int(4 * 0.2) = 0
    with pytest.raises(ValueError, match=r"label: domain 'art' has labels outside 0..1"):
        leave_one_domain_out(FakeSuite("fake", id_suite(SIZES).domains, 2))
    empty = {**id_suite(SIZES).domains, "empty": id_domain(range(0))}
    with pytest.raises(ValueError, match=r"domain 'empty' of suite 'fake' has no examples"):
        leave_one_domain_out(FakeSuite("fake", empty, 3))
    mixed = {"a": id_domain(range(10)), "b": id_domain(range(10), shape=(1, 3, 3))}
    with pytest.raises(ValueError, match=r"image: the domains' examples differ in shape"):
        leave_one_domain_out(FakeSuite("fake", mixed, 3))
    with pytest.raises(ValueError, match=r"std: expected finite values > 0"):
        leave_one_domain_out(FakeSuite("fake", suite.domains, 3, std=(0.0,)))
    with pytest.raises(ValueError, match=r"mean, std: expected one value per channel each"):
        leave_one_domain_out(FakeSuite("fake", suite.domains, 3, mean=(0.0, 0.0)))


# --------------------------------------------------------------------------- model selection
def test_select_by_validation_picks_the_best_and_the_first_on_ties() -> None:
    history = [
        {"epoch": 0, "val_acc": 0.50, "test_acc": 0.40},
        {"epoch": 1, "val_acc": 0.70, "test_acc": 0.45},
        {"epoch": 2, "val_acc": 0.65, "test_acc": 0.60},
        {"epoch": 3, "val_acc": 0.70, "test_acc": 0.50},
    ]
    assert select_by_validation(history) is history[1]
    assert select_by_validation(history, key="test_acc") is history[2]
    assert select_by_validation(history[:1]) is history[0]


def test_select_by_validation_errors() -> None:
    with pytest.raises(ValueError, match="history: expected at least one record"):
        select_by_validation([])
    with pytest.raises(ValueError, match=r"history\[1\]: no 'val_acc' \(keys: epoch\)"):
        select_by_validation([{"val_acc": 0.5}, {"epoch": 1}])
    with pytest.raises(ValueError, match=r"history\[0\].val_acc: expected a finite number, got nan"):
        select_by_validation([{"val_acc": math.nan}])


# --------------------------------------------------------------------------- the table
DOMAINS = ["art", "photo", "sketch"]


def test_table_has_one_column_per_held_out_domain_and_the_average() -> None:
    results = {"erm": {"sketch": 0.6, "art": 0.8, "photo": 0.9}, "sam": {"art": 0.82, "photo": 0.91, "sketch": 0.66}}
    rows = lodo_table(results, DOMAINS)
    assert len(rows) == 2 and [list(r) for r in rows] == [["method", *DOMAINS, "avg"]] * 2
    assert rows[0]["method"] == "erm" and rows[1]["method"] == "sam"
    assert rows[0]["art"] == 0.8 and rows[0]["sketch"] == 0.6
    assert rows[0]["avg"] == pytest.approx((0.8 + 0.9 + 0.6) / 3, rel=1e-12)
    assert rows[1]["avg"] == pytest.approx((0.82 + 0.91 + 0.66) / 3, rel=1e-12)
    assert list(lodo_table(results, ["photo", "art"])[0]) == ["method", "photo", "art", "avg"]  # `domains` order


def test_table_of_per_seed_values_gives_means_and_a_separate_std_table() -> None:
    results = {"erm": {"art": [0.8, 0.7], "photo": [0.9, 0.95], "sketch": [0.6, 0.5]}}
    means = lodo_table(results, DOMAINS)[0]
    assert means["art"] == pytest.approx(0.75) and means["photo"] == pytest.approx(0.925)
    assert means["avg"] == pytest.approx((0.75 + 0.925 + 0.55) / 3)
    stds = lodo_table(results, DOMAINS, stat="std")[0]
    assert stds["art"] == pytest.approx(math.sqrt(0.005)) and stds["sketch"] == pytest.approx(math.sqrt(0.005))
    per_seed = [(0.8 + 0.9 + 0.6) / 3, (0.7 + 0.95 + 0.5) / 3]  # the average over domains, seed by seed
    assert stds["avg"] == pytest.approx(abs(per_seed[0] - per_seed[1]) / math.sqrt(2))
    single = lodo_table({"erm": {"art": 0.8, "photo": [0.9], "sketch": [0.6, 0.5]}}, DOMAINS, stat="std")[0]
    assert single["art"] is None and single["photo"] is None and single["avg"] is None  # unequal seed counts


def test_table_errors() -> None:
    with pytest.raises(ValueError, match=r"results\['sam'\]\['sketch'\]: missing"):
        lodo_table({"erm": {d: 0.5 for d in DOMAINS}, "sam": {"art": 0.5, "photo": 0.5}}, DOMAINS)
    with pytest.raises(ValueError, match=r"results\['erm'\]\['art'\]: expected a finite number"):
        lodo_table({"erm": {"art": math.nan}}, ["art"])
    with pytest.raises(ValueError, match=r"results\['erm'\]\['art'\]: expected a finite number or a non-empty list"):
        lodo_table({"erm": {"art": []}}, ["art"])
    with pytest.raises(ValueError, match="domains: expected at least one held-out domain"):
        lodo_table({"erm": {"art": 0.5}}, [])
    with pytest.raises(ValueError, match="domains: 'avg' is a column of its own"):
        lodo_table({"erm": {"avg": 0.5}}, ["avg"])
    with pytest.raises(ValueError, match="results: expected at least one method"):
        lodo_table({}, DOMAINS)
    with pytest.raises(ValueError, match="stat: unknown value 'median'"):
        lodo_table({"erm": {"art": 0.5}}, ["art"], stat="median")


# --------------------------------------------------------------------------- fine-tuning (TRAM's setting)
@pytest.mark.parametrize("pretrain", [None, ["photo"]])
def test_fine_tune_split_is_disjoint_and_tests_only_unseen_examples(pretrain: list[str] | None) -> None:
    s = fine_tune_split(id_suite(SIZES), "art", pretrain_domains=pretrain, holdout_fraction=0.2, seed=1)
    source = pretrain or ["photo", "sketch"]
    assert s.target == "art" and s.pretrain_domains == tuple(source) and s.test_domains == ("photo", "sketch")
    pre, train, val, test = (set(ids(p)) for p in (s.pretrain, s.train, s.val, s.test))
    assert not pre & test and not train & test and not val & test and not train & val and not pre & (train | val)
    assert {domain_of(i) for i in train | val} == {"art"} and len(val) == int(10 * 0.2)
    assert {domain_of(i) for i in pre} == set(source)
    assert {domain_of(i) for i in test} == {"photo", "sketch"}
    assert len(test) == int(20 * 0.2) + int(15 * 0.2)
    # the held-out part of a domain is the one leave-one-domain-out holds out for it (same seed, same domain)
    lodo = leave_one_domain_out(id_suite(SIZES), holdout_fraction=0.2, seed=1, domains=["sketch"])[0]
    assert set(ids(s.val)) <= set(range(10)) and set(ids(lodo.val)) & set(range(10)) == set(ids(s.val))


def test_fine_tune_split_errors() -> None:
    suite = id_suite(SIZES)
    with pytest.raises(ValueError, match="^target_domain: unknown domain 'clipart'"):
        fine_tune_split(suite, "clipart")
    with pytest.raises(ValueError, match="^pretrain_domains: 'art' is not a domain other than the target"):
        fine_tune_split(suite, "art", pretrain_domains=["art"])
    with pytest.raises(ValueError, match="^pretrain_domains: expected at least one"):
        fine_tune_split(suite, "art", pretrain_domains=[])
    with pytest.raises(ValueError, match="^target_domain: .* no other domain"):
        fine_tune_split(id_suite({"art": 10}), "art")
