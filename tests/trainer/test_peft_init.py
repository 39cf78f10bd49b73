"""Federations started from peft's own ``init_lora_weights`` (gaussian, PiSSA, OLoRA, LoRA-GA) on the tiny Llama.

peft's contract: the wrapped model computes the base model (a residual init moves ``s B0 A0`` out of
the base weights). The federation's round 0 is that model; what it exports is relative to the
original weights; LoRA-GA calibrates on the server's ``init_dataset`` and never on a client's data.
"""

import json

import pytest
import torch
from peft import LoraConfig, LoraGAConfig, PeftModel, get_peft_model
from peft.tuners.lora.loraga import preprocess_loraga
from support.tiny import make_counting_dataset, make_tiny_llama
from support.trainers import training_args
from transformers import LlamaForCausalLM

from fedsmooth_hf import FederatedArguments, FederatedTrainer
from fedsmooth_hf.model.adapter import find_target_modules, get_lora_factors, lora_layers
from fedsmooth_hf.model.peft_init import check_init_supported

IDS = torch.arange(20).reshape(2, 10) % 64
INITS = ["gaussian", "pissa", "olora", "lora_ga"]
RESIDUAL = {"pissa", "olora", "lora_ga"}


class CountingDataset(torch.utils.data.Dataset):
    """A dataset that counts how often its examples are read."""

    def __init__(self, rows):
        self.rows, self.reads = rows, 0

    def __len__(self):
        return len(self.rows)

    def __getitem__(self, i):
        self.reads += 1
        return self.rows[i]


def _rows(n, seed):
    return [{k: torch.tensor(v) for k, v in row.items() if k != "category"}
            for row in make_counting_dataset(n, seed=seed)]


def _config(init, r=4):
    return LoraConfig(r=r, lora_alpha=8, init_lora_weights=init,
                      lora_ga_config=LoraGAConfig() if init == "lora_ga" else None)


def _fed(strategy="fedit", **kw):
    return FederatedArguments(**{"strategy": strategy, "num_clients": 2, "num_rounds": 2, "local_steps": 2,
                                 "eval_rounds": 0, "save_rounds": -1, **kw})


def _trainer(tmp_path, init, strategy="fedit", init_dataset=None, client_datasets=None, **fed):
    clients = client_datasets or [CountingDataset(_rows(16, seed=1)), CountingDataset(_rows(16, seed=2))]
    if init == "lora_ga" and init_dataset is None:
        init_dataset = CountingDataset(_rows(12, seed=3))
    return FederatedTrainer(model=make_tiny_llama(), args=training_args(tmp_path, per_device_train_batch_size=4),
                            fed_args=_fed(strategy, **fed), peft_config=_config(init), client_datasets=clients,
                            init_dataset=init_dataset)


def _logits(model):
    model.eval()
    with torch.no_grad():
        return model(input_ids=IDS).logits


def _global_logits(trainer):
    trainer.load_global_adapter()
    return _logits(trainer.model)


def _reference_init(init, calibration_rows):
    """peft alone, on the same base and seed: the adapter the federation's round 0 must hold."""
    model = make_tiny_llama()
    config = _config(init)
    config.target_modules = find_target_modules(model)
    if init == "lora_ga":
        loader = torch.utils.data.DataLoader(calibration_rows, batch_size=4)

        def train_step():
            for batch in loader:
                model(**batch).loss.backward()

        preprocess_loraga(model, config, train_step)
    return get_lora_factors(lora_layers(get_peft_model(model, config)))


@pytest.mark.parametrize("init", INITS)
def test_fedit_starts_from_peft_init_and_trains_two_rounds(tmp_path, init):
    clients = [CountingDataset(_rows(16, seed=1)), CountingDataset(_rows(16, seed=2))]
    server = CountingDataset(_rows(12, seed=3))
    trainer = _trainer(tmp_path, init, client_datasets=clients, init_dataset=server if init == "lora_ga" else None)
    # round 0: peft's own adapter, and (peft's contract) the base model's output
    reference = _reference_init(init, server.rows)
    for name, (B, A) in trainer.strategy.global_lora().items():
        torch.testing.assert_close(B, reference[name][0], rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(A, reference[name][1], rtol=1e-4, atol=1e-5)
    if init in RESIDUAL:
        assert any(B.abs().sum() > 0 for B, _ in trainer.strategy.global_lora().values())
        torch.testing.assert_close(_global_logits(trainer), _logits(make_tiny_llama()), rtol=1e-4, atol=1e-4)
    # LoRA-GA read the server's examples, the clients' not at all, before training
    assert all(c.reads == 0 for c in clients)
    assert server.reads == (len(server) if init == "lora_ga" else 0)
    start = {n: B.clone() for n, (B, _) in trainer.strategy.global_lora().items()}
    trainer.train()
    assert [r["round"] for r in trainer.round_history if "train_loss" in r] == [1, 2]
    assert any(not torch.equal(start[n], B) for n, (B, _) in trainer.strategy.global_lora().items())


@pytest.mark.parametrize("init", ["pissa", "lora_ga"])
def test_merged_model_and_exported_adapter_are_the_trained_model_on_the_original_base(tmp_path, init):
    trainer = _trainer(tmp_path / "run", init)
    trainer.train()
    expected = _global_logits(trainer)
    # the merged model: a plain checkpoint, no residual or adapter needed
    trainer.save_model(str(tmp_path / "merged"))
    merged = LlamaForCausalLM.from_pretrained(tmp_path / "merged")
    torch.testing.assert_close(_logits(merged), expected, rtol=1e-5, atol=1e-5)
    assert f"| init_lora_weights | {init} |" in (tmp_path / "merged" / "README.md").read_text()
    # the adapter, loaded on the ORIGINAL weights: the change is s (B_g A_g - B0 A0), rank <= 2 r: exact at 2 r
    trainer.export_adapter(make_tiny_llama(), str(tmp_path / "adapter"), rank=2 * trainer.lora_rank)
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["init_lora_weights"] is True and config["trained_from_init"] == init
    loaded = PeftModel.from_pretrained(make_tiny_llama(), str(tmp_path / "adapter"))
    torch.testing.assert_close(_logits(loaded), expected, rtol=1e-4, atol=1e-4)
    # at rank r, the best rank-r approximation: closer to the trained model than the original base is
    trainer.export_adapter(make_tiny_llama(), str(tmp_path / "adapter_r"))
    approx = _logits(PeftModel.from_pretrained(make_tiny_llama(), str(tmp_path / "adapter_r")))
    assert (approx - expected).abs().max() < (_logits(make_tiny_llama()) - expected).abs().max()


@pytest.mark.parametrize(("strategy", "init", "rebuilt_with"), [("fedit", "lora_ga", "lora_ga"),
                                                                 ("ffa_lora", "pissa", True)])
def test_resume_continues_from_the_checkpointed_residual_base(tmp_path, strategy, init, rebuilt_with):
    """The checkpoint holds the residual base and the adapter: a resumed run ends where the whole run did,
    even from a trainer rebuilt with peft's default init (FFA-LoRA's frozen A comes from the checkpoint)."""
    full = _trainer(tmp_path / "a", init, strategy=strategy, save_rounds=1)
    full.train()
    resumed = _trainer(tmp_path / "a", rebuilt_with, strategy=strategy, save_rounds=1)
    resumed.train(resume_from_checkpoint=str(tmp_path / "a" / "round-1"))
    for name, layer in full.layers.items():
        torch.testing.assert_close(resumed.layers[name].get_base_layer().weight, layer.get_base_layer().weight,
                                   rtol=0, atol=1e-6)
    torch.testing.assert_close(_global_logits(resumed), _global_logits(full), rtol=0, atol=1e-5)


def test_lora_ga_without_init_dataset_is_an_error():
    with pytest.raises(ValueError, match="init_dataset=<server examples>"):
        FederatedTrainer(model=make_tiny_llama(), args=training_args("unused"), fed_args=_fed(),
                         peft_config=_config("lora_ga"), train_dataset=make_counting_dataset(16))


@pytest.mark.parametrize("strategy", ["fedsmoothlora", "flexlora", "frlora"])
def test_a_strategy_without_one_shared_adapter_refuses_a_peft_init(tmp_path, strategy):
    with pytest.raises(ValueError, match=f"init_lora_weights='pissa' with strategy '{strategy}'"):
        _trainer(tmp_path, "pissa", strategy=strategy)


def test_unsupported_inits_and_client_parallel_are_refused_by_name():
    with pytest.raises(ValueError, match="init_lora_weights='eva' is not supported"):
        check_init_supported(LoraConfig(init_lora_weights="eva"), "fedit", True, None, False)
    with pytest.raises(ValueError, match="init_lora_weights='pissa' with client_parallel"):
        check_init_supported(_config("pissa"), "fedit", True, None, client_parallel=True)
    check_init_supported(_config("gaussian"), "fedit", True, None, client_parallel=True)  # seeded like the default
    check_init_supported(_config(True), "flexlora", False, None, False)  # peft's default: every strategy


@pytest.mark.parametrize("strategy", ["ffa_lora", "fedex_lora"])
def test_the_other_shared_adapter_strategies_train_from_pissa(tmp_path, strategy):
    trainer = _trainer(tmp_path, "pissa", strategy=strategy)
    A0 = {n: A.clone() for n, (_, A) in trainer.strategy.global_lora().items()}
    trainer.train()
    if strategy == "ffa_lora":  # A stays PiSSA's
        assert all(torch.equal(A, A0[n]) for n, (_, A) in trainer.strategy.global_lora().items())
    merged = make_tiny_llama()
    merged.load_state_dict(trainer.merged_state_dict())
    torch.testing.assert_close(_logits(merged), _global_logits(trainer), rtol=1e-5, atol=1e-5)
