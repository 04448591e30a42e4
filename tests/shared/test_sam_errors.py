"""Bad arguments and misuse give clear errors (that name the field) for every member, and an
error leaves the optimizer usable."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from shared import GSAM, OBF, OPTIMIZERS, build_optimizer, chunk, sam_backward
from shared.registry import UnknownNameError

NAMES = [name for name in OPTIMIZERS.names() if not OPTIMIZERS.get(name).driver_only]  # driver-only members: test_driver_members


def model_and_batch() -> tuple[nn.Module, tuple[torch.Tensor, torch.Tensor]]:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3)), (torch.randn(8, 4), torch.randint(0, 3, (8,)))


def first_backward(opt, model, batch) -> None:
    x, y = batch
    logits = model(x)
    (opt.ascent_loss(logits, y) if opt.ascent_loss is not None else F.cross_entropy(logits, y)).backward()


def params(model: nn.Module) -> list[torch.Tensor]:
    return [p.detach().clone() for p in model.parameters()]


# --------------------------------------------------------------------------- constructor arguments
@pytest.mark.parametrize("rho", [0.0, -0.05, float("nan"), float("-inf"), True, "0.05", None])
@pytest.mark.parametrize("name", NAMES)
def test_bad_rho(name: str, rho: object) -> None:
    with pytest.raises(ValueError, match=r"^rho: expected a (value > 0|number|finite number)"):
        OPTIMIZERS.get(name)(nn.Linear(2, 2).parameters(), "sgd", rho=rho, lr=0.1)


@pytest.mark.parametrize("rho", [0.0, -1.0, float("nan")])
@pytest.mark.parametrize("name", NAMES)
def test_bad_group_rho(name: str, rho: float) -> None:
    layer = nn.Linear(2, 2)
    groups = [{"params": [layer.weight]}, {"params": [layer.bias], "rho": rho}]
    with pytest.raises(ValueError, match=r"param_groups\[1\]\.rho"):
        OPTIMIZERS.get(name)(groups, "sgd", lr=0.1)
    opt = OPTIMIZERS.get(name)([layer.weight], "sgd", lr=0.1)
    with pytest.raises(ValueError, match=r"param_groups\[1\]\.rho"):
        opt.add_param_group({"params": [layer.bias], "rho": rho})
    assert len(opt.param_groups) == 1  # the bad group was rejected before it was added


@pytest.mark.parametrize("name", NAMES)
def test_bad_eta_and_eps(name: str) -> None:
    cls = OPTIMIZERS.get(name)
    with pytest.raises(ValueError, match="^eta: expected a value >= 0"):
        cls(nn.Linear(2, 2).parameters(), "sgd", eta=-0.1, lr=0.1)
    with pytest.raises(ValueError, match="^perturb_eps: expected a value > 0"):
        cls(nn.Linear(2, 2).parameters(), "sgd", perturb_eps=0.0, lr=0.1)


@pytest.mark.parametrize("name", NAMES)
def test_unknown_base_optimizer_lists_the_allowed_names(name: str) -> None:
    with pytest.raises(UnknownNameError) as info:
        OPTIMIZERS.get(name)(nn.Linear(2, 2).parameters(), "adamm", lr=0.1)
    message = str(info.value)
    assert message.startswith("base_optimizer: unknown base optimizer 'adamm'")
    assert "did you mean 'adam'?" in message
    for allowed in ("sgd", "adam", "adamw", "rmsprop"):
        assert allowed in message.split("Allowed:")[1]


@pytest.mark.parametrize("name", NAMES)
def test_optimizer_instance_as_base_is_refused(name: str) -> None:
    layer = nn.Linear(2, 2)
    with pytest.raises(TypeError, match="pass the optimizer class .* not an instance"):
        OPTIMIZERS.get(name)(layer.parameters(), torch.optim.SGD(layer.parameters(), lr=0.1))
    with pytest.raises(TypeError, match="expected a name, class or factory"):
        OPTIMIZERS.get(name)(layer.parameters(), 3)


@pytest.mark.parametrize("gamma", [-0.1, 1.5, float("nan")])
def test_obf_gamma_outside_unit_interval(gamma: float) -> None:
    with pytest.raises(ValueError, match="^gamma: expected"):
        OBF(nn.Linear(2, 2).parameters(), "sgd", gamma=gamma, lr=0.1)


@pytest.mark.parametrize("C", [0.0, 0.5, 1.0])
def test_obf_C_in_unit_interval(C: float) -> None:
    with pytest.raises(ValueError, match=r"^C: expected C > 1 \(C = 1/lambda\) or C < 0"):
        OBF(nn.Linear(2, 2).parameters(), "sgd", C=C, lr=0.1)


@pytest.mark.parametrize("C", [None, 1.5, 10.0, -1.0])
def test_obf_valid_C(C: float | None) -> None:
    assert OBF(nn.Linear(2, 2).parameters(), "sgd", C=C, gamma=0.0, lr=0.1).C == C


def test_gsam_rho_min_above_rho() -> None:
    with pytest.raises(ValueError, match=r"^rho_min: expected a value <= rho \(0.05\), got 0.1"):
        GSAM(nn.Linear(2, 2).parameters(), "sgd", rho=0.05, rho_min=0.1, lr=0.1)
    with pytest.raises(ValueError, match="^rho_min: expected a value >= 0"):
        GSAM(nn.Linear(2, 2).parameters(), "sgd", rho=0.05, rho_min=-0.01, lr=0.1)
    with pytest.raises(ValueError, match="^alpha: expected a value >= 0"):
        GSAM(nn.Linear(2, 2).parameters(), "sgd", alpha=-0.1, lr=0.1)


def test_gsam_group_options_checked() -> None:
    """alpha and rho_min given per group are checked as the constructor's, and a bad group added
    later leaves the optimizer as it was."""
    weight, bias = nn.Linear(2, 2).parameters()
    with pytest.raises(ValueError, match=r"^param_groups\[0\].alpha: expected a value >= 0"):
        GSAM([{"params": [weight], "alpha": -0.1}], "sgd", lr=0.1)
    opt = GSAM([{"params": [weight]}], "sgd", rho=0.05, lr=0.1)
    with pytest.raises(ValueError, match=r"^param_groups\[1\].rho_min: expected a value <= rho \(0.02\), got 0.03"):
        opt.add_param_group({"params": [bias], "rho": 0.02, "rho_min": 0.03})
    assert len(opt.param_groups) == 1


def test_gsam_lr_range_checked_when_used() -> None:
    model, batch = model_and_batch()
    opt = GSAM(model.parameters(), "sgd", rho=0.05, rho_min=0.01, lr_min=0.1, lr_max=0.1, lr=0.1)
    first_backward(opt, model, batch)
    with pytest.raises(ValueError, match=r"^lr_max: expected a value > lr_min \(0.1\), got 0.1"):
        opt.first_step()
    assert not opt.is_perturbed


def test_build_optimizer_suggests_the_member() -> None:
    with pytest.raises(UnknownNameError, match=r"unknown optimizer 'samm'; did you mean 'sam'\? Allowed: .*sam"):
        build_optimizer("samm", nn.Linear(2, 2).parameters())


# --------------------------------------------------------------------------- misuse of the steps
@pytest.mark.parametrize("name", NAMES)
def test_step_without_closure_or_first_step(name: str) -> None:
    model, batch = model_and_batch()
    opt = OPTIMIZERS.get(name)(model.parameters(), "sgd", lr=0.1)
    first_backward(opt, model, batch)
    before = params(model)
    with pytest.raises(RuntimeError, match=r"step\(\) needs a closure .* first_step\(\)"):
        opt.step()
    assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before))


@pytest.mark.parametrize("name", NAMES)
def test_first_step_twice(name: str) -> None:
    model, batch = model_and_batch()
    opt = OPTIMIZERS.get(name)(model.parameters(), "sgd", lr=0.1)
    before = params(model)
    first_backward(opt, model, batch)
    opt.first_step()
    perturbed = params(model)
    with pytest.raises(RuntimeError, match=r"first_step\(\) called twice"):
        opt.first_step()
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), perturbed)), "the failed call moved w"
    opt.unperturb()
    assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before))


@pytest.mark.parametrize("name", NAMES)
def test_unperturb_and_second_step_need_first_step(name: str) -> None:
    model, batch = model_and_batch()
    opt = OPTIMIZERS.get(name)(model.parameters(), "sgd", lr=0.1)
    with pytest.raises(RuntimeError, match=r"unperturb\(\) without first_step\(\)"):
        opt.unperturb()
    with pytest.raises(RuntimeError, match=r"second_step\(\) without first_step\(\)"):
        opt.second_step()
    first_backward(opt, model, batch)
    opt.first_step(zero_grad=True)
    first_backward(opt, model, batch)
    opt.second_step()
    with pytest.raises(RuntimeError, match=r"second_step\(\) without first_step\(\)"):
        opt.second_step()  # the step is done: a second base step would reuse the gradients
    with pytest.raises(RuntimeError, match="needs a closure"):
        opt.step()


@pytest.mark.parametrize("name", NAMES)
def test_load_state_dict_while_perturbed(name: str) -> None:
    model, batch = model_and_batch()
    opt = OPTIMIZERS.get(name)(model.parameters(), "sgd", lr=0.1, momentum=0.9)
    state = opt.state_dict()
    first_backward(opt, model, batch)
    opt.first_step()
    with pytest.raises(RuntimeError, match=r"load_state_dict\(\) while the weights are perturbed"):
        opt.load_state_dict(state)
    opt.unperturb()
    opt.load_state_dict(state)


@pytest.mark.parametrize("name", NAMES)
def test_sparse_gradients_are_refused(name: str) -> None:
    emb = nn.Embedding(5, 3, sparse=True)
    opt = OPTIMIZERS.get(name)(emb.parameters(), "sgd", lr=0.1)
    emb(torch.tensor([1, 2])).sum().backward()
    with pytest.raises(RuntimeError, match="sparse gradients are not supported"):
        opt.first_step()
    assert not opt.is_perturbed


@pytest.mark.parametrize("zero_grad", [True, False])
@pytest.mark.parametrize("name", NAMES)
def test_first_step_without_any_gradient_warns_and_does_nothing(name: str, zero_grad: bool) -> None:
    model, _ = model_and_batch()
    opt = OPTIMIZERS.get(name)(model.parameters(), "sgd", lr=0.1)
    before = params(model)
    with pytest.warns(UserWarning, match="no perturbed parameter has a gradient"):
        opt.first_step(zero_grad=zero_grad)
    assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before))
    opt.unperturb()
    opt.step()
    assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before))


# --------------------------------------------------------------------------- the driver and chunk
@pytest.mark.parametrize("name", NAMES)
def test_sam_backward_misuse(name: str) -> None:
    model, batch = model_and_batch()
    opt = OPTIMIZERS.get(name)(model.parameters(), "sgd", lr=0.1)
    loss = lambda b: F.cross_entropy(model(b[0]), b[1])
    with pytest.raises(ValueError, match="micro_batches: expected at least one micro-batch"):
        sam_backward(opt, [], loss)
    first_backward(opt, model, batch)
    opt.first_step()
    with pytest.raises(RuntimeError, match="already perturbed"):
        sam_backward(opt, [batch], loss)
    opt.unperturb()


def test_chunk_errors() -> None:
    for size in (0, -2):
        with pytest.raises(ValueError, match=f"size: expected a micro-batch size > 0, got {size}"):
            chunk(torch.ones(4), size)
    with pytest.raises(TypeError, match="cannot split a str"):
        chunk("abc", 2)
    with pytest.raises(TypeError, match="cannot split a int"):
        chunk((torch.ones(4), 3), 2)


def test_errors_name_the_value() -> None:
    with pytest.raises(ValueError) as info:
        OPTIMIZERS.get("sam")(nn.Linear(2, 2).parameters(), "sgd", rho=-0.5, lr=0.1)
    assert "-0.5" in str(info.value)
    with pytest.raises(ValueError) as info:
        OPTIMIZERS.get("sam")(nn.Linear(2, 2).parameters(), "sgd", rho=math.nan, lr=0.1)
    assert "nan" in str(info.value)
