"""Your own data in one step: a JSON-lines file of someone else's text through the NLG recipe's documented command.

The data: the licence texts Debian ships in /usr/share/common-licenses (package ``base-files``,
on every Debian system; the ``fortunes`` packages are not installed on the test machine), one
category per licence file: each row asks to continue a line of a licence with its next line.
The command is docs/recipes.md's own-data line, run as written under ``accelerate launch`` with
size flags added (a tiny Llama with SmolLM2's tokenizer, 2 rounds of 1 step).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from support.doc_commands import ROOT, block_commands
from support.tiny import save_tiny_llama_checkpoint

LICENSES = Path("/usr/share/common-licenses")
CATEGORIES = ["Apache-2.0", "GPL-3", "MPL-2.0", "Artistic"]
BIN = Path(sys.executable).parent


def licence_jsonl(path: Path) -> Path:
    """instruction/output/category rows from the licence texts: continue a line with the next one."""
    rows = []
    for name in CATEGORIES:
        lines = [" ".join(line.split()) for line in (LICENSES / name).read_text(errors="replace").splitlines()]
        lines = [line for line in lines if len(line) > 20]
        rows += [{"instruction": f'Continue this line of a software licence: "{line}"', "output": following,
                  "category": name} for line, following in zip(lines, lines[1:])]
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def documented_command() -> str:
    """docs/recipes.md's one-step own-data command (the one split by ``category``)."""
    found = [c.text for c in block_commands(ROOT / "docs" / "recipes.md")
             if "--data_files mine.jsonl" in c.text and "--partition_column category" in c.text]
    assert found, "docs/recipes.md has no own-data command split by category"
    return found[0]


def test_own_licence_data_in_one_step(tmp_path):
    assert all((LICENSES / name).is_file() for name in CATEGORIES), "base-files' common-licenses are missing"
    data = licence_jsonl(tmp_path / "mine.jsonl")
    assert len(data.read_text().splitlines()) > 400
    ckpt = save_tiny_llama_checkpoint(tmp_path / "tiny")
    command = documented_command()
    assert command.startswith("accelerate launch recipes/nlg_llama.py --data_files mine.jsonl --partition column")
    sizes = (f"--model_name_or_path {ckpt} --output_dir {tmp_path / 'out'} --num_clients 4 --clients_per_round 4 "
             "--num_rounds 2 --local_steps 1 --max_train_samples 64 --max_eval_samples 8 "
             "--per_device_train_batch_size 4 "
             "--ga_samples 4 --ga_batch_size 4 --max_length 64 --max_new_tokens 4 --disable_tqdm true")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
           "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}"}
    (tmp_path / "recipes").symlink_to(ROOT / "recipes")
    done = subprocess.run(["bash", "-c", f"{command} {sizes}"], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=480)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-4000:]
    out = done.stdout

    # the partition table: one client per licence (the column split), each holding one category only
    table = out[out.index("top category"):]
    tops = re.findall(r"^\s+(\d)\s+\d+\s+[\d.]+%\s+(\S+):100%", table, re.M)
    assert sorted(top for _, top in tops) == sorted(CATEGORIES), table[:1500]
    # the global model's held-out loss before training and after every round
    losses = [float(v) for v in re.findall(r"^\[round \d\].*?eval_loss=([\d.]+)", out, re.M)]
    assert len(losses) == 3 and losses[-1] < losses[0], out[-3000:]
    assert "[recipe] before training:" in out and "[recipe] after training:" in out

    # the merged model is a plain causal LM that generates
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "out")
    assert not any("lora" in name for name in model.state_dict())
    prompt = tokenizer("Continue this line of a software licence:", return_tensors="pt")
    with torch.no_grad():
        generated = model.generate(**prompt, max_new_tokens=5, do_sample=False)
    assert generated.shape[1] == prompt["input_ids"].shape[1] + 5


@pytest.mark.parametrize("name", CATEGORIES)
def test_licence_rows_are_the_licence_text(tmp_path, name):
    rows = [json.loads(line) for line in licence_jsonl(tmp_path / "mine.jsonl").read_text().splitlines()]
    mine = [r for r in rows if r["category"] == name]
    text = " ".join((LICENSES / name).read_text(errors="replace").split())
    assert len(mine) > 50 and all(r["output"] in text for r in mine)
    assert set(rows[0]) == {"instruction", "output", "category"}
