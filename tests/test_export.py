"""The exported merged model and the exported adapter reproduce the federated global model."""

import torch
from conftest import make_counting_dataset, make_tiny_llama, make_tiny_vit
from peft import PeftModel
from transformers import LlamaForCausalLM, TrainingArguments, ViTForImageClassification

from fedsmooth_hf import FederatedArguments, FederatedTrainer

IDS = torch.arange(20).reshape(2, 10) % 64


def _args(tmp_path):
    return TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=8, learning_rate=1e-2,
                             report_to="none", use_cpu=True, disable_tqdm=True, logging_steps=50)


def _global_logits(trainer, **inputs):
    trainer.load_global_adapter()
    trainer.model.eval()
    with torch.no_grad():
        return trainer.model(**inputs).logits


def test_saved_merged_llama_reloads_with_same_logits(tmp_path):
    # FedIT keeps a non-zero global adapter, so the export must merge it
    fed = FederatedArguments(strategy="fedit", num_clients=2, num_rounds=2, local_steps=3, lora_r=4, lora_alpha=8)
    trainer = FederatedTrainer(model=make_tiny_llama(), args=_args(tmp_path), fed_args=fed,
                               train_dataset=make_counting_dataset(48), eval_dataset=make_counting_dataset(8, seed=2))
    trainer.train()
    expected = _global_logits(trainer, input_ids=IDS)
    out = tmp_path / "merged"
    trainer.save_model(str(out))
    reloaded = LlamaForCausalLM.from_pretrained(out).eval()
    with torch.no_grad():
        got = reloaded(input_ids=IDS).logits
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    card = (out / "README.md").read_text()
    assert "fedit" in card and "| num_clients | 2 |" in card and "eval_loss" in card
    assert (out / "federated_history.json").is_file()
    assert not any("lora" in k for k in reloaded.state_dict())


def test_saved_vit_with_trained_head_reloads(tmp_path):
    import datasets

    gen = torch.Generator().manual_seed(0)
    pixels = torch.randn(40, 1, 8, 8, generator=gen)
    labels = (pixels.mean(dim=(1, 2, 3)) > 0).long()
    ds = datasets.Dataset.from_dict({"pixel_values": pixels.numpy(), "labels": labels.numpy()}).with_format("torch")
    fed = FederatedArguments(strategy="fedsmoothlora", num_clients=2, num_rounds=2, local_steps=2, lora_r=2,
                             lora_alpha=4, ga_samples=8, modules_to_save=["classifier"])
    model = make_tiny_vit(num_labels=2)
    head_before = model.classifier.weight.detach().clone()
    trainer = FederatedTrainer(model=model, args=_args(tmp_path), fed_args=fed, train_dataset=ds)
    trainer.train()
    x = pixels[:5]
    expected = _global_logits(trainer, pixel_values=x)
    trainer.save_model(str(tmp_path / "vit"))
    reloaded = ViTForImageClassification.from_pretrained(tmp_path / "vit").eval()
    with torch.no_grad():
        got = reloaded(pixel_values=x).logits
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    assert not torch.equal(reloaded.classifier.weight, head_before), "the averaged trained head must be exported"


def test_exported_adapter_reproduces_the_merged_model(tmp_path):
    # FedSmoothLoRA merges rank r per round: 2 rounds x r=4 => the cumulative update has rank <= 8
    fed = FederatedArguments(strategy="fedsmoothlora", num_clients=2, num_rounds=2, local_steps=3, lora_r=4,
                             lora_alpha=8, ga_samples=8)
    trainer = FederatedTrainer(model=make_tiny_llama(), args=_args(tmp_path), fed_args=fed,
                               train_dataset=make_counting_dataset(48))
    trainer.train()
    expected = _global_logits(trainer, input_ids=IDS)
    original = make_tiny_llama()  # the same pretrained starting point
    with torch.no_grad():
        before = original(input_ids=IDS).logits
    trainer.export_adapter(original, str(tmp_path / "adapter"), rank=8)
    fresh = PeftModel.from_pretrained(make_tiny_llama(), tmp_path / "adapter").eval()
    with torch.no_grad():
        got = fresh(input_ids=IDS).logits
    assert (expected - before).abs().max() > 1e-3, "training must have changed the model"
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
