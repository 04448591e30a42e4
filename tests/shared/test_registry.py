"""The registries: `shared.registry.Registry`, the SAM-family `OPTIMIZERS`, `BASE_OPTIMIZERS` and
`build_optimizer`; every member builds over every base optimizer and passes its options on."""

from __future__ import annotations

import functools
import inspect
import math
import sys
import types

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from shared import BASE_OPTIMIZERS, OPTIMIZERS, SAM, Batch, Member, SharpnessAware, build_optimizer, member_backward
from shared.registry import Registry, UnknownNameError
from shared.sam import TRAM, resolve_base_optimizer

NAMES = OPTIMIZERS.names()
BASE_NAMES = BASE_OPTIMIZERS.names()


# --------------------------------------------------------------------------- Registry itself
def test_register_and_get_case_insensitively() -> None:
    reg: Registry[int] = Registry("widget")
    reg.register("Alpha", "a")(1)
    assert reg.get("ALPHA") == 1 and reg.get("a") == 1
    assert reg.names() == ["a", "alpha"]
    assert list(reg) == ["a", "alpha"]
    assert "alpha" in reg and "Alpha" in reg and "beta" not in reg
    assert 1 not in reg and None not in reg


def test_register_returns_the_object_for_use_as_decorator() -> None:
    reg: Registry[type] = Registry("widget")

    @reg.register("thing")
    class Thing:
        pass

    assert reg.get("thing") is Thing


def test_register_twice_is_an_error() -> None:
    reg: Registry[int] = Registry("widget")
    reg.register("x")(1)
    with pytest.raises(ValueError, match="widget 'x' is registered twice"):
        reg.register("X")(2)
    assert reg.get("x") == 1


def test_register_needs_a_name() -> None:
    with pytest.raises(ValueError, match="at least one name"):
        Registry("widget").register()


def test_unknown_name_suggests_and_lists() -> None:
    reg: Registry[int] = Registry("widget")
    for i, name in enumerate(["sprocket", "gear", "cog"]):
        reg.register(name)(i)
    with pytest.raises(UnknownNameError) as info:
        reg.get("sprockett", field="model.widget")
    message = str(info.value)
    assert message.startswith("model.widget: unknown widget 'sprockett'")
    assert "did you mean 'sprocket'?" in message
    assert "Allowed: cog, gear, sprocket" in message
    assert isinstance(info.value, ValueError)
    with pytest.raises(UnknownNameError) as info:
        reg.get("zzzzzz")
    assert "did you mean" not in str(info.value) and str(info.value).startswith("widget: unknown widget")


def test_lazy_target_is_imported_on_first_use(monkeypatch: pytest.MonkeyPatch) -> None:
    module = types.ModuleType("_samsuite_lazy_test_module")
    module.VALUE = object()  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, module.__name__, module)
    reg: Registry[object] = Registry("widget")
    reg.register("lazy", target=f"{module.__name__}:VALUE")
    assert "lazy" in reg
    assert reg.get("lazy") is module.VALUE
    monkeypatch.delitem(sys.modules, module.__name__)
    assert reg.get("lazy") is module.VALUE  # cached: no second import


def test_lazy_target_unimportable_fails_on_use_only() -> None:
    reg: Registry[object] = Registry("widget")
    reg.register("ghost", target="_samsuite_no_such_module:X")
    assert reg.names() == ["ghost"]
    with pytest.raises(ModuleNotFoundError):
        reg.get("ghost")


# --------------------------------------------------------------------------- the optimizer registries
def test_members_are_registered() -> None:
    assert {"sam", "asam", "gsam", "obf"} <= set(NAMES)
    assert {"sgd", "adam", "adamw"} <= set(BASE_NAMES)
    assert not set(NAMES) & set(BASE_NAMES), "a name must not mean both a member and a base optimizer"


@pytest.mark.parametrize("name", NAMES)
def test_member_follows_the_protocol(name: str) -> None:
    cls = OPTIMIZERS.get(name)
    assert issubclass(cls, Member) and issubclass(cls, torch.optim.Optimizer)
    parameters = inspect.signature(cls.__init__).parameters
    assert list(parameters)[1:3] == ["params", "base_optimizer"]
    assert parameters["base_optimizer"].default == "sgd"
    assert any(p.kind is p.VAR_KEYWORD for p in parameters.values())
    # a fixed-radius perturbing member takes rho; TRAM's radius is measured, SAF and MESA do not perturb
    assert ("rho" in parameters) == (issubclass(cls, SharpnessAware) and not issubclass(cls, TRAM))
    assert cls.ascent_loss is None or callable(cls.ascent_loss)


@pytest.mark.parametrize("name", NAMES)
def test_build_optimizer_by_member_name(name: str) -> None:
    model = nn.Linear(3, 2)
    opt = build_optimizer(name.upper(), model.parameters(), "sgd", lr=0.1, momentum=0.9)
    assert type(opt) is OPTIMIZERS.get(name)
    assert isinstance(opt.base_optimizer, torch.optim.SGD)
    assert opt.param_groups[0]["lr"] == 0.1 and opt.param_groups[0]["momentum"] == 0.9
    assert opt.param_groups is opt.base_optimizer.param_groups
    assert type(opt).__name__ in repr(opt) and "SGD" in repr(opt)


@pytest.mark.parametrize("base", BASE_NAMES)
def test_build_optimizer_by_base_name_gives_the_plain_optimizer(base: str) -> None:
    model = nn.Linear(3, 2)
    opt = build_optimizer(base, model.parameters(), lr=0.01)
    assert type(opt) is BASE_OPTIMIZERS.get(base)
    assert not isinstance(opt, SharpnessAware)


def test_build_optimizer_unknown_name_suggests_and_lists() -> None:
    with pytest.raises(UnknownNameError) as info:
        build_optimizer("samm", nn.Linear(2, 2).parameters())
    message = str(info.value)
    assert "'samm'" in message and "did you mean 'sam'?" in message
    for name in NAMES + BASE_NAMES:
        assert name in message
    with pytest.raises(UnknownNameError, match="did you mean 'adamw'"):
        build_optimizer("adamww", nn.Linear(2, 2).parameters())


def test_resolve_base_optimizer() -> None:
    assert resolve_base_optimizer("AdamW") is torch.optim.AdamW
    assert resolve_base_optimizer(torch.optim.SGD) is torch.optim.SGD
    factory = functools.partial(torch.optim.SGD, momentum=0.5)
    assert resolve_base_optimizer(factory) is factory


def own_options(cls: type) -> set[str]:
    """Keyword names the member (or SharpnessAware) takes for itself."""
    names: set[str] = set()
    for klass in cls.__mro__:
        if isinstance(klass, type) and issubclass(klass, SharpnessAware):
            names |= set(inspect.signature(klass.__init__).parameters)
    return names


def numeric_options(base_cls: type) -> list[str]:
    return [
        key
        for key, p in inspect.signature(base_cls.__init__).parameters.items()
        if isinstance(p.default, (int, float)) and not isinstance(p.default, bool)
    ]


@pytest.mark.parametrize("base", BASE_NAMES)
@pytest.mark.parametrize("name", NAMES)
def test_every_member_runs_over_every_base(name: str, base: str) -> None:
    """Every member builds over every base optimizer, whose numeric options (eps, weight_decay,
    momentum...) reach the base optimizer unless the member takes that name for itself; then one
    driver step moves every weight and leaves them finite."""
    cls = OPTIMIZERS.get(name)
    base_cls = BASE_OPTIMIZERS.get(base)
    passed = {key: 0.0123 for key in numeric_options(base_cls) if key not in own_options(cls)}
    assert "eps" in passed or "eps" not in numeric_options(base_cls), "`eps` must be the base optimizer's"
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3))
    opt = cls(model.parameters(), base, **passed)
    assert isinstance(opt.base_optimizer, base_cls)
    for key, value in passed.items():
        assert opt.base_optimizer.defaults[key] == value, key
        assert opt.param_groups[0][key] == value, key
    before = [p.detach().clone() for p in model.parameters()]
    x, y = torch.randn(6, 4), torch.randint(0, 3, (6,))
    stats = member_backward(opt, model, [Batch(x, y, torch.arange(6))])
    assert math.isfinite(stats.loss.item())
    assert stats.perturbed_loss is None or math.isfinite(stats.perturbed_loss.item())
    opt.step()
    for p, b in zip(model.parameters(), before):
        assert torch.isfinite(p).all() and not torch.equal(p, b)


@pytest.mark.parametrize("name", NAMES)
def test_base_options_shadowed_by_a_member_go_through_a_factory(name: str) -> None:
    """A base option whose name the member uses (GSAM's alpha vs RMSprop's alpha) is passed with a
    factory; here every numeric RMSprop option is given that way."""
    cls = OPTIMIZERS.get(name)
    options = {key: 0.0123 for key in numeric_options(torch.optim.RMSprop)}
    opt = cls(nn.Linear(2, 2).parameters(), functools.partial(torch.optim.RMSprop, **options))
    for key, value in options.items():
        assert opt.base_optimizer.defaults[key] == value


def test_sam_with_a_class_or_a_name_is_the_same() -> None:
    torch.manual_seed(0)
    a, b = nn.Linear(3, 2), nn.Linear(3, 2)
    b.load_state_dict(a.state_dict())
    x, y = torch.randn(5, 3), torch.randint(0, 2, (5,))
    for model, base in ((a, torch.optim.Adam), (b, "adam")):
        opt = SAM(model.parameters(), base, lr=0.01)
        F.cross_entropy(model(x), y).backward()
        opt.step(lambda m=model: F.cross_entropy(m(x), y).backward())
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))
