"""Checkpoints written before FedSmoothLoRA's options moved out of FederatedArguments still resume."""

from __future__ import annotations

import json

import pytest
import torch
from support.trainers import tiny_trainer

from fedsmooth_hf.persistence.checkpoint import STATE_FILE
from fedsmooth_hf.persistence.checkpoint_checks import MOVED_TO_STRATEGY

FED = dict(strategy="fedsmoothlora", num_clients=3, num_rounds=3, local_steps=2, save_rounds=1, eval_rounds=0,
           zeta_mode="constant", ga_samples=8)  # constant: round 2 does not depend on num_rounds


def _as_previous_layout(round_dir, options: dict) -> None:
    """Rewrite ``state.json`` as the flat layout wrote it: the method's options among the
    FederatedArguments, and a strategy description without the calibration sizes."""
    path = round_dir / STATE_FILE
    state = json.loads(path.read_text())
    state["fed_args"].update(options)
    for key in ("ga_samples", "ga_batch_size"):
        state["strategy"].pop(key, None)
    path.write_text(json.dumps(state))


def test_a_previous_layout_checkpoint_resumes_to_the_same_run(tmp_path):
    whole = tiny_trainer(tmp_path / "whole", fed=FED)
    whole.train()
    first = tiny_trainer(tmp_path / "old", fed={**FED, "num_rounds": 2})
    first.train()
    options = {k: v for k, v in first.strategy.config.to_dict().items() if k in MOVED_TO_STRATEGY}
    _as_previous_layout(tmp_path / "old" / "round-2", options)
    resumed = tiny_trainer(tmp_path / "old", fed=FED)
    resumed.train(resume_from_checkpoint=True)
    assert [r["merge_norm"] for r in resumed.round_history] == [r["merge_norm"] for r in whole.round_history]
    for name, layer in whole.layers.items():
        assert torch.equal(resumed.layers[name].get_base_layer().weight, layer.get_base_layer().weight)


def test_a_previous_layout_checkpoint_with_other_method_options_is_refused(tmp_path):
    first = tiny_trainer(tmp_path, fed={**FED, "num_rounds": 2})
    first.train()
    options = {k: v for k, v in first.strategy.config.to_dict().items() if k in MOVED_TO_STRATEGY}
    _as_previous_layout(tmp_path / "round-2", {**options, "ga_samples": 32})
    resumed = tiny_trainer(tmp_path, fed=FED)
    with pytest.raises(ValueError, match="strategy option ga_samples=32, but this run has 8"):
        resumed.train(resume_from_checkpoint=True)
