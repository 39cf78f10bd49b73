"""The flat layout's module paths still import, from their new homes, with a FutureWarning."""

from __future__ import annotations

import subprocess
import sys

import pytest

from fedsmooth_hf._moved import MOVED


def _run(code: str) -> str:
    out = subprocess.run([sys.executable, "-W", "always::FutureWarning", "-c", code], capture_output=True,
                         text=True, check=True)
    return out.stdout + out.stderr


def test_old_paths_give_the_new_objects_and_warn():
    out = _run(
        "import fedsmooth_hf.math.lowrank as new, fedsmooth_hf.engine.sequential as seq\n"
        "from fedsmooth_hf.lowrank import truncated_svd\n"
        "from fedsmooth_hf.rounds import SequentialExecutor, RoundEngine, ClientTrainingError\n"
        "from fedsmooth_hf.client_rank import pad_factors, resolve_client_ranks\n"
        "from fedsmooth_hf import hub\n"
        "assert truncated_svd is new.truncated_svd and SequentialExecutor is seq.SequentialExecutor\n"
        "assert hub.model_card.__module__ == 'fedsmooth_hf.persistence.hub'\n"
        "print('ok')\n")
    assert "ok" in out
    assert "fedsmooth_hf.rounds moved to fedsmooth_hf.engine.rounds" in out
    assert "fedsmooth_hf.lowrank moved to fedsmooth_hf.math.lowrank" in out


@pytest.mark.parametrize("old", sorted(MOVED))
def test_every_old_module_resolves_to_existing_modules(old):
    import importlib

    for target in MOVED[old]:
        importlib.import_module(f"fedsmooth_hf.{target}")


def test_a_name_that_never_existed_says_where_the_module_went():
    with pytest.raises(AttributeError, match="moved to fedsmooth_hf.math.lowrank"):
        _ = __import__("fedsmooth_hf.lowrank", fromlist=["x"]).no_such_name
