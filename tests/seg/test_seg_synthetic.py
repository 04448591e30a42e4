"""The synthetic cardiac slices: reproducibility per sample, anatomy, normalisation, the shifted domain, errors."""

from __future__ import annotations

import numpy as np
import pytest

from seg.synthetic import CLASSES, DOMAINS, make_slice, make_slices, make_split

BACKGROUND, RV, MYOCARDIUM, LV = range(4)


@pytest.fixture(scope="module")
def slices() -> tuple[np.ndarray, np.ndarray]:
    return make_slices(60, size=64, seed=3)


def test_shapes_dtypes_and_per_image_normalisation(slices: tuple[np.ndarray, np.ndarray]) -> None:
    images, labels = slices
    assert images.shape == (60, 1, 64, 64) and images.dtype == np.float32
    assert labels.shape == (60, 64, 64) and labels.dtype == np.int64
    np.testing.assert_allclose(images.mean(axis=(1, 2, 3)), 0, atol=1e-5)
    np.testing.assert_allclose(images.std(axis=(1, 2, 3), dtype=np.float64), 1, atol=1e-4)
    assert set(np.unique(labels)) == set(range(len(CLASSES)))


def test_same_seed_same_slices_other_seed_other_slices() -> None:
    first, again, other = (make_slices(4, size=32, seed=s) for s in (7, 7, 8))
    np.testing.assert_array_equal(first[0], again[0])
    np.testing.assert_array_equal(first[1], again[1])
    assert not np.array_equal(first[1], other[1]) and np.abs(first[0] - other[0]).mean() > 0.1


def test_a_sample_alone_equals_the_same_sample_in_a_batch() -> None:
    images, labels = make_slices(5, size=32, seed=2)
    image, label = make_slice(3, size=32, seed=2)
    np.testing.assert_array_equal(image, images[3])
    np.testing.assert_array_equal(label, labels[3])
    shifted_images, shifted_labels = make_slices(2, size=32, seed=2, start=3)
    np.testing.assert_array_equal(shifted_images[0], images[3])
    np.testing.assert_array_equal(shifted_labels[1], labels[4])


def test_all_four_classes_in_most_slices(slices: tuple[np.ndarray, np.ndarray]) -> None:
    _, labels = slices
    present = np.array([[np.any(lab == c) for c in range(4)] for lab in labels])
    assert present[:, [BACKGROUND, MYOCARDIUM, LV]].all()  # every slice has a left ventricle and its wall
    assert 0.75 <= present[:, RV].mean() < 1  # about one slice in ten is apical, without the right ventricle
    fractions = np.bincount(labels.ravel(), minlength=4) / labels.size
    assert fractions[BACKGROUND] > 0.7 and (fractions[1:] > 0.01).all()


def test_the_myocardium_encloses_the_cavity(slices: tuple[np.ndarray, np.ndarray]) -> None:
    """No left-ventricle pixel touches the background or the right ventricle (4-neighbourhood), and the right
    ventricle always touches the myocardium: the ring and crescent are where ACDC has them."""
    _, labels = slices
    padded = np.pad(labels, ((0, 0), (1, 1), (1, 1)), constant_values=BACKGROUND)
    neighbours = np.stack([padded[:, :-2, 1:-1], padded[:, 2:, 1:-1], padded[:, 1:-1, :-2], padded[:, 1:-1, 2:]])
    lv = labels == LV
    assert np.isin(neighbours[:, lv], (LV, MYOCARDIUM)).all()
    for lab, nbr in zip(labels, neighbours.transpose(1, 0, 2, 3)):
        rv = lab == RV
        if rv.any():
            assert (nbr[:, rv] == MYOCARDIUM).any()


def _mean_in(images: np.ndarray, labels: np.ndarray, cls: int) -> np.ndarray:
    return np.array([image[0][lab == cls].mean() for image, lab in zip(images, labels)])


def _cavity_noise(images: np.ndarray, labels: np.ndarray) -> float:
    """Mean |difference| of horizontally adjacent pixels in the cavity's core (2 pixels from its edge, beyond the
    partial-volume blur), where the tissue is uniform: the noise (and a little texture)."""
    cavity = labels == LV
    core = cavity.copy()
    for axis in (1, 2):
        for shift in (-2, -1, 1, 2):
            core &= np.roll(cavity, shift, axis=axis)
    pairs = core[:, :, 1:] & core[:, :, :-1]
    return float(np.abs(np.diff(images[:, 0], axis=2))[pairs].mean())


def test_the_shifted_domain_is_the_same_hearts_under_another_scanner() -> None:
    source_images, labels = make_slices(40, size=64, seed=5)
    shifted_images, shifted_labels = make_slices(40, size=64, seed=5, domain="shifted")
    np.testing.assert_array_equal(shifted_labels, labels)
    source_contrast = _mean_in(source_images, labels, LV) - _mean_in(source_images, labels, MYOCARDIUM)
    shifted_contrast = _mean_in(shifted_images, labels, LV) - _mean_in(shifted_images, labels, MYOCARDIUM)
    # blood bright and myocardium dark in both (in z-scored units), with a lower contrast in the shifted domain
    assert (source_contrast > 0).all() and (shifted_contrast > 0).all()
    assert shifted_contrast.mean() < 0.8 * source_contrast.mean()
    assert _cavity_noise(shifted_images, labels) > 1.4 * _cavity_noise(source_images, labels)


def test_make_split_is_disjoint_and_pairs_the_test_sets() -> None:
    split = make_split(n_train=6, n_val=2, n_test=3, size=32, seed=1)
    assert list(split) == ["train", "val", "test", "test_shifted"]
    assert [len(split[k][0]) for k in split] == [6, 2, 3, 3]
    np.testing.assert_array_equal(split["test"][0], make_slices(3, size=32, seed=1, start=8)[0])
    np.testing.assert_array_equal(split["test_shifted"][1], split["test"][1])
    assert not np.array_equal(split["test_shifted"][0], split["test"][0])
    for train_image in split["train"][0]:
        assert all(not np.array_equal(train_image, t) for t in split["test"][0])


@pytest.mark.parametrize(("call", "message"), [
    (lambda: make_slices(-1), r"^n: expected an integer >= 0, got -1"),
    (lambda: make_slices(2.5), r"^n: expected an integer >= 0, got 2.5"),
    (lambda: make_slices(2, size=8), r"^size: expected an integer >= 16, got 8"),
    (lambda: make_slices(2, domain="ct"), r"^domain: unknown domain 'ct'. Allowed: source, shifted"),
    (lambda: make_slices(2, seed=-3), r"^seed: expected an integer >= 0"),
    (lambda: make_slice(-1), r"^index: expected an integer >= 0"),
    (lambda: make_split(n_val=True), r"^n_val: expected an integer >= 0, got True"),
])
def test_bad_arguments_name_the_field(call, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        call()


def test_domains_and_empty_request() -> None:
    assert DOMAINS == ("source", "shifted")
    images, labels = make_slices(0, size=16)
    assert images.shape == (0, 1, 16, 16) and labels.shape == (0, 16, 16)
