"""The ViT recipe's data: the offline Fashion-MNIST default, or any `datasets` image dataset or image folder."""

from __future__ import annotations

import numpy as np

from recipes.classification import LABEL, encode_labels, label_maps
from recipes.loading import hold_out, subsample

# Sizes of the offline default when --max_train_samples / --max_eval_samples are not given.
OFFLINE_MAX_TRAIN = 12000
OFFLINE_MAX_EVAL = 2000


def load_offline_data(va, seed: int, main_proc: bool = True) -> tuple:
    """The offline default's data: Fashion-MNIST (Debian's `dataset-fashion-mnist`), else sklearn digits (said).

    Args:
        va (`VitArguments`): The recipe's arguments (`max_train_samples`, `max_eval_samples`).
        seed (`int`): Seed of the balanced subsets.
        main_proc (`bool`, *optional*, defaults to `True`): Whether this process prints.

    Returns:
        `(train, evals, class_names, source)`: torch-formatted datasets with `pixel_values` and `label`.
    """
    from recipes.offline_assets import load_image_classification_data

    max_train = va.max_train_samples if va.max_train_samples is not None else OFFLINE_MAX_TRAIN
    max_eval = va.max_eval_samples if va.max_eval_samples is not None else OFFLINE_MAX_EVAL
    train, evals, class_names, source = load_image_classification_data(max_train, max_eval, seed=seed)
    if main_proc:
        print(f"[recipe] offline default data: {source} ({len(train)} train / {len(evals)} eval images, "
              f"{len(class_names)} classes)", flush=True)
        if source != "fashion-mnist":
            print("[recipe] WARNING: Fashion-MNIST is missing (apt-get install dataset-fashion-mnist); the "
                  "target task falls back to sklearn digits, so source and target tasks are NOT disjoint")
    return train, evals, class_names, source


def load_hub_data(va, seed: int) -> tuple:
    """A user's images: `load_dataset(dataset_name)` or an image folder; held-out rows from test/validation.

    Args:
        va (`VitArguments`): The recipe's arguments (dataset, columns, subset sizes).
        seed (`int`): Seed of the held-out split (a stratified 10% where the dataset has none) and subsets.

    Returns:
        `(train, evals, class_names, source)`: raw datasets with the image column and an integer `label`.

    Raises:
        `ValueError`: no dataset given, no `train` split, or a column that is not there.
    """
    import datasets

    if va.dataset_name is None and va.train_dir is None:
        raise ValueError("--model_name_or_path needs data: give --dataset_name (or --dataset_name imagefolder "
                         "--train_dir DIR); the offline Fashion-MNIST default only goes with the offline model")
    if va.dataset_name in (None, "imagefolder"):
        if va.train_dir is None:
            raise ValueError("--dataset_name imagefolder needs --train_dir")
        loaded = datasets.load_dataset("imagefolder", data_dir=va.train_dir)
    else:
        loaded = datasets.load_dataset(va.dataset_name, va.dataset_config)
    if "train" not in loaded:
        raise ValueError(f"dataset {va.dataset_name or va.train_dir} has no 'train' split (splits: {list(loaded)})")
    train = loaded["train"]
    evals = next((loaded[s] for s in ("test", "validation", "valid", "eval") if s in loaded), None)
    for col in (va.image_column, va.label_column):
        if col not in train.column_names:
            arg = "image_column" if col == va.image_column else "label_column"
            raise ValueError(f"--{arg} {col}: no such column in the training data; columns are {train.column_names}")
    stratify = va.label_column if isinstance(train.features[va.label_column], datasets.ClassLabel) else None
    train, evals = hold_out(train, evals, seed, test_size=0.1, stratify_by_column=stratify)
    train, evals, class_names = encode_labels(train, evals, va.label_column)
    keep = {va.image_column, LABEL}
    train = train.remove_columns([c for c in train.column_names if c not in keep])
    evals = evals.remove_columns([c for c in evals.column_names if c not in keep])
    train, evals = subsample(train, va.max_train_samples, seed), subsample(evals, va.max_eval_samples, seed)
    return train, evals, class_names, va.dataset_name or f"imagefolder:{va.train_dir}"


def image_transform(processor, image_column: str, num_channels: int):
    """Returns a `with_transform` function: images -> the processor's `pixel_values`, labels kept."""
    from PIL import Image

    mode = {1: "L", 3: "RGB"}.get(num_channels)

    def transform(batch):
        images = []
        for image in batch[image_column]:
            if not isinstance(image, Image.Image):
                image = Image.fromarray(np.asarray(image))
            images.append(image.convert(mode) if mode and image.mode != mode else image)
        pixel_values = processor(images=images, return_tensors="pt")["pixel_values"]
        return {"pixel_values": pixel_values, LABEL: batch[LABEL]}

    return transform


def load_checkpoint(va, train, evals, class_names: list[str]) -> tuple:
    """Any image-classification checkpoint with a fresh head for `class_names`, and the data it reads.

    Args:
        va (`VitArguments`): The recipe's arguments (`model_name_or_path`, `image_column`).
        train (`datasets.Dataset`): Raw training images from [`load_hub_data`].
        evals (`datasets.Dataset`): Raw held-out images.
        class_names (`list[str]`): The target classes.

    Returns:
        `(model, processor, train, evals)`: the datasets now transform images to `pixel_values` on access.
    """
    from transformers import AutoImageProcessor, AutoModelForImageClassification

    processor = AutoImageProcessor.from_pretrained(va.model_name_or_path)
    model = AutoModelForImageClassification.from_pretrained(
        va.model_name_or_path, num_labels=len(class_names), **label_maps(class_names),
        ignore_mismatched_sizes=True,  # the checkpoint's head (if any) is replaced by a fresh one
    )
    transform = image_transform(processor, va.image_column, getattr(model.config, "num_channels", 3))
    train.set_transform(transform)
    evals.set_transform(transform)
    return model, processor, train, evals
