"""recipes/flower's task.py builds the server's and a client's trainer through the NLG recipe's build()."""

import json
import sys
from pathlib import Path

import pytest
from conftest import save_tiny_llama_checkpoint

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "recipes" / "flower"))


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return save_tiny_llama_checkpoint(tmp_path_factory.mktemp("tiny_llama_ckpt"))


def test_server_and_local_data_client_trainers(ckpt, tmp_path):
    from fedsmooth_flower.task import build_trainer

    rows = [{"instruction": f"Say {i}.", "output": f"number {i}", "play": "ab"[i % 2]} for i in range(24)]
    data = tmp_path / "mine.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    recipe_args = (f"--model_name_or_path {ckpt} --output_dir {tmp_path / 'out'} --num_clients 2 "
                   f"--partition column --partition_column play --max_length 64 --disable_tqdm true "
                   f"--data_files {data}")
    server = build_trainer(None, {"recipe": "nlg", "recipe-args": recipe_args})
    assert server.eval_dataset is not None and len(server.client_datasets) == 2
    assert server.fed_args.clients_per_round == 2  # the recipe's default 4, capped at num_clients
    assert all("play" in c.column_names for c in server.client_datasets)

    client = build_trainer(1, {"recipe": "nlg", "recipe-args": recipe_args, "local-data": True})
    assert client.eval_dataset is None
    assert (client.fed_args.num_clients, len(client.client_datasets)) == (1, 1)
    assert len(client.client_datasets[0]) == sum(len(c) for c in server.client_datasets)

    with pytest.raises(ValueError, match="recipe='nope'"):
        build_trainer(None, {"recipe": "nope"})
