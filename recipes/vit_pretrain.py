"""The ViT recipe's offline model: a small ViT pretrained here on a disjoint source task, then a fresh head.

No pretrained ViT can be downloaded offline, so the recipe's default first trains a small ViT from
scratch on scikit-learn's bundled 8x8 digits (upsampled to 28x28) with a plain `transformers.Trainer`,
and puts a fresh, randomly initialised head for the target classes on its body.
"""

from __future__ import annotations

import math
import tempfile
import time

from transformers import (
    Trainer,
    TrainingArguments,
    ViTConfig,
    ViTForImageClassification,
    default_data_collator,
)

from fedsmooth_hf.engine.local_round import unpinned_without_accelerator
from recipes.classification import LABEL, compute_accuracy, label_maps

IMAGE_SIZE = 28
SOURCE_TASK = "sklearn-digits"


def digits_source_task(seed: int):
    """The source task: scikit-learn's 1797 bundled 8x8 digits as 28x28 images in [0, 1].

    The 8x8 images are upsampled bilinearly to 24x24 and padded by 2, so they have Fashion-MNIST's
    shape, value range and centring, with smooth strokes rather than 3x3 pixel blocks.

    Args:
        seed (`int`): Seed of the stratified 90/10 split.

    Returns:
        `(train, holdout)`: torch-formatted datasets with `pixel_values` (1x28x28) and `label`.
    """
    import torch
    from datasets import Array3D, ClassLabel, Dataset, Features
    from sklearn.datasets import load_digits

    digits = load_digits()
    small = torch.from_numpy(digits.images / 16.0).float()[:, None]
    images = torch.nn.functional.interpolate(small, size=(24, 24), mode="bilinear", align_corners=False)
    images = torch.nn.functional.pad(images, (2, 2, 2, 2)).clamp(0, 1).numpy()
    features = Features({"pixel_values": Array3D((1, IMAGE_SIZE, IMAGE_SIZE), "float32"),
                         LABEL: ClassLabel(names=[str(d) for d in range(10)])})
    ds = Dataset.from_dict({"pixel_values": images, LABEL: digits.target}, features=features)
    split = ds.train_test_split(test_size=0.1, seed=seed, stratify_by_column=LABEL)
    return split["train"].with_format("torch"), split["test"].with_format("torch")


class RandomAffineCollator:
    """Batches like `default_data_collator`, then applies a random rotation, scale and shift per image.

    Augmenting the small source task makes the pretrained features less specific to it.

    Args:
        seed (`int`): Seed of the collator's own generator.
        degrees (`float`, *optional*, defaults to 15.0): Largest rotation either way.
        scale (`tuple[float, float]`, *optional*, defaults to `(0.8, 1.15)`): Range of the zoom.
        shift (`float`, *optional*, defaults to 0.15): Largest shift, as a share of the image.
    """

    def __init__(self, seed: int, degrees: float = 15.0, scale: tuple[float, float] = (0.8, 1.15),
                 shift: float = 0.15):
        import torch

        self.generator = torch.Generator().manual_seed(seed)
        self.degrees, self.scale, self.shift = degrees, scale, shift

    def __call__(self, features):
        import torch

        batch = default_data_collator(features)
        x = batch["pixel_values"]
        n, g = x.shape[0], self.generator
        angle = (torch.rand(n, generator=g) * 2 - 1) * math.radians(self.degrees)
        scale = self.scale[0] + torch.rand(n, generator=g) * (self.scale[1] - self.scale[0])
        shift = (torch.rand(n, 2, generator=g) * 2 - 1) * self.shift
        cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
        theta = torch.stack([torch.stack([cos, -sin, shift[:, 0]], 1), torch.stack([sin, cos, shift[:, 1]], 1)], 1)
        grid = torch.nn.functional.affine_grid(theta, list(x.shape), align_corners=False)
        batch["pixel_values"] = torch.nn.functional.grid_sample(x, grid, align_corners=False)
        return batch


def small_vit_config(va, num_labels: int, class_names: list[str] | None = None) -> ViTConfig:
    """The small ViT's config for 28x28 grayscale images.

    Args:
        va (`VitArguments`): The recipe's arguments (`vit_hidden_size`, `vit_layers`, `vit_heads`, `patch_size`).
        num_labels (`int`): Number of classes of the head.
        class_names (`list[str]`, *optional*): Their names; defaults to `"0"`, `"1"`, ...

    Raises:
        `ValueError`: a patch size that does not divide 28, or a hidden size not divisible by the heads.
    """
    if IMAGE_SIZE % va.patch_size:
        raise ValueError(f"VitArguments.patch_size={va.patch_size}: must divide the image size {IMAGE_SIZE}")
    if va.vit_hidden_size % va.vit_heads:
        raise ValueError(f"VitArguments.vit_hidden_size={va.vit_hidden_size} must be divisible by "
                         f"vit_heads={va.vit_heads}")
    names = class_names or [str(i) for i in range(num_labels)]
    return ViTConfig(
        image_size=IMAGE_SIZE, patch_size=va.patch_size, num_channels=1,
        hidden_size=va.vit_hidden_size, intermediate_size=2 * va.vit_hidden_size,
        num_hidden_layers=va.vit_layers, num_attention_heads=va.vit_heads,
        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, num_labels=num_labels, **label_maps(names),
    )


def describe(va) -> str:
    """What the offline model is, as reports name it."""
    shape = f"small ViT (hidden {va.vit_hidden_size}, {va.vit_layers} layers)"
    if va.pretrain_steps <= 0:
        return f"{shape} from scratch"
    return f"{shape} pretrained {va.pretrain_steps} steps on sklearn digits"


def pretrain_small_vit(va, args: TrainingArguments, main_proc: bool) -> tuple:
    """Trains a small ViT from scratch on sklearn digits (the disjoint source task) with a plain `Trainer`.

    Args:
        va (`VitArguments`): The recipe's arguments (the small ViT's shape and the `pretrain_*` fields).
        args (`TrainingArguments`): The run's arguments (`seed`, `use_cpu`, `per_device_eval_batch_size`).
        main_proc (`bool`): Whether this process prints.

    Returns:
        `(model, info)`: the trained model (CPU, eval mode) and what the pretraining did (task, steps,
        training examples, training loss, holdout accuracy, seconds). With `pretrain_steps=0` the
        model keeps its random initialisation.
    """
    import torch

    if main_proc and va.pretrain_steps > 0:
        print(f"[recipe] No pretrained ViT is available offline: pretraining a small ViT on sklearn digits "
              f"(a disjoint source task) for {va.pretrain_steps} steps (hidden {va.vit_hidden_size}, "
              f"{va.vit_layers} layers, {va.vit_heads} heads, patch {va.patch_size}) ...", flush=True)
    t0 = time.perf_counter()
    train, holdout = digits_source_task(args.seed)
    torch.manual_seed(args.seed)
    model = ViTForImageClassification(small_vit_config(va, 10))
    info = {"task": SOURCE_TASK, "steps": va.pretrain_steps, "train_examples": len(train)}
    if va.pretrain_steps > 0:
        with tempfile.TemporaryDirectory(prefix="vit_pretrain_") as scratch:  # Trainer wants a dir; nothing is kept
            pre_args = TrainingArguments(
                output_dir=scratch, max_steps=va.pretrain_steps, per_device_train_batch_size=va.pretrain_batch_size,
                per_device_eval_batch_size=args.per_device_eval_batch_size, learning_rate=va.pretrain_learning_rate,
                weight_decay=0.05, warmup_steps=max(1, va.pretrain_steps // 10), lr_scheduler_type="cosine",
                logging_steps=max(1, va.pretrain_steps // 4), save_strategy="no", report_to="none",
                disable_tqdm=True, seed=args.seed, use_cpu=args.use_cpu,
            )
            trainer = Trainer(model=model, args=pre_args, train_dataset=train, eval_dataset=holdout,
                              data_collator=RandomAffineCollator(args.seed), compute_metrics=compute_accuracy)
            with unpinned_without_accelerator(pre_args):  # no pinned memory without an accelerator (torch warns)
                out = trainer.train()
                trainer.data_collator = default_data_collator  # evaluate on the images as they are
                metrics = trainer.evaluate()
            info.update(train_loss=float(out.training_loss), holdout_accuracy=float(metrics["eval_accuracy"]))
            model = trainer.model
            del trainer
    info["time_s"] = time.perf_counter() - t0
    if main_proc and va.pretrain_steps > 0:
        acc = info.get("holdout_accuracy")
        print(f"[recipe] source-task pretraining done in {info['time_s']:.1f} s"
              + (f": digits holdout accuracy {acc:.3f}" if acc is not None else ""), flush=True)
    return model.cpu().eval(), info


def head_free_weights(model) -> dict:
    """Returns a pretrained model's weights without its classification head: the body a new task starts from."""
    return {k: v for k, v in model.state_dict().items() if not k.startswith("classifier.")}


def small_vit_with_fresh_head(va, class_names: list[str], body: dict | None, seed: int):
    """The small ViT for the target classes: `body` (or random weights) and a fresh head.

    Args:
        va (`VitArguments`): The recipe's arguments (the small ViT's shape).
        class_names (`list[str]`): The target classes.
        body (`dict`, *optional*): Weights of everything but the head, from [`head_free_weights`].
        seed (`int`): The head is initialised under `torch.manual_seed(seed + 1)`.

    Raises:
        `RuntimeError`: a body that does not fit the ViT's shape.
    """
    import torch

    torch.manual_seed(seed + 1)
    model = ViTForImageClassification(small_vit_config(va, len(class_names), class_names))
    if body is not None:
        missing, unexpected = model.load_state_dict(body, strict=False)
        if unexpected or any(not k.startswith("classifier.") for k in missing):
            raise RuntimeError(f"pretrained body does not fit the target ViT: missing {missing}, "
                               f"unexpected {unexpected}")
    return model


def offline_model(va, args: TrainingArguments, class_names: list[str], main_proc: bool, body: dict | None = None):
    """The offline default's model: the pretrained small ViT with a fresh head for the target classes.

    Args:
        va (`VitArguments`): The recipe's arguments.
        args (`TrainingArguments`): The run's arguments.
        class_names (`list[str]`): The target classes.
        main_proc (`bool`): Whether this process prints.
        body (`dict`, *optional*): A body pretrained before (a caller's cache); by default it is pretrained here.

    Returns:
        `(model, info)`: the model (eval mode) and what its pretraining did (`None` for a given body).
    """
    info = None
    if body is None:
        pretrained, info = pretrain_small_vit(va, args, main_proc)
        body = head_free_weights(pretrained)
    model = small_vit_with_fresh_head(va, class_names, body, args.seed)
    if main_proc and info is not None and va.pretrain_steps > 0:
        print(f"[recipe] replaced the digits head by a fresh {len(class_names)}-class head for the target task")
    return model.eval(), info


def offline_image_processor():
    """A processor for 28x28 grayscale images (scaled to [0, 1], not normalised), saved with the model."""
    import transformers

    cls = getattr(transformers, "ViTImageProcessorPil", None) or transformers.ViTImageProcessor
    return cls(size={"height": IMAGE_SIZE, "width": IMAGE_SIZE}, do_resize=True, do_rescale=True, do_normalize=False,
               image_mean=[0.0], image_std=[1.0])
