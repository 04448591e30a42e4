"""TRAM's cross-lingual setting offline: an XNLI-format data set (`facebook/xnli` columns) saved to disk,
the real SmolLM2 tokenizer, and a tiny hub-format sequence classifier, through `samsuite train`'s
fine-tune protocol (the paper-scale config `paper_xnli_tram.yaml` runs the same code on XLM-R)."""

from __future__ import annotations

from pathlib import Path

import datasets
import pytest
import torch

from experiments.train import TrainConfig, run_train
from shared import Batch, build_optimizer, member_backward
from shared.config import ConfigError, load_config
from testbeds import build_model, load_suite

LANGS = ("en", "de", "fr")


@pytest.fixture(scope="module")
def xnli_dirs(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(data_dir with one save_to_disk XNLI copy per language, a folder with the tokenizer and a tiny
    Llama classifier in the hub's format)."""
    from transformers import LlamaConfig, LlamaForSequenceClassification

    from unlearn.models import smollm2_tokenizer

    root = tmp_path_factory.mktemp("xnli")
    features = datasets.Features({"premise": datasets.Value("string"), "hypothesis": datasets.Value("string"),
                                  "label": datasets.ClassLabel(names=["entailment", "neutral", "contradiction"])})
    for k, lang in enumerate(LANGS):
        rows = {"premise": [f"{lang} premise {i} about the {['cat', 'dog', 'bird'][i % 3]}" for i in range(30)],
                "hypothesis": [f"{lang} hypothesis {i} of {k}" for i in range(30)], "label": [i % 3 for i in range(30)]}
        datasets.DatasetDict({"train": datasets.Dataset.from_dict(rows, features=features)}).save_to_disk(
            root / "data" / lang)
    tok = smollm2_tokenizer()
    tok.save_pretrained(root / "model")
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tok), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=64,
                         pad_token_id=tok.pad_token_id or tok.eos_token_id)
    LlamaForSequenceClassification(config).save_pretrained(root / "model")
    return root / "data", root / "model"


def test_xnli_suite_packs_token_ids_and_masks(xnli_dirs: tuple[Path, Path]) -> None:
    data, model_dir = xnli_dirs
    suite = load_suite("xnli", tokenizer=str(model_dir), languages=list(LANGS), max_length=16, data_dir=str(data))
    assert list(suite.domains) == list(LANGS) and suite.num_classes == 3
    x = suite.encode(suite.domains["de"])
    assert x.shape == (30, 2, 16) and x.dtype == torch.int64
    assert set(x[:, 1].unique().tolist()) <= {0, 1} and (x[:, 1].sum(1) > 0).all()
    with pytest.raises(ValueError, match="^languages: unknown XNLI language 'xx'"):
        load_suite("xnli", tokenizer=str(model_dir), languages=["en", "xx"], data_dir=str(data))
    with pytest.raises(ValueError, match="^data_dir: no .*es"):
        load_suite("xnli", tokenizer=str(model_dir), languages=["es"], data_dir=str(data))


def test_tram_x_noises_the_classifier_embeddings_with_the_mask(xnli_dirs: tuple[Path, Path]) -> None:
    data, model_dir = xnli_dirs
    suite = load_suite("xnli", tokenizer=str(model_dir), languages=["en"], max_length=16, data_dir=str(data))
    x = suite.encode(suite.domains["en"])[:6]
    y = torch.tensor(list(suite.domains["en"]["label"])[:6])
    model = build_model("hf-classifier", 3, (2, 16), pretrained=str(model_dir))
    assert model(x).shape == (6, 3)
    opt = build_optimizer("tram-x", model.parameters(), "adamw", lr=1e-3, sigma=0.5)
    before = x.clone()
    member_backward(opt, model, [Batch(x, y)])
    opt.step()
    assert torch.equal(x, before) and opt.last_radius.item() > 0


def test_fine_tune_a_hub_classifier_on_english_test_on_the_others(xnli_dirs: tuple[Path, Path], tmp_path: Path
                                                                 ) -> None:
    data, model_dir = xnli_dirs
    cfg = load_config(TrainConfig, Path("experiments/configs/train/paper_xnli_tram.yaml"), [
        f"out_dir={tmp_path}", f"dataset_options.tokenizer={model_dir}", f"model_options.pretrained={model_dir}",
        f"dataset_options.data_dir={data}", f"dataset_options.languages=[{','.join(LANGS)}]",
        "dataset_options.max_length=16", "epochs=1", "batch_size=8", "seeds=[0]", "device=cpu",
        "val_fraction=0.2", "optimizers=[adamw, tram-prev, tram-x]"])
    summary = run_train(cfg)
    rows = {r["optimizer"]: r for r in summary["results"]}
    assert list(rows) == ["adamw", "tram-prev", "tram-x"] and all(0 <= r["test_acc"] <= 1 for r in rows.values())
    assert set(summary["domains"]) == set(LANGS)
    with pytest.raises(ConfigError, match="^pretrain_epochs: expected an integer >= 0"):
        TrainConfig(protocol="fine-tune", dataset="xnli", target_domain="en", pretrain_epochs=-1,
                    out_dir=str(tmp_path))
