"""QLoRA: FedSmoothLoRA on a bitsandbytes 4-bit base loses nothing at merge and matches full precision."""

import pytest
import torch
from peft import LoraConfig, get_peft_model
from support.tiny import make_counting_dataset, save_tiny_llama_checkpoint
from transformers import AutoModelForCausalLM, BitsAndBytesConfig, TrainingArguments

from fedsmooth_hf import FederatedArguments, FederatedTrainer
from fedsmooth_hf.model.adapter import lora_layers, lora_scaling
from fedsmooth_hf.model.gradients import estimate_weight_gradients
from fedsmooth_hf.model.merge import base_residual, dense_base_weight, keep_quantized_layers_differentiable

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return save_tiny_llama_checkpoint(tmp_path_factory.mktemp("tiny_llama"))


def _load_4bit(path):
    bnb = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32)
    return AutoModelForCausalLM.from_pretrained(path, quantization_config=bnb)


def _fp32_twin(path):
    """A full-precision model whose adapted weights are exactly the dequantized 4-bit ones."""
    quantized = dict(_load_4bit(path).named_modules())
    model = AutoModelForCausalLM.from_pretrained(path)
    with torch.no_grad():
        for name, module in model.named_modules():
            if any(name.endswith(t) for t in TARGETS):
                module.weight.copy_(dense_base_weight(quantized[name]))
    return model


def test_hook_gradients_through_4bit_layers_equal_full_precision(ckpt):
    q = get_peft_model(_load_4bit(ckpt), LoraConfig(r=2, target_modules=TARGETS)).eval()
    assert keep_quantized_layers_differentiable(q) == len(TARGETS) * 2
    qlayers = lora_layers(q)
    f = get_peft_model(_fp32_twin(ckpt), LoraConfig(r=2, target_modules=TARGETS)).eval()
    ids = torch.randint(0, 2000, (2, 12), generator=torch.Generator().manual_seed(0))
    batches = [{"input_ids": ids, "labels": ids}]
    gq = estimate_weight_gradients(q, qlayers, batches)
    gf = estimate_weight_gradients(f, lora_layers(f), batches)
    for name in gq:
        rel = torch.linalg.norm(gq[name] - gf[name]) / torch.linalg.norm(gf[name])
        assert rel < 1e-5, (name, float(rel))


def _run(model, tmp_path, tag):
    fed = FederatedArguments(strategy="fedsmoothlora", num_clients=2, num_rounds=3, local_steps=3, lora_r=4,
                             lora_alpha=8, ga_samples=8, ga_batch_size=4)
    args = TrainingArguments(output_dir=str(tmp_path / tag), per_device_train_batch_size=4, learning_rate=0.5,
                             report_to="none", use_cpu=True, disable_tqdm=True, logging_steps=50, seed=7,
                             optim="sgd")  # Adam would turn float noise in tiny gradients into full steps
    data = make_counting_dataset(32, vocab_size=2000)
    trainer = FederatedTrainer(model=model, args=args, fed_args=fed, train_dataset=data)
    merged = []
    inner = trainer.strategy.aggregate

    def spy(uploads, weights):
        update = inner(uploads, weights)
        merged.append(update.merge)
        return update

    trainer.strategy.aggregate = spy
    W0 = {n: dense_base_weight(layer).clone() for n, layer in trainer.layers.items()}
    trainer.train()
    return trainer, W0, merged


def test_three_rounds_on_4bit_match_full_precision_and_keep_the_whole_update(ckpt, tmp_path):
    q_trainer, qW0, q_merged = _run(_load_4bit(ckpt), tmp_path, "q4")
    packed_before = {n: layer.get_base_layer().weight.data.clone() for n, layer in q_trainer.layers.items()}
    f_trainer, fW0, _ = _run(_fp32_twin(ckpt), tmp_path, "fp32")
    for name, layer in q_trainer.layers.items():
        s = lora_scaling(layer)
        expected_update = sum(s * B @ A for B, A in (m[name] for m in q_merged))
        got_update = dense_base_weight(layer) - qW0[name]
        # the full update survives the merges into the 4-bit layer (held as a low-rank residual)
        retained = 1 - torch.linalg.norm(got_update - expected_update) / torch.linalg.norm(expected_update)
        assert retained >= 0.9999, (name, float(retained))
        assert base_residual(layer) is not None and base_residual(layer).discarded_norm == 0.0
        # the 4-bit codes themselves were never written to
        assert torch.equal(layer.get_base_layer().weight.data, packed_before[name])
        # and the trajectory matches the full-precision run of the same seed and data
        f_update = dense_base_weight(f_trainer.layers[name]) - fW0[name]
        rel = torch.linalg.norm(got_update - f_update) / torch.linalg.norm(f_update)
        assert rel < 1e-3, (name, float(rel))  # measured 2.7e-4: float summation order, amplified by training
