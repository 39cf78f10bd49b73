"""What the text recipes load the same way: a user's data files or dataset, held-out split, subsets, tokenizer."""

from __future__ import annotations

import json
from pathlib import Path

FILE_KINDS = {"jsonl": "json", "json": "json", "csv": "csv", "parquet": "parquet"}
EVAL_SPLITS = ("validation", "test", "eval")


def load_user_data(dataset_name: str | None, dataset_config: str | None, data_files: list[str] | None,
                   eval_files: list[str] | None):
    """Loads the training rows and, where the source has them, the held-out rows.

    Args:
        dataset_name (`str`, *optional*): A `datasets` dataset (Hub name or local path); split `train`,
            held-out rows from `validation`, `test` or `eval`.
        dataset_config (`str`, *optional*): Its configuration name.
        data_files (`list[str]`, *optional*): JSON, JSON-lines, CSV or parquet files (taken before `dataset_name`).
        eval_files (`list[str]`, *optional*): Held-out files of the same kind.

    Returns:
        `(train, evals)`: two `datasets.Dataset`; `evals` is `None` when the source has no held-out rows.

    Raises:
        `ValueError`: an unsupported file extension, or a JSON-lines row that is not a JSON object
            (named by file and row).
    """
    import datasets

    if data_files is None:
        loaded = datasets.load_dataset(dataset_name, dataset_config)
        return loaded["train"], next((loaded[s] for s in EVAL_SPLITS if s in loaded), None)
    ext = Path(data_files[0]).suffix.lstrip(".")
    kind = FILE_KINDS.get(ext)
    if kind is None:
        raise ValueError(f"--data_files: unsupported extension '.{ext}' (use json, jsonl, csv or parquet)")
    files = {"train": data_files}
    if eval_files:
        files["eval"] = eval_files
    try:
        loaded = datasets.load_dataset(kind, data_files=files)
    except Exception as err:
        bad = first_bad_json_row([*data_files, *(eval_files or [])]) if kind == "json" else None
        if bad is None:
            raise
        raise ValueError(f"--data_files/--eval_files: {bad}") from err
    return loaded["train"], loaded["eval"] if "eval" in loaded else None


def first_bad_json_row(paths: list[str]) -> str | None:
    """Names the first line of a JSON-lines file that is not a JSON object.

    `datasets` reports a malformed file as a generic `DatasetGenerationError` with the cause far up
    the traceback; this names the file and the row. A file that parses as one JSON document is fine.

    Args:
        paths (`list[str]`): The files, in order.

    Returns:
        `str` or `None`: `"FILE: row N ..."`, or `None` when every file is well formed.
    """
    for path in paths:
        text = Path(path).read_text(encoding="utf-8")
        try:
            json.loads(text)
            continue
        except json.JSONDecodeError:
            pass
        for number, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                return f"{path}: row {number} is not valid JSON ({err.msg} at character {err.colno}): {line[:80]!r}"
            if not isinstance(row, dict):
                return f"{path}: row {number} is a JSON {type(row).__name__}, not an object of columns"
    return None


def hold_out(train, evals, seed: int, test_size: float = 0.05, stratify_by_column: str | None = None):
    """Returns `(train, evals)`; where `evals` is `None`, a seeded `test_size` share of `train` becomes it."""
    if evals is not None:
        return train, evals
    split = train.train_test_split(test_size=test_size, seed=seed, stratify_by_column=stratify_by_column)
    return split["train"], split["test"]


def subsample(dataset, limit: int | None, seed: int):
    """Returns at most `limit` rows of `dataset`, drawn by a seeded shuffle (all rows when `limit` is `None`)."""
    if limit is None:
        return dataset
    return dataset.shuffle(seed=seed).select(range(min(limit, len(dataset))))


def require_columns(dataset, columns: dict[str, str | None]) -> None:
    """Raises `ValueError` naming the flag whose column (`{flag: column}`) is not in `dataset`."""
    for flag, column in columns.items():
        if column is not None and column not in dataset.column_names:
            raise ValueError(f"--{flag} {column}: no such column in the training data; columns are "
                             f"{dataset.column_names}")


def load_tokenizer(path: str):
    """Returns the tokenizer at `path`, with a pad token (the eos token where it has none)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer
