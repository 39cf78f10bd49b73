"""Checkpoint files: safetensors + JSON only, atomic publishing, and hostile files rejected by name.

Every tampered checkpoint must raise ``CheckpointError`` (a ``ValueError``) naming the
key or the file, with no safetensors/JSON exception chained to it, and must leave the
loading trainer untouched.
"""

from __future__ import annotations

import ast
import hashlib
import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from support.tiny import make_counting_dataset
from support.trainers import tiny_trainer

from fedsmooth_hf.persistence.checkpoint import (
    MODEL_FILE,
    STATE_FILE,
    STRATEGY_FILE,
    CheckpointError,
    latest_checkpoint,
    save_checkpoint,
)

ROOT = Path(__file__).resolve().parents[2]
L0 = "base_model.model.model.layers.0.self_attn.q_proj"
L1 = "base_model.model.model.layers.1.mlp.down_proj"


def _trainer(output_dir, seed=42):
    fed = {"strategy": "fedsmoothlora", "num_clients": 3, "clients_per_round": 2, "num_rounds": 1, "local_steps": 1,
           "ga_samples": 8}
    return tiny_trainer(output_dir, fed=fed, train=make_counting_dataset(48), seed=seed)


@pytest.fixture(scope="module")
def written(tmp_path_factory):
    """A real round-1 checkpoint, and a fresh trainer of the same job to load tampered copies into."""
    out = tmp_path_factory.mktemp("written")
    _trainer(out).train()
    return out / "round-1", _trainer(tmp_path_factory.mktemp("loader"))


def _copy(written, tmp_path) -> Path:
    return Path(shutil.copytree(written[0], tmp_path / "round-1"))


def _rewrite_tensors(ckpt: Path, name: str, edit) -> None:
    """Edit a tensor file and record its new digest: a well-formed checkpoint of another model/run."""
    tensors = load_file(ckpt / name)
    edit(tensors)
    save_file(tensors, ckpt / name)
    data = (ckpt / name).read_bytes()
    digest = {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    _edit_state(ckpt, lambda s: s["files"].update({name: digest}))


def _edit_state(ckpt: Path, edit) -> None:
    state = json.loads((ckpt / STATE_FILE).read_text())
    edit(state)
    (ckpt / STATE_FILE).write_text(json.dumps(state))


def _truncate(ckpt: Path, name: str, keep: int) -> None:
    data = (ckpt / name).read_bytes()
    (ckpt / name).write_bytes(data[:keep])


def _flip_last_byte(ckpt: Path, name: str) -> None:
    data = bytearray((ckpt / name).read_bytes())
    data[-1] ^= 0xFF
    (ckpt / name).write_bytes(bytes(data))


def _drop_digests(ckpt: Path) -> None:
    _edit_state(ckpt, lambda s: s.pop("files"))


def _put(key, value):
    return lambda t: t.__setitem__(key, value)


def _map(key, fn):
    return lambda t: t.__setitem__(key, fn(t[key]))


# (id, how to tamper, what the error must say)
TAMPERS = [
    ("model-wrong-shape",
     lambda c: _rewrite_tensors(c, MODEL_FILE, _map(f"base/{L0}", lambda x: x[:, :16].contiguous())),
     rf"{MODEL_FILE} 'base/{L0}' is \(32, 16\) torch.float32, the model needs \(32, 32\) torch.float32"),
    ("model-wrong-dtype", lambda c: _rewrite_tensors(c, MODEL_FILE, _map(f"base/{L0}", lambda x: x.half())),
     rf"'base/{L0}' is \(32, 32\) torch.float16"),
    ("model-missing-key", lambda c: _rewrite_tensors(c, MODEL_FILE, lambda t: t.pop(f"base/{L1}")),
     rf"{MODEL_FILE} lacks tensor 'base/{L1}'"),
    ("model-extra-key", lambda c: _rewrite_tensors(c, MODEL_FILE, _put("base/base_model.model.bogus", torch.zeros(2))),
     r"unknown tensor 'base/base_model.model.bogus'"),
    ("model-residual-on-dense-layer", lambda c: _rewrite_tensors(c, MODEL_FILE, lambda t: t.update(
        {f"residual/{L0}/B": torch.zeros(32, 2), f"residual/{L0}/A": torch.zeros(2, 32)})),
     rf"unknown tensor 'residual/{L0}/[AB]'"),
    ("model-nan",
     lambda c: _rewrite_tensors(c, MODEL_FILE, lambda t: t[f"base/{L1}"].view(-1).__setitem__(3, float("nan"))),
     rf"'base/{L1}' contains NaN or Inf"),
    ("strategy-wrong-shape", lambda c: _rewrite_tensors(c, STRATEGY_FILE, _put(f"server/{L0}/B", torch.zeros(32, 5))),
     rf"{STRATEGY_FILE} 'server/{L0}/B' is \(32, 5\)"),
    ("strategy-wrong-dtype", lambda c: _rewrite_tensors(c, STRATEGY_FILE, _map(f"server/{L0}/A", lambda x: x.double())),
     rf"'server/{L0}/A' is \(4, 32\) torch.float64"),
    ("strategy-missing-partner", lambda c: _rewrite_tensors(c, STRATEGY_FILE, lambda t: t.pop(f"server/{L0}/A")),
     rf"has 'server/{L0}/B' but lacks 'server/{L0}/A'"),
    ("strategy-missing-layer",
     lambda c: _rewrite_tensors(c, STRATEGY_FILE, lambda t: [t.pop(f"server/{L1}/{f}") for f in "AB"]),
     rf"lacks 'server/{L1}/B'"),
    ("strategy-unknown-layer",
     lambda c: _rewrite_tensors(c, STRATEGY_FILE, _put("server/model.nope/B", torch.zeros(32, 4))),
     r"unknown tensor 'server/model.nope/B'"),
    ("strategy-key-the-strategy-ignores", lambda c: _rewrite_tensors(c, STRATEGY_FILE, lambda t: t.update(
        {"global/" + k[len("server/"):]: v.clone() for k, v in list(t.items()) if k.startswith("server/")})),
     r"tensor 'global/.*' that strategy 'fedsmoothlora' does not use"),
    ("fed-args-changed", lambda c: _edit_state(c, lambda s: s["fed_args"].update(lora_alpha=32.0)),
     r"written with FederatedArguments.lora_alpha=32.0, but this run has 8\b"),
    ("fed-args-unknown-field", lambda c: _edit_state(c, lambda s: s["fed_args"].update(warp_drive=True)),
     r"unknown FederatedArguments field 'warp_drive'"),
    ("seed-changed", lambda c: _edit_state(c, lambda s: s.update(seed=7)),
     r"written with TrainingArguments.seed=7, this run has 42"),
    ("state-missing-rng", lambda c: _edit_state(c, lambda s: s.pop("rng")), rf"{STATE_FILE} lacks 'rng'"),
    ("state-malformed-rng", lambda c: _edit_state(c, lambda s: s["rng"].update(torch=[1, 2, 3])),
     r"'rng' is malformed"),
    ("state-round-not-int", lambda c: _edit_state(c, lambda s: s.update(round="1")), r"'round' must be a int"),
    ("state-truncated", lambda c: _truncate(c, STATE_FILE, 100), rf"{STATE_FILE} is corrupt or truncated"),
    ("model-truncated", lambda c: _truncate(c, MODEL_FILE, 1000), rf"{MODEL_FILE} is 1000 bytes but was written with"),
    ("model-bit-flip", lambda c: _flip_last_byte(c, MODEL_FILE), rf"{MODEL_FILE} is corrupt \(its SHA-256 differs"),
    ("strategy-truncated-no-digest", lambda c: (_drop_digests(c), _truncate(c, STRATEGY_FILE, 1000)),
     rf"{STRATEGY_FILE} is not a readable safetensors file"),
    ("model-garbage-header-no-digest", lambda c: (_drop_digests(c), (c / MODEL_FILE).write_bytes(b"\xff" * 64)),
     rf"{MODEL_FILE} is not a readable safetensors file"),
    ("strategy-file-missing", lambda c: (c / STRATEGY_FILE).unlink(), rf"is incomplete: {STRATEGY_FILE} is missing"),
]


@pytest.mark.parametrize("tamper,message", [t[1:] for t in TAMPERS], ids=[t[0] for t in TAMPERS])
def test_tampered_checkpoint_is_rejected_by_name(written, tmp_path, tamper, message):
    ckpt = _copy(written, tmp_path)
    tamper(ckpt)
    trainer = written[1]
    weights = {n: layer.get_base_layer().weight.clone() for n, layer in trainer.layers.items()}
    strategy_state = dict(trainer.strategy.state_dict())
    with pytest.raises(CheckpointError, match=message) as info:
        trainer.load_federated_checkpoint(ckpt)
    err = info.value
    assert isinstance(err, ValueError) and str(ckpt) in str(err)
    assert err.__cause__ is None and (err.__context__ is None or err.__suppress_context__), "raw error chained"
    # validation happens before anything is loaded
    assert all(torch.equal(weights[n], layer.get_base_layer().weight) for n, layer in trainer.layers.items())
    assert trainer.strategy.state_dict().keys() == strategy_state.keys()


def test_untampered_copy_loads_and_digest_less_checkpoints_still_load(written, tmp_path):
    ckpt = _copy(written, tmp_path)
    _drop_digests(ckpt)  # as written before digests were recorded
    trainer = _trainer(tmp_path / "fresh")
    assert trainer.load_federated_checkpoint(ckpt) == 1
    saved = load_file(ckpt / MODEL_FILE)
    assert torch.equal(trainer.layers[L0].get_base_layer().weight, saved[f"base/{L0}"])


def test_checkpoint_holds_only_safetensors_and_json(written):
    ckpt = written[0]
    names = sorted(p.name for p in ckpt.iterdir())
    assert names == sorted([MODEL_FILE, STRATEGY_FILE, STATE_FILE])
    for name in (MODEL_FILE, STRATEGY_FILE):
        head = (ckpt / name).read_bytes()[:8]
        assert not head.startswith((b"\x80", b"PK\x03\x04")), f"{name} looks like a pickle / torch.save zip"
        with safe_open(str(ckpt / name), framework="pt") as f:
            assert len(list(f.keys())) > 0
    state = json.loads((ckpt / STATE_FILE).read_text())
    assert state["round"] == 1 and set(state["files"]) == {MODEL_FILE, STRATEGY_FILE}


def _pickle_uses(path: Path) -> list[str]:
    """``torch.load``/``torch.save``/pickle-family imports and calls in one source file."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name):
            if (node.value.id, node.attr) in {("torch", "load"), ("torch", "save"), ("np", "load"), ("numpy", "load")}:
                found.append(f"{path.name}:{node.lineno} {node.value.id}.{node.attr}")
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            modules = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""]
            found += [f"{path.name}:{node.lineno} import {m}" for m in modules
                      if m.split(".")[0] in {"pickle", "dill", "cloudpickle", "joblib", "marshal", "shelve"}]
    return found


def test_package_and_recipes_never_pickle():
    sources = [*(ROOT / "fedsmooth_hf").rglob("*.py"), *(ROOT / "recipes").rglob("*.py")]
    assert len(sources) > 10
    assert [use for p in sources for use in _pickle_uses(p)] == []


def test_pickle_scan_would_see_a_pickle(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text("import pickle\nimport torch\nx = torch.load('f.pt')\n")
    assert len(_pickle_uses(bad)) == 2


def test_latest_checkpoint_skips_temporaries_and_incomplete_dirs_and_save_cleans_them(tmp_path):
    one = {"w": torch.ones(2)}
    save_checkpoint(tmp_path, 1, one, one, {"fed_args": {}, "rng": {}})
    (tmp_path / ".round-2.tmp-99999").mkdir()  # a writer killed mid-write
    (tmp_path / ".round-2.tmp-99999" / MODEL_FILE).write_bytes(b"partial")
    (tmp_path / ".round-1.old-99999").mkdir()  # a writer killed after replacing round-1: stale
    shutil.copytree(tmp_path / "round-1", tmp_path / ".round-4.old-99999")  # killed between the two renames
    (tmp_path / "round-3").mkdir()  # not written by us: no files
    (tmp_path / "round-3" / STATE_FILE).write_text("{}")
    assert latest_checkpoint(tmp_path).name == "round-1"
    save_checkpoint(tmp_path, 2, one, one, {"fed_args": {}, "rng": {}})
    # the interrupted replacement of round-4 is put back; everything else temporary is gone
    assert sorted(p.name for p in tmp_path.iterdir()) == ["round-1", "round-2", "round-3", "round-4"]
    assert latest_checkpoint(tmp_path).name == "round-4"
    # rewriting an existing round replaces it whole
    save_checkpoint(tmp_path, 2, {"w": torch.zeros(2)}, one, {"fed_args": {}, "rng": {}})
    assert torch.equal(load_file(tmp_path / "round-2" / MODEL_FILE)["w"], torch.zeros(2))
    assert not [p for p in os.listdir(tmp_path) if p.startswith(".")]


def test_residuals_of_quantized_layers_are_checked_by_shape_and_pairing(tmp_path):
    """A 4-bit layer's merged update is saved as residual/<layer>/{B,A}: any rank, but paired and fitting."""
    from fedsmooth_hf.persistence.checkpoint_checks import check_model_tensors

    shapes = {"q": (32, 16)}
    q = {"residual/q/B": torch.ones(32, 3), "residual/q/A": torch.ones(3, 16)}
    check_model_tensors(tmp_path, q, {}, shapes)
    check_model_tensors(tmp_path, {}, {}, shapes)  # never merged yet: no residual at all
    with pytest.raises(CheckpointError, match=r"'residual/q/A' is \(3, 17\) torch.float32, the model needs \(3, 16\)"):
        check_model_tensors(tmp_path, {**q, "residual/q/A": torch.ones(3, 17)}, {}, shapes)
    with pytest.raises(CheckpointError, match=r"has 'residual/q/B' but lacks 'residual/q/A'"):
        check_model_tensors(tmp_path, {"residual/q/B": torch.ones(32, 3)}, {}, shapes)
    with pytest.raises(CheckpointError, match=r"unknown tensor 'residual/k/B'"):
        k = {"residual/k/B": torch.ones(32, 3), "residual/k/A": torch.ones(3, 16)}
        check_model_tensors(tmp_path, k, {}, shapes)


def test_save_rounds_minus_one_writes_no_federated_checkpoint(make_trainer, tmp_path):
    trainer = make_trainer(fed=dict(strategy="fedit", num_rounds=2, local_steps=1, save_rounds=-1))
    trainer.train()
    assert len(trainer.round_history) == 2
    assert not list(tmp_path.rglob("round-*")) and not list(tmp_path.rglob(".round-*"))
