"""What travels: a strategy's upload in its wire form (``encode_upload``) and back (``decode_upload``)."""

import pytest
import torch

from fedsmooth_hf.strategies import available_strategies, get_strategy

SHAPES = {"layer.a": (12, 20), "layer.b": (16, 10)}
R = 4


def _strategy(name, ranks=None):
    gen = torch.Generator().manual_seed(0)
    strat = get_strategy(name, rank=R)
    strat.setup({n: (torch.zeros(o, R), torch.randn(R, i, generator=gen)) for n, (o, i) in SHAPES.items()})
    if ranks:
        strat.set_client_ranks(ranks)
    return strat


def _trained(strat, client):
    """A client's upload after local training: FFA-LoRA's A stays its start (frozen), B moved."""
    start = strat.client_start(client, None)
    gen = torch.Generator().manual_seed(10 + client)
    trained = {n: (B + torch.randn(B.shape, generator=gen),
                   A if not start.train_A else A + torch.randn(A.shape, generator=gen))
               for n, (B, A) in start.lora.items()}
    return strat.client_upload(client, trained)


@pytest.mark.parametrize("ranks", [None, [2, 4]], ids=["rank4", "ranks2and4"])
def test_ffa_lora_sends_only_b_and_rebuilds_the_shared_a(ranks):
    client_side, server_side = _strategy("ffa_lora", ranks), _strategy("ffa_lora", ranks)
    for client in (0, 1):
        upload = _trained(client_side, client)
        wire = client_side.encode_upload(client, upload)
        assert sorted(wire) == sorted(f"lora/{n}/B" for n in SHAPES)  # no A on the wire
        k = client_side.client_rank(client)
        assert all(t.shape[1] == k for t in wire.values())
        sent = sum(t.numel() for t in wire.values())
        assert sent == sum(o * k for o, _ in SHAPES.values())  # r_c * d_out numbers per module
        back = server_side.decode_upload(client, wire)
        assert back.keys() == upload.keys()
        for n, (B, A) in upload.items():
            assert torch.equal(back[n][0], B) and torch.equal(back[n][1], A), n


@pytest.mark.parametrize("name", [n for n in available_strategies() if n != "ffa_lora"])
def test_other_strategies_send_both_factors_unchanged(name):
    strat = _strategy(name)
    upload = {n: (torch.randn(o, 3), torch.randn(3, i)) for n, (o, i) in SHAPES.items()}
    wire = strat.encode_upload(0, upload)
    assert sorted(wire) == sorted(f"lora/{n}/{f}" for n in SHAPES for f in "BA")
    back = strat.decode_upload(0, wire)
    for n, (B, A) in upload.items():
        assert torch.equal(back[n][0], B) and torch.equal(back[n][1], A), n
