"""What a local round takes over from TrainingArguments is said once; the user's values come back."""

import logging

import transformers
from support.tiny import make_counting_dataset, make_tiny_llama
from transformers import TrainingArguments

from fedsmooth_hf import FederatedArguments, FederatedTrainer
from fedsmooth_hf.engine.callbacks import FederatedProgressCallback, RoundPrinterCallback
from fedsmooth_hf.engine.local_round import FEDERATED_EQUIVALENTS

FED = dict(strategy="fedit", num_clients=2, num_rounds=2, local_steps=2, lora_r=2, lora_alpha=4)


def _trainer(tmp_path, callbacks=None, **args):
    base = dict(output_dir=str(tmp_path), per_device_train_batch_size=8, report_to="none", use_cpu=True,
                disable_tqdm=True, save_strategy="no")
    base.update(args)
    return FederatedTrainer(model=make_tiny_llama(), args=TrainingArguments(**base), fed_args=FederatedArguments(**FED),
                            train_dataset=make_counting_dataset(32), eval_dataset=make_counting_dataset(8, seed=1),
                            callbacks=callbacks)


def _warnings(caplog):
    return [r for r in caplog.records if r.name == "fedsmooth_hf.engine.local_round" and r.levelno == logging.WARNING]


def test_overridden_arguments_give_one_warning_naming_each_field_and_its_equivalent(tmp_path, caplog):
    user = dict(max_steps=10, num_train_epochs=5, save_strategy="epoch", eval_strategy="epoch",
                load_best_model_at_end=True)
    with caplog.at_level(logging.INFO, logger="fedsmooth_hf"):
        trainer = _trainer(tmp_path, **user)
    (warning,) = _warnings(caplog)
    message = warning.getMessage()
    for name, equivalent in FEDERATED_EQUIVALENTS.items():
        assert f"{name}=" in message and equivalent in message, (name, message)
    for flag in ("--local_steps", "--num_rounds", "--save_rounds", "--eval_rounds"):
        assert flag in message
    assert "2 rounds x 2 clients x 2 local steps = 8 optimizer steps" in message
    info = [r.getMessage() for r in caplog.records
            if r.levelno == logging.INFO and r.name == "fedsmooth_hf.engine.local_round"]
    assert len(info) == 1 and "max_steps=local_steps=2" in info[0]

    caplog.clear()
    trainer.train()
    assert not _warnings(caplog), "said once, at start"
    assert trainer.args.max_steps == 10 and trainer.args.num_train_epochs == 5
    assert trainer.args.save_strategy == "epoch" and trainer.args.load_best_model_at_end is True


def test_default_arguments_give_no_warning(tmp_path, caplog):
    with caplog.at_level(logging.INFO, logger="fedsmooth_hf"):
        _trainer(tmp_path, save_strategy="steps")
        _trainer(tmp_path, save_strategy="no", eval_strategy="no")  # what a local round uses anyway
    assert not _warnings(caplog)


class _Records(logging.Handler):
    def __init__(self):
        super().__init__(logging.DEBUG)
        self.messages = []

    def emit(self, record):
        self.messages.append(record.getMessage())


def test_trainer_banner_is_silent_in_client_rounds_and_warnings_pass(tmp_path):
    records = _Records()
    trainer_logger = logging.getLogger("transformers.trainer")
    trainer_logger.addHandler(records)
    verbosity = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_info()
    try:
        trainer = _trainer(tmp_path)
        trainer.train()
        trainer_logger.warning("a warning inside the federated run")
    finally:
        transformers.logging.set_verbosity(verbosity)
        trainer_logger.removeHandler(records)
    assert not [m for m in records.messages if "Running training" in m], records.messages
    assert "a warning inside the federated run" in records.messages
    assert not trainer_logger.filters, "the filter lives only as long as a local round"


def test_one_round_line_printed_by_default(tmp_path, capsys):
    trainer = _trainer(tmp_path)
    assert sum(isinstance(cb, RoundPrinterCallback) for cb in trainer.callback_handler.callbacks) == 1
    trainer.train()
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("[round ")]
    assert [line.split("]")[0] for line in lines] == ["[round 0", "[round 1", "[round 2"]

    mine = RoundPrinterCallback(keys=("eval_loss",))
    trainer = _trainer(tmp_path, callbacks=[mine])
    printers = [cb for cb in trainer.callback_handler.callbacks if isinstance(cb, RoundPrinterCallback)]
    assert printers == [mine]


class _State:
    is_world_process_zero = True


def test_progress_bar_moves_with_each_local_step():
    bar = FederatedProgressCallback(total_client_rounds=4, initial=1, local_steps=3)
    state = _State()
    bar.on_client_begin(None, state, None, round=1, client=0)
    assert bar.bar.total == 12 and bar.bar.n == 3
    bar.on_step_end(None, state, None)
    assert bar.bar.n == 4, "the bar moves inside a client round"
    for _ in range(5):  # more steps than local_steps (never the case) cannot run past the client round
        bar.on_step_end(None, state, None)
    assert bar.bar.n == 6
    bar.on_client_end(None, state, None, round=1, client=0, metrics={"train_loss": 1.0})
    bar.on_client_begin(None, state, None, round=1, client=1)
    bar.on_client_end(None, state, None, round=1, client=1, metrics={"failed": "skipped"})
    assert bar.bar.n == 9, "a client round that ended early counts as its local_steps"
    bar.close()


def test_trainer_state_and_logged_epochs_describe_the_federation(tmp_path):
    import json

    trainer = _trainer(tmp_path, logging_steps=1, max_steps=2)  # the user's max_steps: replaced, not the run's length
    trainer.train()
    steps = FED["num_rounds"] * FED["num_clients"] * FED["local_steps"]
    assert trainer.state.global_step == steps and trainer.state.max_steps == steps
    assert trainer.state.epoch == FED["num_rounds"] and trainer.state.num_train_epochs == FED["num_rounds"]
    trainer.save_state()
    saved = json.loads((tmp_path / "trainer_state.json").read_text())
    assert saved["global_step"] == steps and saved["max_steps"] == steps
    logged = [(e["step"], e["epoch"]) for e in trainer.state.log_history if "loss" in e]
    assert [s for s, _ in logged] == list(range(1, steps + 1))  # one per optimizer step, counted over the run
    assert [e for _, e in logged] == [s / (FED["num_clients"] * FED["local_steps"]) for s, _ in logged]
