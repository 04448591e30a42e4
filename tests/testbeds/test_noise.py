"""testbeds.noise: the flipped fraction is exact, the kinds flip as documented, the draws are seeded
(and never touch the global generators), the test split is untouched, bad input names the field."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from testbeds.noise import noisy_labels, with_label_noise
from testbeds.sources import load_source, source_tensors


def labels(n: int = 1000, num_classes: int = 10, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, num_classes, (n,), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("kind", ["symmetric", "asymmetric"])
@pytest.mark.parametrize(("n", "rate"), [(1000, 0.2), (1000, 0.0), (999, 0.4), (7, 0.5), (1, 0.9), (0, 0.3)])
def test_the_flipped_fraction_is_exact(kind: str, n: int, rate: float) -> None:
    y = labels(n)
    noisy, flipped = noisy_labels(y, rate, kind, 10, seed=3)  # type: ignore[arg-type]
    assert int(flipped.sum()) == round(rate * n)
    assert torch.equal(flipped, noisy != y)  # every chosen label changed, no other did
    assert noisy.dtype == torch.int64 and noisy.shape == y.shape
    assert n == 0 or (int(noisy.min()) >= 0 and int(noisy.max()) < 10)


def test_symmetric_flips_are_uniform_over_the_other_classes() -> None:
    y = torch.zeros(30_000, dtype=torch.int64)  # one class: its wrong labels should spread over the other 9
    noisy, flipped = noisy_labels(y, 0.9, "symmetric", 10, seed=0)
    counts = torch.bincount(noisy[flipped], minlength=10)
    assert counts[0] == 0
    expected = int(flipped.sum()) / 9
    assert all(abs(int(c) - expected) < 5 * expected**0.5 for c in counts[1:])  # within 5 sigma


def test_asymmetric_flips_to_the_next_class() -> None:
    y = labels(5000, num_classes=7)
    noisy, flipped = noisy_labels(y, 0.3, "asymmetric", 7, seed=1)
    assert torch.equal(noisy[flipped], (y[flipped] + 1) % 7)  # c -> c + 1 mod C, the last class to 0
    assert torch.equal(noisy[~flipped], y[~flipped])
    assert bool(((y == 6) & flipped).any()) and bool((noisy[(y == 6) & flipped] == 0).all())


def test_seeded_and_independent_of_the_global_generators() -> None:
    y = labels()
    torch.manual_seed(0)
    state = torch.random.get_rng_state()
    a = noisy_labels(y, 0.25, "symmetric", 10, seed=5)
    assert torch.equal(torch.random.get_rng_state(), state)
    torch.manual_seed(999)  # another global state: the same flips
    b = noisy_labels(y, 0.25, "symmetric", 10, seed=5)
    c = noisy_labels(y, 0.25, "symmetric", 10, seed=6)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(a[1], c[1])


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"rate": 1.0}, "label_noise"),
        ({"rate": -0.1}, "label_noise"),
        ({"rate": True}, "label_noise"),
        ({"rate": "0.2"}, "label_noise"),
        ({"kind": "pairwise"}, "label_noise_kind"),
        ({"num_classes": 1}, "num_classes"),
        ({"labels": torch.tensor([0, 10])}, "labels"),
        ({"labels": torch.tensor([-1, 0])}, "labels"),
        ({"labels": torch.zeros(3)}, "labels"),
        ({"labels": torch.zeros(2, 2, dtype=torch.int64)}, "labels"),
    ],
)
def test_bad_input_names_the_field(kwargs: dict, field: str) -> None:
    args = {"labels": labels(10), "rate": 0.2, "kind": "symmetric", "num_classes": 10, "seed": 0, **kwargs}
    with pytest.raises(ValueError, match=rf"^{field}: "):
        noisy_labels(**args)


def test_a_source_gets_noise_in_its_train_split_only() -> None:
    source = load_source("digits")
    noisy, fraction = with_label_noise(source, 0.3, "asymmetric", seed=2)
    assert fraction == round(0.3 * len(source.train)) / len(source.train)
    assert noisy.test is source.test  # the test split is never touched
    assert noisy.train.features == source.train.features  # the ClassLabel stays
    (x, y), (x_noisy, y_noisy) = source_tensors(source, "train"), source_tensors(noisy, "train")
    assert torch.equal(x, x_noisy)  # images unchanged, in the same order
    flipped = y != y_noisy
    assert int(flipped.sum()) / len(y) == fraction
    assert torch.equal(y_noisy[flipped], (y[flipped] + 1) % 10)
    expected, _ = noisy_labels(y, 0.3, "asymmetric", 10, seed=2)
    assert np.array_equal(y_noisy.numpy(), expected.numpy())  # the same flips as on the tensor
    assert (noisy.pixel_max, noisy.mean, noisy.std, noisy.augment) == (1.0, (0.0,), (1.0,), None)
    with pytest.raises(ValueError, match="^label_noise: "):
        with_label_noise(source, 1.5, "symmetric", seed=0)
