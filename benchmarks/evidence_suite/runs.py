"""One run of an evidence sweep: a recipe built from options, trained, and summarized as one record.

The record holds what the issue's tables need: the configuration's name, seed, the per-round held-out
measures (index 0 = before training), the final ones, the training wall seconds to each round
(evaluation left out) and the run's wall and CPU seconds with the load average around it.
"""

from __future__ import annotations

import tempfile

from .sweep import timed_run


def recipe_argv(options: dict) -> list[str]:
    """Recipe command-line tokens; a comma-separated ``target_modules``/``modules_to_save`` becomes a list."""
    argv = []
    for key, value in options.items():
        listed = key in ("target_modules", "modules_to_save")
        argv += [f"--{key}", *str(value).split(",")] if listed else [f"--{key}", str(value)]
    return argv


def history_record(trainer, name: str, seed: int, metrics: tuple[str, ...]) -> dict:
    """Per-round measures of ``trainer.round_history``: ``<metric>`` lists, ``final_<metric>``, ``train_wall_s``."""
    history = trainer.round_history
    evals = [r for r in history if "eval_loss" in r]
    trained, wall = [], 0.0
    for r in history:
        wall += r.get("round_time_s", 0.0) - r.get("eval_time_s", 0.0)
        trained.append(wall)
    record = {"strategy": name, "seed": seed, "train_wall_s": trained,
              "strategy_overhead_s": sum(r.get("strategy_overhead_s", 0.0) for r in history),
              "local_train_time_s": sum(r.get("local_train_time_s", 0.0) for r in history)}
    for metric in metrics:
        record[metric] = [r[metric] for r in evals]
        record[f"final_{metric}"] = evals[-1][metric]
    return record


def trained(build, seed: int) -> tuple[dict, object]:
    """Seeds, builds (``build()`` returns a ``RecipeBuild``) and trains one federation, timed as a whole.

    Returns:
        `(record, trainer)`: the record holds the wall and CPU seconds and the load around the run.
    """
    from transformers import set_seed
    from transformers.trainer_callback import PrinterCallback

    def train() -> dict:
        set_seed(seed)  # before the build: the LoRA init draws from the global RNG
        trainer = build().make_trainer()
        trainer.remove_callback(PrinterCallback)  # the sweep prints one line per run
        trainer.train()
        return {"trainer": trainer}

    record = timed_run(train)
    return record, record.pop("trainer")


def run_nlg(name: str, options: dict, seed: int, rouge_new_tokens: int = 32) -> dict:
    """One NLG-recipe federation with ``options``; the record adds ROUGE-L of the final global model's answers."""
    import recipes.nlg_llama as nlg
    from benchmarks.generation_quality import greedy_answers, mean_rouge_l

    with tempfile.TemporaryDirectory() as out:
        args, fed_args, method, md = nlg.parse_args(recipe_argv({**options, "seed": seed, "output_dir": out,
                                                                 "disable_tqdm": True, "use_cpu": True}))
        tokenizer = nlg.load_tokenizer(nlg.model_path(md))
        data = nlg.load_data(md, tokenizer, 0, keep=("category",))  # seed 0: every run sees the same examples
        _, eval_raw = nlg.load_raw_data(md, 0)
        record, trainer = trained(lambda: nlg.build(args, fed_args, method, md, data=data), seed)
        prompts = [nlg.build_prompt(tokenizer, md, row[md.instruction_column], None) for row in eval_raw]
        with trainer.global_model() as model:
            answers = greedy_answers(model, tokenizer, prompts, max_new_tokens=rouge_new_tokens)
    references = list(eval_raw[md.output_column])
    return {**record, **history_record(trainer, name, seed, ("eval_loss",)),
            "local_steps": fed_args.local_steps, "num_rounds": fed_args.num_rounds, "eval_samples": len(data[1]),
            "rouge_l": mean_rouge_l(answers, references),
            "examples": [{"prompt": eval_raw[i][md.instruction_column], "answer": answers[i],
                          "reference": references[i]} for i in range(min(3, len(answers)))]}


def run_lm_classification(name: str, options: dict, seed: int) -> dict:
    """One LM-classification-recipe federation with ``options``; held-out loss and accuracy per round."""
    import recipes.lm_classification as cls

    with tempfile.TemporaryDirectory() as out:
        args, fed_args, method, la = cls.parse_args(recipe_argv({**options, "seed": seed, "output_dir": out,
                                                                 "disable_tqdm": True, "use_cpu": True}))
        data = cls.load_data(la, cls.load_tokenizer(cls.model_path(la)), 0)
        record, trainer = trained(lambda: cls.build(args, fed_args, method, la, data=data), seed)
    return {**record, **history_record(trainer, name, seed, ("eval_loss", "eval_accuracy")),
            "local_steps": fed_args.local_steps, "num_rounds": fed_args.num_rounds}
