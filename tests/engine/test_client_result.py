"""One ClientResult from the local round to the server, whatever carries it."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from fedsmooth_hf import ClientResult, get_strategy


def _result() -> ClientResult:
    upload = {"layer": (torch.randn(6, 2), torch.randn(2, 5))}
    return ClientResult(client=3, upload=upload, num_examples=17, train_loss=1.25,
                        extras={"head.weight": torch.ones(2, 2)}, train_time_s=0.5, strategy_overhead_s=0.1,
                        first_loss=None, strategy_metrics={"rm_kept": [0.9, 0.8]})


def test_figures_round_trip_keeps_every_field():
    result = _result()
    again = ClientResult.from_figures({**result.figures(), "a_newer_sender's_key": 1}, result.upload, result.extras)
    assert again.figures() == result.figures() and again.upload is result.upload


def test_the_flower_wire_rebuilds_the_same_result():
    pytest.importorskip("flwr")
    from fedsmooth_hf.flower.wire import reply_content, result_from_reply, tensors_to_arrays, upload_to_arrays

    strategy = get_strategy("fedit", rank=2)
    result = _result()
    arrays = {**upload_to_arrays(strategy, 3, result.upload), **tensors_to_arrays("extra", result.extras)}
    decoded = result_from_reply(strategy, 3, arrays, reply_content(result.figures(), arrays))
    assert isinstance(decoded, ClientResult) and decoded.figures() == result.figures()
    B, A = decoded.upload["layer"]
    assert torch.equal(B, result.upload["layer"][0]) and torch.equal(A, result.upload["layer"][1])
    assert torch.equal(decoded.extras["head.weight"], result.extras["head.weight"])


def test_flower_app_modules_import_no_torch():
    """A SuperLink's ServerApp process and a per-message ClientApp process load these modules first."""
    pytest.importorskip("flwr")
    code = ("import sys, fedsmooth_hf.flower.server, fedsmooth_hf.flower.client, fedsmooth_hf.engine.result;"
            "print(sorted(m for m in ('torch', 'transformers', 'peft') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
