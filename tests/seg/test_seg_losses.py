"""The uncertainty-aware loss: each term against a written-out float64 formula (and MONAI where installed), the
weighting's value and gradients by hand, deep supervision, and the errors."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from seg.losses import LOSS_TERMS, DeepSupervisionLoss, UncertaintyLoss, deep_supervision_weights, dice_loss, focal_loss

CLASSES = 4


def _batch(seed: int = 0, shape: tuple[int, ...] = (3, 6, 5),
           dtype: torch.dtype = torch.float64) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    logits = 2 * torch.randn(shape[0], CLASSES, *shape[1:], generator=g, dtype=dtype)
    labels = torch.randint(0, CLASSES, shape, generator=g)
    return logits, labels


def _softmax(logits: np.ndarray) -> np.ndarray:
    e = np.exp(logits - logits.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def _onehot(labels: np.ndarray) -> np.ndarray:
    return np.moveaxis(np.eye(CLASSES)[labels], -1, 1)


def _dice_reference(logits: np.ndarray, labels: np.ndarray, batch_dice: bool, smooth: float = 1e-5) -> float:
    p, y = _softmax(logits), _onehot(labels)
    scores = []
    samples = [slice(None)] if batch_dice else [slice(b, b + 1) for b in range(len(labels))]
    for sample in samples:
        for c in range(1, CLASSES):  # foreground classes only
            pc, yc = p[sample, c], y[sample, c]
            scores.append((2 * (pc * yc).sum() + smooth) / (pc.sum() + yc.sum() + smooth))
    return 1 - float(np.mean(scores))


def _focal_reference(logits: np.ndarray, labels: np.ndarray, alpha: float = 0.5, gamma: float = 2.0,
                     smooth: float = 1e-5) -> float:
    p, y = _softmax(logits), _onehot(labels)
    if smooth:
        y = np.clip(y, smooth / (CLASSES - 1), 1 - smooth)
    p_t = (y * p).sum(axis=1) + smooth
    return float(np.mean(-alpha * (1 - p_t) ** gamma * np.log(p_t)))


@pytest.mark.parametrize("batch_dice", [True, False])
def test_dice_is_one_minus_the_foreground_soft_dice(batch_dice: bool) -> None:
    logits, labels = _batch()
    value = dice_loss(logits, labels, batch_dice=batch_dice)
    assert value.item() == pytest.approx(_dice_reference(logits.numpy(), labels.numpy(), batch_dice), abs=1e-12)
    assert 0 <= value.item() <= 1
    confident = 50 * torch.nn.functional.one_hot(labels, CLASSES).movedim(-1, 1).double()
    assert dice_loss(confident, labels, batch_dice=batch_dice).item() == pytest.approx(0, abs=1e-9)


def test_cross_entropy_term() -> None:
    logits, labels = _batch()
    p = _softmax(logits.numpy())
    expected = -np.mean(np.log(np.take_along_axis(p, labels.numpy()[:, None], axis=1)))
    value = UncertaintyLoss(terms=("ce",), weighted=False)(logits, labels)
    assert value.item() == pytest.approx(expected, abs=1e-12)


@pytest.mark.parametrize("smooth", [1e-5, 0.0])
def test_focal_applies_softmax_once(smooth: float) -> None:
    logits, labels = _batch()
    value = focal_loss(logits, labels, smooth=smooth)
    assert value.item() == pytest.approx(_focal_reference(logits.numpy(), labels.numpy(), smooth=smooth), abs=1e-12)
    # the reference's double softmax (softmax of probabilities) gives another, flatter value
    twice = _focal_reference(_softmax(logits.numpy()), labels.numpy(), smooth=smooth)
    assert abs(value.item() - twice) > 1e-3


def test_dice_and_focal_match_monai() -> None:
    monai_losses = pytest.importorskip("monai.losses")
    logits, labels = _batch(shape=(2, 8, 8), dtype=torch.float32)
    for batch_dice in (True, False):
        monai_dice = monai_losses.DiceLoss(include_background=False, to_onehot_y=True, softmax=True, smooth_nr=1e-5,
                                           smooth_dr=1e-5, batch=batch_dice)
        expected = monai_dice(logits, labels[:, None])
        torch.testing.assert_close(dice_loss(logits, labels, batch_dice=batch_dice), expected, rtol=1e-5, atol=1e-6)
    # MONAI averages its per-class focal map over classes too, where only the label's class is non-zero
    monai_focal = monai_losses.FocalLoss(to_onehot_y=True, use_softmax=True, gamma=2.0, alpha=0.5, reduction="mean")
    expected = CLASSES * monai_focal(logits, labels[:, None])
    torch.testing.assert_close(focal_loss(logits, labels, smooth=0.0), expected, rtol=1e-5, atol=1e-6)


def test_uncertainty_weighting_value_and_gradients_by_hand() -> None:
    logits, labels = _batch()
    loss = UncertaintyLoss().double()
    sigmas = {"dice": 0.7, "ce": 1.3, "focal": 2.0}
    with torch.no_grad():
        for term, s in sigmas.items():
            loss.sigmas[term].fill_(s)
    terms = {k: v.item() for k, v in loss.term_losses(logits, labels).items()}
    assert set(terms) == set(LOSS_TERMS) and all(v >= 0 for v in terms.values())
    total = loss(logits, labels)
    expected = sum(terms[k] / (2 * s**2) + math.log(1 + s**2) for k, s in sigmas.items())
    assert total.item() == pytest.approx(expected, rel=1e-12)
    total.backward()
    for term, s in sigmas.items():  # d/ds [L/(2 s^2) + log(1 + s^2)] = -L/s^3 + 2s/(1 + s^2)
        assert loss.sigmas[term].grad.item() == pytest.approx(-terms[term] / s**3 + 2 * s / (1 + s**2), rel=1e-12)
    assert loss.sigma_values() == pytest.approx(sigmas)


def test_the_weight_of_a_term_has_a_finite_optimum() -> None:
    """With L >= 0 the objective is bounded below: for fixed L it is minimal at s^2 = (L + sqrt(L^2 + 8L)) / 4,
    where 2 s^4 - L s^2 - L = 0 (the reference's -Dice would drive s to 0 and the loss to -inf)."""
    loss = UncertaintyLoss(terms=("ce",)).double()
    value = 0.8
    with torch.no_grad():
        loss.sigmas["ce"].fill_(math.sqrt((value + math.sqrt(value**2 + 8 * value)) / 4))
    loss.combine({"ce": torch.tensor(value, dtype=torch.float64)}).backward()
    assert loss.sigmas["ce"].grad.item() == pytest.approx(0, abs=1e-14)


def test_unweighted_loss_is_the_plain_sum_and_has_no_parameters() -> None:
    logits, labels = _batch()
    plain = UncertaintyLoss(weighted=False)
    assert list(plain.parameters()) == [] and plain.sigma_values() == {}
    expected = (_dice_reference(logits.numpy(), labels.numpy(), batch_dice=True)
                - np.mean(np.log(np.take_along_axis(_softmax(logits.numpy()), labels.numpy()[:, None], axis=1)))
                + _focal_reference(logits.numpy(), labels.numpy()))
    assert plain(logits, labels).item() == pytest.approx(expected, abs=1e-12)
    # at s_k = 1 the weighted loss is half the plain sum plus 3 log 2
    weighted = UncertaintyLoss().double()
    assert weighted(logits, labels).item() == pytest.approx(expected / 2 + 3 * math.log(2), abs=1e-12)


def test_deep_supervision_weights_as_nnunet() -> None:
    assert deep_supervision_weights(1) == (1.0,)
    assert deep_supervision_weights(2) == (1.0, 0.0)
    assert deep_supervision_weights(3) == pytest.approx((2 / 3, 1 / 3, 0.0))
    assert deep_supervision_weights(4) == pytest.approx((1 / 1.75, 0.5 / 1.75, 0.25 / 1.75, 0.0))


def test_deep_supervision_loss_is_the_weighted_sum_over_downsampled_labels() -> None:
    g = torch.Generator().manual_seed(1)
    labels = torch.randint(0, CLASSES, (2, 8, 8), generator=g)
    outputs = [torch.randn(2, CLASSES, 8 // 2**i, 8 // 2**i, generator=g, dtype=torch.float64) for i in range(3)]
    loss = UncertaintyLoss().double()
    with torch.no_grad():
        loss.sigmas["ce"].fill_(1.5)
    wrapped = DeepSupervisionLoss(loss, num_outputs=3)
    expected = sum(w * loss(out, labels[:, :: 2**i, :: 2**i])  # nearest neighbour: the top-left pixel of each block
                   for i, (w, out) in enumerate(zip(deep_supervision_weights(3), outputs)))
    torch.testing.assert_close(wrapped(outputs, labels), expected, rtol=1e-12, atol=1e-12)
    terms = wrapped.term_losses(outputs, labels)
    ce = sum(w * loss.term_losses(out, labels[:, :: 2**i, :: 2**i])["ce"]
             for i, (w, out) in enumerate(zip(deep_supervision_weights(3), outputs)))
    torch.testing.assert_close(terms["ce"], ce)
    with pytest.raises(ValueError, match=r"^outputs: expected a list of 3 outputs, got 2 outputs"):
        wrapped(outputs[:2], labels)


@pytest.mark.parametrize(("make", "message"), [
    (lambda: UncertaintyLoss(terms=("dice", "tversky")),
     r"^terms: unknown term 'tversky'.*Allowed: dice, ce, focal"),
    (lambda: UncertaintyLoss(terms=()), r"^terms: expected distinct terms"),
    (lambda: UncertaintyLoss()(torch.zeros(2, 4, 3, 3), torch.full((2, 3, 3), 5)),
     r"^labels: value 5 outside the classes 0..3"),
    (lambda: UncertaintyLoss()(torch.zeros(2, 4, 3, 3), torch.full((2, 3, 3), -1)),
     r"^labels: value -1 outside the classes 0..3"),
    (lambda: UncertaintyLoss()(torch.zeros(2, 4, 3, 3), torch.zeros(2, 3, 4, dtype=torch.long)),
     r"^logits \(2, 4, 3, 3\) and labels \(2, 3, 4\): labels must be \(batch, \*spatial\) = \(2, 3, 3\)"),
    (lambda: dice_loss(torch.zeros(2, 4, 3, 3), torch.zeros(2, 3, 3)), r"^labels: expected an integer tensor"),
    (lambda: focal_loss(torch.zeros(2, 1, 3, 3), torch.zeros(2, 3, 3, dtype=torch.long)),
     r"^logits: expected \(batch, classes >= 2"),
    (lambda: deep_supervision_weights(0), r"^num_outputs: expected an integer >= 1"),
])
def test_bad_inputs_name_the_field(make, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        make()
