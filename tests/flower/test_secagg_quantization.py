"""SecAgg+'s quantization error on a round's aggregate, for every strategy, without the network.

The secure sum is emulated with Flower's own arithmetic (``quantize``/``dequantize`` of
``flwr.common.secure_aggregation``, the workflow's offset and mean): the pairwise and private masks cancel
exactly modulo 2**32, so what is left is what SecAgg+ changes. The clients' vectors and the server's round are
the real code (``contribution_vector``, ``run_secure_round``). Run with ``-s`` to print the figures
docs/flower.md quotes.
"""

from types import SimpleNamespace

import numpy as np
import pytest
import torch
from flwr.common.secure_aggregation.quantization import dequantize, quantize
from support.trainers import tiny_trainer

from fedsmooth_hf.flower import secure_round
from fedsmooth_hf.flower.secure_contribution import contribution_vector, layer_shapes
from fedsmooth_hf.flower.secure_round import SecureRelease, run_secure_round
from fedsmooth_hf.flower.secure_sum import SecureAggregationOptions, SecureSum
from fedsmooth_hf.math.lowrank import factored_norm

CLIENTS = range(4)


def _emulated_secure_sum(trainer, results):
    """``secure_sum`` with Flower's quantization in place of the protocol (node id = client)."""
    shapes = layer_shapes(trainer)

    def secure_sum(grid, requests, options, group, timeout=None):
        ints, names = None, None
        np.random.seed(group)  # Flower's stochastic rounding draws from numpy's global generator
        for node, (config, arrays) in requests.items():
            r = results[node]
            vector = contribution_vector(trainer.strategy, node, r.upload, r.extras, r.num_examples, config,
                                         dict(zip(shapes, arrays)), shapes, int(trainer.args.seed))
            names = list(vector)
            q = quantize([np.asarray(v, dtype=np.float64) for v in vector.values()], options.clipping_range,
                         options.quantization_range)
            ints = q if ints is None else [a + b for a, b in zip(ints, q)]
        n = len(requests)
        means = [(v - (n - 1) * options.clipping_range) / n
                 for v in dequantize(ints, options.clipping_range, options.quantization_range)]
        return SecureSum(total={k: m * n for k, m in zip(names, means)}, nodes=sorted(requests), dropped={})

    return secure_sum


def _dense(update) -> dict[str, torch.Tensor]:
    """A round's update as dense matrices: what it merges plus the global adapter's product."""
    out = {n: B @ A for n, (B, A) in update.merge.items()}
    for n, (B, A) in (update.global_lora or {}).items():
        out[n] = out.get(n, 0) + B @ A
    return out


def _relative_error(got, want) -> float:
    num = sum(float((got[n] - want[n]).pow(2).sum()) for n in want)
    return (num / sum(float(want[n].pow(2).sum()) for n in want)) ** 0.5


def _trained(tmp_path, strategy, **fed):
    trainer = tiny_trainer(tmp_path, {"strategy": strategy, "local_steps": 2, **fed})
    results = {c: trainer.train_client_round(0, c) for c in CLIENTS}
    return trainer, results


def _secure_update(trainer, results, monkeypatch, options, dp=None):
    monkeypatch.setattr(secure_round, "secure_sum", _emulated_secure_sum(trainer, results))
    trainer.privacy = SecureRelease(dp)
    executor = SimpleNamespace(trainer=trainer, secure=options, run_token="t", grid=None, timeout=None)
    return run_secure_round(executor, 0, {c: c for c in results}, {c: r.num_examples for c, r in results.items()})


@pytest.mark.parametrize("strategy, fed", [(s, {}) for s in ("fedit", "ffa_lora", "fedex_lora", "flexlora", "frlora",
                                                             "fedsmoothlora")]
                         + [(s, {"client_ranks": [2, 4, 2, 4]}) for s in ("fedit", "frlora")],  # padded; own start
                         ids=lambda v: "ranks" if isinstance(v, dict) and v else "" if isinstance(v, dict) else v)
def test_quantization_error_of_the_secure_aggregate(tmp_path, strategy, fed, monkeypatch):
    trainer, results = _trained(tmp_path, strategy, **fed)
    weights = {c: float(r.num_examples) for c, r in results.items()}
    state = trainer.strategy.state_dict()
    want = _dense(trainer.strategy.aggregate({c: r.upload for c, r in results.items()}, weights))
    errors = {}
    for clipping_range, levels in [(0.5, 2**22), (8.0, 2**22), (0.5, 2**16)]:  # ours, Flower's, coarse
        trainer.strategy.load_state_dict(state)
        options = SecureAggregationOptions(enabled=True, clipping_range=clipping_range, quantization_range=levels)
        got = _dense(_secure_update(trainer, results, monkeypatch, options).update)
        errors[(clipping_range, levels)] = _relative_error(got, want)
        # an entry's rounding error is at most one level, 2 cr / levels; the update's error follows it
        assert errors[(clipping_range, levels)] > 0
    norm = sum(factored_norm([B], [A]) ** 2 for up in (r.upload for r in results.values())
               for B, A in up.values()) ** 0.5
    print(f"\n{strategy}{' ' + str(fed) if fed else ''}: relative error of the round's update "
          f"(upload norm {norm:.3g}): "
          + ", ".join(f"cr={cr:g} levels=2^{int(np.log2(t))}: {e:.2e}" for (cr, t), e in errors.items()))
    assert errors[(0.5, 2**22)] < 5e-4  # the defaults
    assert errors[(8.0, 2**22)] > errors[(0.5, 2**22)]  # coarser levels, larger error
    assert errors[(0.5, 2**16)] > errors[(0.5, 2**22)]


@pytest.mark.parametrize("strategy", ["ffa_lora", "fedsmoothlora", "fedex_lora"])
def test_dp_with_secure_aggregation_is_the_in_process_release(tmp_path, strategy, monkeypatch):
    """The server noises the secure sums exactly as the in-process release noises the plain ones: same
    noise, same ledger; only the quantization differs."""
    trainer, results = _trained(tmp_path, strategy, dp_noise_multiplier=0.3, dp_clip_norm=0.05,
                                clients_per_round=4)
    dp = trainer.privacy
    state = trainer.strategy.state_dict()
    want_update, want_record = dp.release(0, {c: r.upload for c, r in results.items()})
    assert want_record["dp_clipped_share"] > 0  # the clip bites: the test sees clipped contributions
    dp.rounds = 0
    trainer.strategy.load_state_dict(state)
    options = SecureAggregationOptions(enabled=True)
    got = _secure_update(trainer, results, monkeypatch, options, dp=dp)
    assert got.record == pytest.approx(want_record)
    error = _relative_error(_dense(got.update), _dense(want_update))
    print(f"\n{strategy} under DP: relative difference from the in-process release {error:.2e}")
    assert 0 < error < 1e-4
