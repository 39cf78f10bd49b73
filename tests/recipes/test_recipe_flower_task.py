"""recipes/flower's task.py builds the server's and a client's trainer through the NLG recipe's build()."""

import json
import sys
from pathlib import Path

import pytest
from support.tiny import save_tiny_llama_checkpoint

ROOT = Path(__file__).resolve().parents[2]
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

    with pytest.raises(ValueError, match=r"recipe='nope': must be one of \['lm-cls', 'nlg', 'vit'\]"):
        build_trainer(None, {"recipe": "nope"})


def test_lm_classification_recipe_builds_the_same_way(ckpt, tmp_path):
    """The third recipe goes through the same parse_args/build contract: the app needs nothing recipe-specific."""
    from fedsmooth_flower.task import build_trainer

    rows = [{"text": f"sample {i} is {'ab'[i % 2]}", "label": "ab"[i % 2]} for i in range(30)]
    data = tmp_path / "mine.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    recipe_args = (f"--model_name_or_path {ckpt} --output_dir {tmp_path / 'out'} --num_clients 2 --partition iid "
                   f"--max_length 16 --disable_tqdm true --use_cpu true --data_files {data} --zeta_mode constant")
    server = build_trainer(None, {"recipe": "lm-cls", "recipe-args": recipe_args})
    assert server.eval_dataset is not None and len(server.client_datasets) == 2
    assert server.model.config.id2label == {0: "a", 1: "b"}
    assert server.strategy.config.zeta_mode == "constant"
    client = build_trainer(0, {"recipe": "lm-cls", "recipe-args": recipe_args, "local-data": True})
    assert client.eval_dataset is None and len(client.client_datasets) == 1
