"""The single-process pieces of multi-process unlearning: how a micro-batch is cut per rank, and
the inputs that K processes cannot run, refused before any work (the multi-process runs
themselves: test_distributed.py, slow)."""

from __future__ import annotations

import pytest
import torch
from train_fixtures import FORGET, tiny_llama, tiny_tokenizer

from shared.config import ConfigError
from unlearn.data import make_micro_batches, tokenize_texts
from unlearn.distributed import World, check_world
from unlearn.train import UnlearnConfig, _check_world_inputs


def test_the_ranks_slices_make_the_one_process_micro_batches() -> None:
    data = tokenize_texts(tiny_tokenizer(), FORGET, 64)
    rows = [5, 0, 3, 1, 4, 2]
    one = make_micro_batches(data, rows, 2)
    per_rank = [make_micro_batches(data, rows, 2, rank, 3) for rank in range(3)]
    for i, batch in enumerate(one):
        parts = [ranks[i] for ranks in per_rank]
        assert torch.cat([p.index for p in parts]).tolist() == batch.index.tolist()
        assert all((p.token_norm, p.position_norm, p.seq_norm) == (batch.token_norm, batch.position_norm,
                                                                   batch.seq_norm) for p in parts)


def test_what_k_processes_cannot_run_is_refused_early() -> None:
    with pytest.raises(ConfigError, match="smoother: gp on 2 processes: its penalty needs a double backward"):
        check_world(UnlearnConfig(smoother="gp"), World(0, 2))
    check_world(UnlearnConfig(smoother="gp"), World())  # one process: fine
    with pytest.raises(ConfigError, match=r"forget: 6 texts cannot be split over 8 processes; use at most 6"):
        _check_world_inputs(FORGET, None, None, World(0, 8))
    with pytest.raises(ConfigError, match="ref_model: a separate reference model is not sharded"):
        _check_world_inputs(FORGET, None, tiny_llama(tiny_tokenizer()), World(1, 2))
