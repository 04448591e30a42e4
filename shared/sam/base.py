"""The protocol every SAM-family member follows (the davda54/sam and pytorch_optimizer API).

    opt = SAM(model.parameters(), torch.optim.SGD, rho=0.05, lr=0.1, momentum=0.9)
    loss_fn(model(x), y).backward()       # first pass, at w
    opt.step(closure)                     # perturb, closure() at w+e, restore w, base step
or, by hand (and with torch.amp.GradScaler):
    scaler.scale(loss_fn(model(x), y)).backward(); opt.first_step(zero_grad=True)
    scaler.scale(loss_fn(model(x), y)).backward(); opt.unperturb(); scaler.step(opt); scaler.update()

Design choices, each because the usual code gets it wrong:
- The weights are restored bit for bit (w + e - e is not w in floating point), and a non-finite
  first-pass gradient (fp16 overflow) cannot corrupt them.
- No copy of the weights when the first-pass gradients are dropped afterwards (`zero_grad=True`,
  what `step(closure)` and `sam_backward` do): e and then w + e are computed inside the gradient
  tensors, which become the parameters' data for the second pass while the untouched w waits in the
  parameters' own tensors; restoring swaps them back. SAM then holds no tensor the size of the
  weights beyond what plain training holds (`samsuite bench unlearn`: NPO+SAM peaks at NPO's peak). Otherwise
  (the gradients are kept, ASAM's |w| + eta needs a buffer, or a gradient is a view into a shared
  buffer as DDP's bucket views are) the weights are copied to a backup allocated once.
  No tensor the size of a parameter is allocated after the first step.
- e = rho * g / ||g|| does not change when g is multiplied by a loss scale, so `first_step` runs
  on GradScaler-scaled gradients and only the base step unscales (no "unscale twice").
- The base optimizer shares `param_groups`, so LR schedulers attached to this optimizer drive it,
  and `state_dict()` is the base optimizer's (momentum, Adam moments) plus our group options.
"""

from __future__ import annotations

import inspect
import warnings
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import Tensor
from torch.optim import Optimizer

from shared.registry import Registry
from shared.sam.member import Member, split_member_state, with_member_state
from shared.sam.shards import any_sharded, local, locals_, reduce_sum, sum_of_squares
from shared.validate import check_nonnegative, check_positive

BASE_OPTIMIZERS: Registry[type[Optimizer]] = Registry("base optimizer")
for _name, _cls in {
    "sgd": torch.optim.SGD,
    "adam": torch.optim.Adam,
    "adamw": torch.optim.AdamW,
    "rmsprop": torch.optim.RMSprop,
    "adagrad": torch.optim.Adagrad,
    "nadam": torch.optim.NAdam,
    "radam": torch.optim.RAdam,
}.items():
    BASE_OPTIMIZERS.register(_name)(_cls)

BaseOptimizerSpec = str | type[Optimizer] | Callable[..., Optimizer]


def resolve_base_optimizer(base: BaseOptimizerSpec) -> Callable[..., Optimizer]:
    """A base optimizer class from a name ("sgd", "adamw", ...), a class or a factory."""
    if isinstance(base, str):
        return BASE_OPTIMIZERS.get(base, field="base_optimizer")
    if isinstance(base, Optimizer):
        raise TypeError(
            "base_optimizer: pass the optimizer class (e.g. torch.optim.SGD) and its keyword "
            "arguments, not an instance: SAM builds it over its own parameter groups"
        )
    if not callable(base):
        raise TypeError(f"base_optimizer: expected a name, class or factory, got {base!r}")
    return base


@dataclass
class _Plan:
    """The parameters perturbed by the current step, grouped as the foreach ops want them."""

    groups: list[dict[str, Any]] = field(default_factory=list)
    params: list[list[Tensor]] = field(default_factory=list)
    buffers: dict[str, list[list[Tensor]]] = field(default_factory=dict)  # other per-parameter state, by name

    def flat(self, lists: list[list[Tensor]]) -> list[Tensor]:
        return [t for sub in lists for t in sub]


def _check_options(member: type, base: Callable[..., Optimizer], base_kwargs: dict[str, Any]) -> None:
    """An option that neither the member nor its base optimizer takes is a ValueError naming it
    and every allowed option (the base optimizer would raise a bare TypeError)."""
    try:
        accepted = set(inspect.signature(base).parameters)
    except (TypeError, ValueError):  # a builtin without a signature: let the base optimizer judge
        return
    if any(p.kind is p.VAR_KEYWORD for p in inspect.signature(base).parameters.values()):
        return
    unknown = sorted(set(base_kwargs) - accepted)
    if unknown:
        named = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
        own = {name for cls in member.__mro__ if "__init__" in vars(cls) and cls.__module__.startswith("shared.")
               for name, p in inspect.signature(cls.__init__).parameters.items() if p.kind in named}
        allowed = sorted((own | accepted) - {"self", "params", "base_optimizer"})
        raise ValueError(f"{unknown[0]}: unknown option of {member.__name__} over "
                         f"{getattr(base, '__name__', base)}. Allowed: {', '.join(allowed)}")


def wrap_base(opt: Optimizer, base_optimizer: BaseOptimizerSpec, base_kwargs: dict[str, Any]) -> Optimizer:
    """Build the base optimizer over `opt`'s parameter groups and share them, so that LR schedulers
    attached to `opt` drive it; an option neither takes is a ValueError naming it."""
    base_cls = resolve_base_optimizer(base_optimizer)
    _check_options(type(opt), base_cls, base_kwargs)
    base = base_cls(opt.param_groups, **base_kwargs)
    opt.param_groups = base.param_groups
    opt.defaults.update(base.defaults)
    return base


class SharpnessAware(Member, Optimizer):
    """Base of every perturbing member: perturb w by e (a hook), evaluate the gradient there,
    restore w, let the base optimizer step. Group options: `rho` (> 0), `perturb` (False excludes
    the group, e.g. norms and biases), `adaptive` and `eta` (ASAM's T_w = |w| + eta). The hooks of
    `shared.sam.member.Member` let a member read the model and the first pass (OBF, TRAM).

    `replicas=R`: every parameter holds R independent models stacked along its first dimension
    (fedsam's batched engine trains R nodes at once), so every norm and inner product is taken per
    row: replica r gets e_r = rho g_r / ||g_r||, exactly what it would get alone. The base step is
    element-wise and needs nothing. Members whose hooks see one model say `batchable = False`."""

    batchable: ClassVar[bool] = True

    #: Whether the member works on sharded (DTensor) parameters: its element-wise work runs on the
    #: local shards and its norms and inner products are all-reduced (`shared.sam.shards`).
    #: Members with other whole-model work (a model copy, per-example state) say False.
    shardable: ClassVar[bool] = True

    #: Whether e is unchanged when the gradients are multiplied by a loss scale (GradScaler): so for
    #: e = rho g / ||g||. A member whose e is not (SAGM's alpha g) reads `loss_scale`, which
    #: `sam_backward` sets from its scaler; the manual API sets it by hand before `first_step`.
    scale_invariant: ClassVar[bool] = True

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict[str, Any]],
        base_optimizer: BaseOptimizerSpec = "sgd",
        rho: float = 0.05,
        adaptive: bool = False,
        eta: float = 0.01,
        perturb_eps: float = 1e-12,
        replicas: int | None = None,
        **base_kwargs: Any,
    ) -> None:
        check_positive("rho", rho)
        if replicas is not None:
            if isinstance(replicas, bool) or not isinstance(replicas, int) or replicas < 1:
                raise ValueError(f"replicas: expected an integer >= 1 (or None), got {replicas!r}")
            if not type(self).batchable:
                raise ValueError(f"replicas: {type(self).__name__} cannot treat stacked replicas independently "
                                 "(its state or hooks see one model); train the replicas one at a time")
        self.replicas = replicas
        check_nonnegative("eta", eta)
        check_positive("perturb_eps", perturb_eps)
        self.eps = perturb_eps  # named as in pytorch_optimizer: `eps` is the base optimizer's (Adam...)
        self.loss_scale = 1.0  # the factor on the gradients that first_step sees (GradScaler's scale)
        self._member_defaults = {"rho": rho, "adaptive": adaptive, "eta": eta, "perturb": True}
        super().__init__(params, dict(self._member_defaults))
        self._check_shardable([p for group in self.param_groups for p in group["params"]])
        self.base_optimizer = wrap_base(self, base_optimizer, base_kwargs)
        self._plan: _Plan | None = None  # set while the weights are perturbed
        self._unperturbed: list[Tensor] | None = None  # w's own tensors while w + e lives in the gradients' ones
        self._restored = False  # True between unperturb() and the base step
        self._grad_marks: dict[int, tuple[Tensor, int]] = {}  # id(p) -> (p.grad, its version) when last seen
        self._plan_cache: tuple[tuple[Any, ...], _Plan] | None = None  # the last plan, by its grad pattern

    # ----------------------------------------------------------------- groups and state
    def add_param_group(self, param_group: dict[str, Any]) -> None:
        # checked before it is added, so that a bad group leaves the optimizer as it was
        self._check_group({**self._member_defaults, **param_group}, len(self.param_groups))
        if not hasattr(self, "base_optimizer"):  # called by Optimizer.__init__
            super().add_param_group(param_group)
        else:
            for key, value in self._member_defaults.items():
                param_group.setdefault(key, value)
            self.base_optimizer.add_param_group(param_group)

    def _check_shardable(self, params: list[Tensor]) -> None:
        if not type(self).shardable and any_sharded(params):
            raise ValueError(f"{type(self).__name__} does not support sharded (DTensor, e.g. FSDP2) parameters; "
                             "the members that do: sam, asam, gsam, sagm (and the plain base optimizers)")

    def _check_group(self, group: dict[str, Any], index: int) -> None:
        check_positive(f"param_groups[{index}].rho", group["rho"])
        check_nonnegative(f"param_groups[{index}].eta", group["eta"])

    def state_dict(self) -> dict[str, Any]:
        """The base optimizer's state and the shared groups (which carry rho and the other options),
        plus the member's own state (TRAM's target model) under "member"."""
        return with_member_state(self, self.base_optimizer.state_dict())

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if self._plan is not None:
            raise RuntimeError("load_state_dict() while the weights are perturbed: call unperturb() first")
        self.base_optimizer.load_state_dict(split_member_state(self, state_dict))
        self.param_groups = self.base_optimizer.param_groups  # the base built new group dicts

    # ----------------------------------------------------------------- hooks for members
    def _rho(self, group: dict[str, Any]) -> float:
        """The radius for this group now (GSAM schedules it with the learning rate)."""
        return group["rho"]

    def _before_perturb(self, plan: _Plan, grads: list[list[Tensor]]) -> None:
        """Called with the first-pass gradients before they become e (GSAM keeps a copy)."""

    def _descent_grads_(self, plan: _Plan) -> None:
        """Turns the gradients at w+e into the descent direction, in place (GSAM)."""

    def _keep_first_grads(self, plan: _Plan, grads: list[list[Tensor]]) -> list[list[Tensor]]:
        """A copy of the first-pass gradients g in buffers allocated once, for members whose descent
        uses g beside g_p (GSAM, SAGM)."""
        kept = self._plan_buffers(plan, "g0")
        torch._foreach_copy_(plan.flat(kept), plan.flat(grads))
        return kept

    # ----------------------------------------------------------------- the two steps
    def _make_plan(self) -> _Plan:
        """The plan for the parameters that have gradients now. Rebuilt only when that set (or the
        groups) changed: walking the state of every parameter each step costs more than the
        foreach ops themselves on models with many small tensors."""
        key = tuple((id(g), g["perturb"], tuple(p.grad is not None for p in g["params"])) for g in self.param_groups)
        if self._plan_cache is None or self._plan_cache[0] != key:
            self._plan_cache = (key, self._build_plan())
        return self._plan_cache[1]

    def _build_plan(self) -> _Plan:
        plan = _Plan()
        for group in self.param_groups:
            if not group["perturb"]:
                continue
            params = [p for p in group["params"] if p.grad is not None]
            if not params:
                continue
            if any(p.grad.is_sparse for p in params):
                raise RuntimeError("sparse gradients are not supported by SAM-family optimizers")
            if self.replicas is not None and any(p.dim() == 0 or p.shape[0] != self.replicas for p in params):
                shapes = sorted({tuple(p.shape) for p in params})
                raise ValueError(f"replicas: expected every perturbed parameter to stack {self.replicas} replicas "
                                 f"along its first dimension, got shapes {shapes[:4]}")
            self._check_shardable(params)  # (a group added after construction)
            plan.groups.append(group)
            plan.params.append(params)
        return plan

    @torch.no_grad()
    def first_step(self, zero_grad: bool = False) -> None:
        """w <- w + e from the gradients now in `.grad` (scaled by a GradScaler or not)."""
        if self._plan is not None:
            raise RuntimeError("first_step() called twice: call second_step() or unperturb() in between")
        plan = self._make_plan()
        if not plan.groups:
            warnings.warn("first_step(): no perturbed parameter has a gradient; nothing is perturbed", stacklevel=2)
        else:  # (foreach ops reject empty lists)
            if zero_grad:  # compute e inside the gradients, which are zeroed afterwards anyway
                work = [[local(p.grad) for p in params] for params in plan.params]
            else:
                work = self._plan_buffers(plan, "e")
                torch._foreach_copy_(plan.flat(work), [local(p.grad) for p in plan.flat(plan.params)])
            self._before_perturb(plan, work)
            self._perturbation_(plan, work)
            flat_params, flat_work = plan.flat(plan.params), plan.flat(work)
            if zero_grad and self._swappable(plan):
                torch._foreach_add_(flat_work, flat_params)  # the gradients now hold w + e ...
                self._unperturbed = [p.data for p in flat_params]
                for p, perturbed in zip(flat_params, flat_work):  # ... and become the weights
                    p.data = perturbed
            else:  # (sharded parameters always: FSDP2 gathers from the shards' own storage)
                torch._foreach_copy_(plan.flat(self._plan_buffers(plan, "backup")), locals_(flat_params))
                torch._foreach_add_(locals_(flat_params), flat_work)
        if zero_grad:  # to None: the second backward then writes fresh gradients instead of adding to zeros
            self.zero_grad()
        self._plan = plan
        self._restored = False

    def _perturbation_(self, plan: _Plan, work: list[list[Tensor]]) -> None:
        """work <- e = rho * T^2 g / ||T g|| (T = 1, or |w| + eta for adaptive groups), in place."""
        adaptive = [g["adaptive"] for g in plan.groups]
        temps = self._plan_buffers(plan, "backup") if any(adaptive) else [[] for _ in plan.groups]
        for is_adaptive, params, t, g, group in zip(adaptive, plan.params, temps, work, plan.groups):
            if is_adaptive:  # the backup buffer holds T until the weights are backed up
                torch._foreach_copy_(t, locals_(params))
                torch._foreach_abs_(t)
                torch._foreach_add_(t, group["eta"])
                torch._foreach_mul_(g, t)
        scale = self.eps + global_norm(plan.flat(work), self.replicas, like=plan.flat(plan.params))
        for is_adaptive, t, g, group in zip(adaptive, temps, work, plan.groups):
            if is_adaptive:
                torch._foreach_mul_(g, t)
            mul_rows_(g, self._rho(group) / scale)

    @torch.no_grad()
    def unperturb(self) -> None:
        """Turn the gradients at w+e into the descent direction and restore w exactly.
        Under GradScaler, call it before `scaler.step(opt)`, i.e. before gradients are unscaled."""
        if self._plan is None:
            raise RuntimeError("unperturb() without first_step(): the weights are not perturbed")
        if self._plan.groups:  # foreach ops reject empty lists
            self._descent_grads_(self._plan)
            params = self._plan.flat(self._plan.params)
            if self._unperturbed is not None:
                for p, w in zip(params, self._unperturbed):
                    p.data = w
                self._unperturbed = None
            else:
                torch._foreach_copy_(locals_(params), self._plan.flat(self._plan_buffers(self._plan, "backup")))
        self._plan = None
        self._restored = True

    @torch.no_grad()
    def second_step(self, zero_grad: bool = False) -> None:
        """Restore w (if still perturbed) and take the base optimizer's step with the gradients at w+e."""
        if self._plan is None and not self._restored:
            raise RuntimeError("second_step() without first_step(): there is no perturbed gradient to step with")
        self.step()  # through step(), so that LR schedulers and step hooks see this step
        if zero_grad:
            self.zero_grad()

    def _base_step(self) -> None:
        if self._plan is not None:
            self.unperturb()
        self.base_optimizer.step()
        self._restored = False

    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """With a closure (zero_grad + forward + backward): one whole SAM step. If no perturbed
        parameter has a fresh gradient, the closure first computes it (torch/Lightning
        convention); otherwise the caller's first backward is used (davda54/sam convention).
        Without a closure: finish a step started with first_step() (this is what
        `scaler.step(opt)` calls)."""
        if closure is None:
            if self._plan is None and not self._restored:
                raise RuntimeError(
                    f"{type(self).__name__}.step() needs a closure (zero_grad + forward + backward) to "
                    "evaluate the loss at the perturbed weights; or call first_step(), backward, "
                    "second_step(); or use shared.sam_backward(...) and then step()."
                )
            self._base_step()
            return None
        closure = torch.enable_grad()(closure)
        loss = None
        if not self._has_fresh_grads():
            loss = closure()
        self.first_step(zero_grad=True)
        perturbed_loss = closure()
        self._base_step()
        self._mark_grads()
        return perturbed_loss if loss is None else loss

    def zero_grad(self, set_to_none: bool = True) -> None:
        super().zero_grad(set_to_none)
        # zeroed gradients are not fresh: step(closure) must then run the closure first
        if set_to_none:
            self._grad_marks = {}  # no gradient left to mark (None gradients are never fresh)
        else:
            self._mark_grads()

    # ----------------------------------------------------------------- helpers
    @staticmethod
    def _swappable(plan: _Plan) -> bool:
        """Whether w + e can be built in the gradient tensors and swapped in as the weights: no
        adaptive group (ASAM's T needs the backup buffer) and every gradient and weight a plain
        tensor owning its whole storage, laid out as its parameter (not a view into a flat
        buffer: DDP's gradient buckets, FSDP's flat parameters, cuDNN's flattened RNN weights)."""
        if any(group["adaptive"] for group in plan.groups):
            return False
        return all(_owns_storage(p.data) and _owns_storage(p.grad) and p.grad.stride() == p.stride()
                   for p in plan.flat(plan.params))

    def _perturbable(self) -> Iterable[Tensor]:
        return (p for group in self.param_groups if group["perturb"] for p in group["params"])

    def _mark_grads(self) -> None:
        self._grad_marks = {id(p): (p.grad, p.grad._version) for p in self._perturbable() if p.grad is not None}

    def _has_fresh_grads(self) -> bool:
        """Whether a backward has reached a perturbed parameter since our last closure step or
        zero_grad() (a gradient that is new, or changed in place); None gradients are not fresh."""
        for p in self._perturbable():
            if p.grad is not None:
                grad, version = self._grad_marks.get(id(p), (None, -1))
                if p.grad is not grad or p.grad._version != version:
                    return True
        return False

    def _buffers(self, params: list[Tensor], key: str) -> list[Tensor]:
        """Per-parameter buffers named `key` (of a sharded parameter: of its local shard),
        allocated on first use and reused after."""
        out = []
        for p in params:
            state = self.state[p]
            if key not in state:
                state[key] = torch.zeros_like(local(p), memory_format=torch.preserve_format)
            out.append(state[key])
        return out

    def _plan_buffers(self, plan: _Plan, key: str) -> list[list[Tensor]]:
        """`_buffers` for every group of the plan, looked up once per plan."""
        if key not in plan.buffers:
            plan.buffers[key] = [self._buffers(params, key) for params in plan.params]
        return plan.buffers[key]

    def grads_with_buffers(self, key: str) -> tuple[list[Tensor], list[Tensor]]:
        """All gradients (every group) with a same-shaped buffer each: m-sharpness accumulates here."""
        params = [p for group in self.param_groups for p in group["params"] if p.grad is not None]
        return [local(p.grad) for p in params], self._buffers(params, key)

    @property
    def is_perturbed(self) -> bool:
        return self._plan is not None

    def __repr__(self) -> str:
        return f"{type(self).__name__}(base={self.base_optimizer!r})"


def _owns_storage(t: Tensor) -> bool:
    return type(t) is Tensor and t.untyped_storage().nbytes() == t.numel() * t.element_size()


def global_norm(tensors: list[Tensor], replicas: int | None = None, like: list[Tensor] | None = None) -> Tensor:
    """||concat(tensors)||_2 in float32 or wider, whatever the tensors' dtypes; with `replicas`, the
    norm of each replica's row (shape (replicas,)) over tensors that stack them along dim 0.
    `like`: the parameters the (local) tensors belong to; where they are sharded, the norm is
    that of the whole tensors, all-reduced over the shards (`shared.sam.shards`)."""
    if not tensors:
        return torch.zeros(() if replicas is None else (replicas,))
    dtype = torch.promote_types(tensors[0].dtype, torch.float32)
    if like is not None and any_sharded(like):
        _no_replicas_of_shards(replicas)
        return reduce_sum(like, lambda index: sum_of_squares([tensors[i] for i in index], dtype)).sqrt()
    if replicas is not None:
        rows = [torch.linalg.vector_norm(t.reshape(replicas, -1), dim=1, dtype=dtype) for t in tensors]
        return torch.linalg.vector_norm(torch.stack(rows), dim=0)
    return torch.linalg.vector_norm(torch.stack(torch._foreach_norm(tensors, 2, dtype=dtype)))


def global_dot(a: list[Tensor], b: list[Tensor], replicas: int | None = None, like: list[Tensor] | None = None
               ) -> Tensor:
    """<concat(a), concat(b)> without concatenating (one small tensor per pair); with `replicas`,
    one inner product per replica's row (shape (replicas,)); `like` as for `global_norm`."""
    dtype = torch.promote_types(a[0].dtype, torch.float32)
    if like is not None and any_sharded(like):
        _no_replicas_of_shards(replicas)
        return reduce_sum(like, lambda index: torch.stack(
            [torch.vdot(a[i].reshape(-1), b[i].reshape(-1)).to(dtype) for i in index]).sum())
    if replicas is not None:
        rows = [torch.linalg.vecdot(x.reshape(replicas, -1), y.reshape(replicas, -1)).to(dtype) for x, y in zip(a, b)]
        return torch.stack(rows).sum(0)
    return torch.stack([torch.vdot(x.reshape(-1), y.reshape(-1)).to(dtype) for x, y in zip(a, b)]).sum()


def mul_rows_(tensors: list[Tensor], factor: Tensor | float) -> None:
    """tensors *= factor, in place: a number or 0-d tensor, or one value per replica (shape (R,))
    applied to each tensor's rows along dim 0 (the per-replica scale of `global_norm(..., R)`)."""
    if isinstance(factor, Tensor) and factor.dim() == 1:
        torch._foreach_mul_(tensors, [factor.view(-1, *(1,) * (t.dim() - 1)) for t in tensors])
    else:
        torch._foreach_mul_(tensors, factor)


def _no_replicas_of_shards(replicas: int | None) -> None:
    if replicas is not None:
        raise ValueError("replicas: stacked replicas of sharded (DTensor) parameters are not supported")
