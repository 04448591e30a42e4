"""testbeds.domains: the rotation (exact at 90 degrees), disjoint rotated-digits domains, the MNIST-1D
domains and their definitions, and DomainBed image folders (written here as tiny PNGs) with their errors."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from shared.digits import digits_tensors
from shared.registry import UnknownNameError
from testbeds.domains import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    MNIST1D_DOMAIN_SHIFTS,
    ROTATION_ANGLES,
    SUITES,
    load_suite,
    rotate,
    split_domains,
    suite_tensors,
)

COLOURS = {"cat": (255, 0, 0), "dog": (0, 0, 255)}  # one solid colour per class: labels are checkable from pixels


@pytest.fixture(autouse=True)
def cache_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SAMSUITE_CACHE", str(tmp_path / "cache"))


# ------------------------------------------------------------------------------------------ rotation
def test_rotation_by_90_degrees_is_a_transpose_and_a_flip() -> None:
    x = torch.randn(2, 3, 7, 7, generator=torch.Generator().manual_seed(0))
    expected = x.transpose(-2, -1).flip(-2)  # counter-clockwise: the top row comes from the right column
    assert torch.allclose(rotate(x, 90), expected, atol=1e-6, rtol=0)
    assert torch.equal(rotate(x, 90), torch.rot90(x, 1, dims=(-2, -1)))
    assert torch.allclose(rotate(x, 0), x, atol=1e-6, rtol=0)
    assert torch.allclose(rotate(rotate(x, 45), -45)[..., 3, 3], x[..., 3, 3], atol=1e-5)  # the centre stays


def test_rotation_is_counter_clockwise() -> None:
    x = torch.zeros(1, 1, 5, 5)
    x[0, 0, 2, 4] = 1.0  # a point right of the centre
    assert rotate(x, 90)[0, 0, 0, 2] == 1.0  # turns up


# ------------------------------------------------------------------------------------ rotated digits
def test_rotated_digits_domains_are_disjoint_and_cover_the_digits() -> None:
    subsets = split_domains(1797, 6, seed=0)
    assert torch.equal(torch.cat(subsets).sort().values, torch.arange(1797))  # each digit exactly once
    assert [len(s) for s in subsets] == [300, 300, 300, 299, 299, 299]
    suite = load_suite("rotated-digits")
    assert list(suite.domains) == ["0", "15", "30", "45", "60", "75"] == [f"{a}" for a in ROTATION_ANGLES]
    assert list(suite.definitions) == list(suite.domains) and "15 degrees" in suite.definitions["15"]
    assert (suite.num_classes, suite.pixel_max, suite.mean, suite.std) == (10, 1.0, (0.0,), (1.0,))
    x, y = digits_tensors()
    for (name, idx), angle in zip(zip(suite.domains, subsets, strict=True), ROTATION_ANGLES, strict=True):
        got_x, got_y = suite_tensors(suite, name)
        assert torch.equal(got_y, y[idx])
        assert torch.allclose(got_x, rotate(x[idx], angle), atol=1e-6)
    assert torch.allclose(suite_tensors(suite, "0")[0], x[subsets[0]], atol=1e-6)  # angle 0: the digits themselves
    assert not torch.equal(split_domains(1797, 6, seed=1)[0], subsets[0])


def test_rotated_digits_options() -> None:
    suite = load_suite("rotated-digits", angles=[0, 90], seed=3)
    assert list(suite.domains) == ["0", "90"] and sum(len(d) for d in suite.domains.values()) == 1797
    for bad, field in [({"angles": [0]}, "angles"), ({"angles": [0, 0.0]}, "angles"), ({"angles": "0,15"}, "angles"),
                       ({"seed": 1.5}, "seed"), ({"angle": [0, 15]}, "angle")]:
        with pytest.raises(ValueError, match=rf"^{field}: "):
            load_suite("rotated-digits", **bad)


# ---------------------------------------------------------------------------------- MNIST-1D domains
def test_mnist1d_domains_differ_and_record_their_definitions() -> None:
    suite = load_suite("mnist1d-domains", num_samples=50)
    assert list(suite.domains) == list(MNIST1D_DOMAIN_SHIFTS) == ["base", "noisy", "sheared", "scaled", "shifted"]
    assert all(len(ds) == 50 for ds in suite.domains.values())
    assert "corr_noise_scale=0.5 (default 0.25)" in suite.definitions["noisy"]
    assert "shear_scale=1.5" in suite.definitions["sheared"] and "num_samples=50" in suite.definitions["base"]
    seeds = {d.rsplit("seed=", 1)[1] for d in suite.definitions.values()}
    assert len(seeds) == 5  # a generator seed of its own per domain
    tensors = {name: suite_tensors(suite, name)[0] for name in suite.domains}
    assert tensors["base"].shape == (50, 1, 40)
    assert all(not torch.equal(tensors["base"], t) for name, t in tensors.items() if name != "base")
    again = load_suite("mnist1d-domains", num_samples=50)  # from the cache: the same data
    assert torch.equal(suite_tensors(again, "noisy")[0], tensors["noisy"])
    for bad in ({"num_samples": 55}, {"num_samples": 0}):
        with pytest.raises(ValueError, match="^num_samples: "):
            load_suite("mnist1d-domains", **bad)


# --------------------------------------------------------------------------------- DomainBed folders
def make_folder(root: Path, domains: tuple[str, ...] = ("photo", "art"), per_class: int = 3) -> Path:
    """<root>/<domain>/<class>/<i>.png: 2 domains x 2 classes x 3 solid-colour PNGs of odd sizes."""
    for d, domain in enumerate(domains):
        for cls, colour in COLOURS.items():
            folder = root / domain / cls
            folder.mkdir(parents=True)
            for i in range(per_class):
                Image.new("RGB", (5 + i + d, 7), colour).save(folder / f"{i}.png")
    return root


def test_a_domainbed_folder_loads_with_the_right_labels(tmp_path: Path) -> None:
    root = make_folder(tmp_path / "toy")
    (root / "art" / "cat" / "notes.txt").write_text("not an image")  # skipped, as ImageFolder does
    (root / "art" / "cat" / "._0.png").write_bytes(b"AppleDouble")  # hidden: skipped
    suite = load_suite("domainbed-folder", root=str(root), image_size=8)
    assert list(suite.domains) == ["art", "photo"]  # sorted
    assert suite.domains["art"].features["label"].names == ["cat", "dog"] and suite.num_classes == 2
    assert (suite.pixel_max, suite.mean, suite.std) == (255.0, IMAGENET_MEAN, IMAGENET_STD)
    assert "6 images" in suite.definitions["photo"] and "8x8" in suite.definitions["photo"]
    for name in suite.domains:
        x, y = suite_tensors(suite, name)
        assert x.shape == (6, 3, 8, 8) and y.tolist() == [0, 0, 0, 1, 1, 1]
        for image, label in zip(x, y, strict=True):
            colour = COLOURS[["cat", "dog"][label]]
            ref = (np.array(colour) / 255.0 - np.array(IMAGENET_MEAN)) / np.array(IMAGENET_STD)
            assert np.allclose(image.numpy(), ref[:, None, None], atol=1e-5)  # resized, still the class colour


def test_a_missing_class_folder_names_the_domain_and_the_class(tmp_path: Path) -> None:
    root = make_folder(tmp_path / "toy")
    for f in (root / "art" / "dog").iterdir():
        f.unlink()
    (root / "art" / "dog").rmdir()
    with pytest.raises(ValueError, match=r"^root: domain 'art' lacks the class folder\(s\) dog"):
        load_suite("domainbed-folder", root=str(root), image_size=8)


def test_a_corrupt_image_names_the_file(tmp_path: Path) -> None:
    root = make_folder(tmp_path / "toy")
    bad = root / "photo" / "dog" / "1.png"
    bad.write_bytes(bad.read_bytes()[:20])  # truncated
    with pytest.raises(ValueError, match=rf"^root: cannot read the image {bad}"):
        load_suite("domainbed-folder", root=str(root), image_size=8)


def test_domainbed_folder_option_errors_name_the_field(tmp_path: Path) -> None:
    root = make_folder(tmp_path / "toy")
    cases = [
        ({}, "root: domain suite 'domainbed-folder' needs this option"),
        ({"root": str(tmp_path / "absent")}, "root: expected the folder"),
        ({"root": str(root), "image_size": 0}, "image_size: "),
        ({"root": str(root), "size": 8}, "size: unknown option of domain suite 'domainbed-folder'"),
    ]
    for options, message in cases:
        with pytest.raises(ValueError, match=f"^{message}"):
            load_suite("domainbed-folder", **options)
    one = make_folder(tmp_path / "one", domains=("photo",))
    with pytest.raises(ValueError, match="^root: .* 1 domain folder"):
        load_suite("domainbed-folder", root=str(one))
    empty = make_folder(tmp_path / "empty", per_class=0)
    with pytest.raises(ValueError, match=r"^root: .*cat holds no image"):
        load_suite("domainbed-folder", root=str(empty))


def test_bad_suite_names_and_domains_name_the_field() -> None:
    assert SUITES.names() == ["domainbed-folder", "mnist1d-domains", "rotated-digits", "xnli"]
    with pytest.raises(UnknownNameError, match=r"^suite: unknown domain suite 'rotated-digit'; did you mean"):
        load_suite("rotated-digit")
    with pytest.raises(ValueError, match="^domain: suite 'rotated-digits' has no domain '90'"):
        suite_tensors(load_suite("rotated-digits"), "90")
