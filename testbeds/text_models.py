"""A hub sequence classifier (XLM-R, GPT-2, Llama... through `transformers`' AutoModelForSequenceClassification)
for the packed token inputs of `testbeds.text`: int64 (B, 2, L), token ids and attention mask.

`noised_inputs` is the hook TRAM-x uses (`shared.sam.tram`): the input embeddings plus N(0, sigma^2), with
the attention mask, as the reference code's `InputPerturbationTarget` noises `inputs_embeds`."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from testbeds.models import expect_shape


class PackedSequenceClassifier(nn.Module):
    """Unpacks (B, 2, L) into input_ids and attention_mask for the wrapped hub model; returns its logits."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: Tensor | None = None, *, inputs_embeds: Tensor | None = None,
                attention_mask: Tensor | None = None) -> Tensor:
        if inputs_embeds is not None:
            return self.model(inputs_embeds=inputs_embeds, attention_mask=attention_mask).logits
        return self.model(input_ids=x[:, 0], attention_mask=x[:, 1]).logits

    def get_input_embeddings(self) -> nn.Module:
        return self.model.get_input_embeddings()

    def noised_inputs(self, x: Tensor, sigma: float) -> dict[str, Tensor]:
        """Keyword inputs: the token embeddings plus N(0, sigma^2) noise (detached), and the mask."""
        embeds = self.model.get_input_embeddings()(x[:, 0]).detach()
        return {"inputs_embeds": embeds + sigma * torch.randn_like(embeds), "attention_mask": x[:, 1]}


def hf_classifier(num_classes: int, input_shape: tuple[int, ...], *, pretrained: str) -> nn.Module:
    """`pretrained` (a hub id or a local folder) with a fresh `num_classes`-way head, for inputs (2, max_length)."""
    from transformers import AutoModelForSequenceClassification

    expect_shape("hf-classifier", input_shape, ("ids and mask", "length"))
    if input_shape[0] != 2:
        raise ValueError(f"input_shape: hf-classifier takes packed (2, length) token inputs, got {input_shape}")
    # a fresh head: a checkpoint that has one for another number of classes loads without it
    model = AutoModelForSequenceClassification.from_pretrained(pretrained, num_labels=num_classes,
                                                               ignore_mismatched_sizes=True)
    if model.config.pad_token_id is None:  # decoder models find the last real token by the padding id
        model.config.pad_token_id = model.config.eos_token_id
    return PackedSequenceClassifier(model)
