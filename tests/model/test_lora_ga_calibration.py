"""peft's LoRA-GA calibration as the federation runs it: the given data only, the run's collator and batch size."""

import pytest
from peft import LoraConfig, get_peft_model
from support.tiny import make_counting_dataset, make_tiny_llama
from transformers import default_data_collator

from fedsmooth_hf.model.adapter import find_target_modules, get_lora_factors, lora_layers
from fedsmooth_hf.model.peft_init import calibrate_lora_ga, changes_base_weights, is_default_init


class CountingCollator:
    def __init__(self):
        self.batch_sizes = []

    def __call__(self, features):
        self.batch_sizes.append(len(features))
        return default_data_collator(features)


def _lora_ga_model():
    model = make_tiny_llama()
    config = LoraConfig(r=2, lora_alpha=4, init_lora_weights="lora_ga")
    config.target_modules = find_target_modules(model)
    return model, config


def test_calibration_batches_the_given_examples_with_the_given_collator():
    model, config = _lora_ga_model()
    collator = CountingCollator()
    data = make_counting_dataset(10)  # its `category` column is not a forward argument: dropped, as Trainer does
    used = calibrate_lora_ga(model, config, data, collator, batch_size=4, max_samples=9)
    assert used == 9 and collator.batch_sizes == [4, 4, 1]
    assert config.lora_ga_config is not None  # peft's defaults when none was given
    layers = lora_layers(get_peft_model(model, config))
    assert all(B.abs().sum() > 0 for B, _ in get_lora_factors(layers).values())


def test_calibration_needs_labels_and_examples():
    model, config = _lora_ga_model()
    with pytest.raises(ValueError, match="init_dataset is empty"):
        calibrate_lora_ga(model, config, make_counting_dataset(0), default_data_collator, 4)
    unlabeled = make_counting_dataset(4).remove_columns(["labels"])
    with pytest.raises(ValueError, match="returned no loss"):
        calibrate_lora_ga(model, config, unlabeled, default_data_collator, 4)


@pytest.mark.parametrize(("init", "default", "residual"), [(True, True, False), ("gaussian", False, False),
                                                           ("pissa_niter_4", False, True), ("olora", False, True),
                                                           ("lora_ga", False, True)])
def test_which_inits_rewrite_the_base(init, default, residual):
    config = LoraConfig(init_lora_weights=init)
    assert (is_default_init(config), changes_base_weights(config)) == (default, residual)
    assert is_default_init(None)  # no config: peft's default
