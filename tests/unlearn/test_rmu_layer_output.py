"""RMU's activations are the output of the chosen decoder layer itself, captured by a forward hook:
at the last layer that is not `hidden_states[-1]` (Hugging Face puts the final norm's output there),
at inner layers it is `hidden_states[layer + 1]` as before. The forward stops at the hooked layer,
and the gradients equal those of a full forward, with and without gradient checkpointing."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from train_fixtures import FORGET, RETAIN, tiny_llama, tiny_tokenizer

from unlearn.data import collate, tokenize_texts
from unlearn.objectives import OBJECTIVES, ObjectiveContext, SetupData
from unlearn.objectives.rmu import CONTROL_KEY, hidden_states, masked_mse
from unlearn.train import UnlearnConfig

LAYERS = 3
ROWS = [4, 0, 5, 1]  # mixed lengths: right padding inside the batch


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


@pytest.fixture(scope="module")
def forget(tok):
    return tokenize_texts(tok, FORGET, 64)


def model_of(tok, seed: int = 0) -> nn.Module:
    return tiny_llama(tok, seed=seed, layers=LAYERS).eval()


def unnormed_last_layer(model: nn.Module, batch) -> torch.Tensor:
    """The last decoder layer's own output, by hand: the decoder run with its final norm taken out."""
    decoder = model.get_decoder()
    norm, decoder.norm = decoder.norm, nn.Identity()
    try:
        return decoder(input_ids=batch.input_ids, attention_mask=batch.attention_mask).last_hidden_state
    finally:
        decoder.norm = norm


def test_last_layer_is_the_layer_output_not_the_final_norm(tok, forget) -> None:
    model, batch = model_of(tok), collate(forget, ROWS)
    with torch.no_grad():
        out = model.get_decoder()(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                                  output_hidden_states=True)
        for layer in range(LAYERS - 1):  # inner layers: as before
            torch.testing.assert_close(hidden_states(model, batch, layer), out.hidden_states[layer + 1],
                                       rtol=0, atol=1e-12)
        last = hidden_states(model, batch, LAYERS - 1)
        torch.testing.assert_close(last, unnormed_last_layer(model, batch), rtol=0, atol=1e-12)
        normed = out.hidden_states[LAYERS]
        torch.testing.assert_close(model.get_decoder().norm(last), normed, rtol=0, atol=1e-12)
        # what the old code steered: the norm's output, on another scale altogether
        mask = batch.attention_mask.bool()
        assert (last - normed)[mask].abs().max() > 0.5
        assert last[mask].norm(dim=-1).mean() < 0.5 * normed[mask].norm(dim=-1).mean()


def test_the_forward_stops_at_the_hooked_layer(tok, forget) -> None:
    model, batch = model_of(tok), collate(forget, ROWS)
    calls = [0] * LAYERS
    handles = [layer.register_forward_hook(lambda *_, i=i: calls.__setitem__(i, calls[i] + 1))
               for i, layer in enumerate(model.get_decoder().layers)]
    try:
        with torch.no_grad():
            hidden_states(model, batch, 0)
        assert calls == [1, 0, 0]
        with torch.no_grad():
            hidden_states(model, batch, LAYERS - 1)
        assert calls == [2, 1, 1]
    finally:
        for handle in handles:
            handle.remove()
    assert all(not layer._forward_hooks for layer in model.get_decoder().layers)  # no hook left behind


def test_a_layer_that_returns_a_tuple(tok, forget) -> None:
    """transformers 4.x decoder layers return (hidden_states, ...); 5.x a tensor: both are read."""
    model, batch = model_of(tok), collate(forget, ROWS)
    with torch.no_grad():
        expected = hidden_states(model, batch, 1)
        layer = model.get_decoder().layers[1]
        forward = layer.forward
        layer.forward = lambda *args, **kwargs: (forward(*args, **kwargs), None)
        try:
            got = hidden_states(model, batch, 1)
        finally:
            del layer.forward
    torch.testing.assert_close(got, expected, rtol=0, atol=0)


def rmu_context(tok, model, layer: int) -> ObjectiveContext:
    cfg = UnlearnConfig(objective="rmu", rmu_layer=layer, rmu_steering=6.5, rmu_update_layers=[layer], seed=3)
    ctx = ObjectiveContext(cfg)
    OBJECTIVES.get("rmu").setup(model, ctx, SetupData(tokenize_texts(tok, FORGET, 64),
                                                      tokenize_texts(tok, RETAIN, 64)))
    return ctx


def grads(model: nn.Module) -> dict[str, torch.Tensor | None]:
    out = {n: None if p.grad is None else p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    return out


@pytest.mark.parametrize("checkpointing", [False, True])
def test_last_layer_loss_and_gradients_against_a_full_forward(tok, forget, checkpointing: bool) -> None:
    model, batch = model_of(tok), collate(forget, ROWS)
    layer = LAYERS - 1
    ctx = rmu_context(tok, model, layer)
    control = ctx.cache[CONTROL_KEY]
    # reference: the full forward pass, the last layer's output taken before the final norm
    reference = masked_mse(unnormed_last_layer(model, batch), control, batch)
    reference.backward()
    expected = grads(model)
    assert expected["model.norm.weight"] is None  # the final norm is not part of RMU's loss
    old = masked_mse(model.get_decoder()(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                                         output_hidden_states=True).hidden_states[layer + 1], control, batch)
    if checkpointing:
        model.gradient_checkpointing_enable({"use_reentrant": False})
        model.train()  # checkpointing only acts in training mode (the tiny Llama has no dropout)
    loss = OBJECTIVES.get("rmu").forget(model, batch, ctx)
    loss.backward()
    got = grads(model)
    assert loss.item() == pytest.approx(reference.item(), rel=1e-12)
    assert abs(old.item() - loss.item()) > 0.3 * loss.item()  # the normed activations gave another loss (2.03 vs 1.31)
    for name, grad in expected.items():
        if grad is None:
            assert got[name] is None, name
        else:
            torch.testing.assert_close(got[name], grad, rtol=1e-10, atol=1e-12, msg=name)
