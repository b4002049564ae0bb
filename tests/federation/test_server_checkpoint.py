"""The server's checkpoint: every client's start stored once as one start basis, a resumed server
delivers bitwise what an uninterrupted one does, and checkpoints from before the basis still load.
"""

from __future__ import annotations

import json

import pytest
import torch

from rblora.aggregation import ClientUpdate
from rblora.federation.rundir import RunFolder
from rblora.federation.server import FederatedServer
from rblora.protocol.codec import encode
from rblora.protocol.types import ClientSpec

SHAPES = {"m.q": (12, 10), "m.v": (8, 10)}  # module -> (d_out, d_in)
RANKS = [1, 2, 2, 4, 8]
# every method and redistribution whose clients start from a projection (not merge)
PREFIX_METHODS = [
    ("RB-LoRA", None),  # svd
    ("RB-LoRA (factor)", None),  # svd
    ("FlexLoRA", None),  # svd
    ("Weighted HETLoRA", None),  # truncate
    ("Uniform HETLoRA", "svd"),
    ("FLoRA", "svd"),
    ("FLoRA", "truncate"),
]


def _specs():
    # the widest client uses rsLoRA, another a different alpha: each start divides its own scale
    return [
        ClientSpec(k, r, 16.0 if k != 1 else 4.0, use_rslora=(k == 4), num_examples=5 + 7 * k)
        for k, r in enumerate(RANKS)
    ]


def _trained(spec, start, round_):
    """What client ``spec`` hands back after round ``round_``: its start (or a random fresh
    LoRA) moved by seeded noise, so any difference in the start carries into the next round."""
    g = torch.Generator().manual_seed(1000 * round_ + spec.client_id)
    factors = {}
    r = spec.rank
    for m, (d_out, d_in) in SHAPES.items():
        a, b = start[m] if start else (torch.zeros(r, d_in), torch.zeros(d_out, r))
        da, db = torch.randn(r, d_in, generator=g), torch.randn(d_out, r, generator=g)
        factors[m] = (a + da, b + 0.1 * db)
    return ClientUpdate(
        spec.num_examples, spec.lora_alpha, factors, use_rslora=spec.use_rslora,
        client_id=spec.client_id,
    )  # fmt: skip


def _play(server, rounds):
    """Run ``rounds`` on ``server``; returns every start delivered, round by round."""
    delivered = []
    for t in rounds:
        starts = {k: server.deliver(k) for k in server.select(t)}
        updates = [_trained(server.clients[k], s.factors, t) for k, s in starts.items()]
        server.redistribute(server.aggregate(updates))
        delivered.append(starts)
    return delivered


def _server(method, reduction):
    return FederatedServer(method, _specs(), reduction=reduction, frac=0.4, seed=3)


def _through_files(server, tmp_path):
    """A new server restored from ``server``'s checkpoint, written to and read from disk."""
    folder = RunFolder(tmp_path)
    folder.save_checkpoint(*server.state_tensors())
    tensors, meta = folder.load_checkpoint()
    again = FederatedServer(server.method, server.clients, reduction=server.reduction,
                            frac=server.frac, seed=server.seed)  # fmt: skip
    again.load_state_tensors(tensors, meta)
    return again


def _assert_same_starts(got, want):
    assert got.keys() == want.keys()
    for k in want:
        assert got[k].download_bytes == want[k].download_bytes
        if want[k].factors is None:
            assert got[k].factors is None
            continue
        for m, (a, b) in want[k].factors.items():
            assert a.dtype == got[k].factors[m][0].dtype
            assert torch.equal(got[k].factors[m][0], a), (k, m, "A")
            assert torch.equal(got[k].factors[m][1], b), (k, m, "B")


@pytest.mark.parametrize(("method", "reduction"), PREFIX_METHODS)
def test_checkpoint_stores_the_starts_once_as_wide_as_the_largest_rank(method, reduction):
    server = _server(method, reduction)
    server.redistribute(server.aggregate([_trained(s, None, 1) for s in server.clients]))
    tensors, _ = server.state_tensors()
    stored = sum(t.numel() for key, t in tensors.items() if not key.startswith("server/"))
    widest, total = max(RANKS), sum(RANKS)
    assert stored == sum(widest * (d_in + d_out) for d_out, d_in in SHAPES.values())
    assert stored < sum(total * (d_in + d_out) for d_out, d_in in SHAPES.values())


@pytest.mark.parametrize(("method", "reduction"), PREFIX_METHODS)
def test_a_resumed_server_delivers_bitwise_what_an_uninterrupted_one_does(
    method, reduction, tmp_path
):
    full = _play(_server(method, reduction), range(1, 5))
    cut = _server(method, reduction)
    first = _play(cut, [1, 2])
    resumed = _through_files(cut, tmp_path)
    rest = _play(resumed, [3, 4])
    for got, want in zip(first + rest, full, strict=True):
        _assert_same_starts(got, want)
    # partial selection: some round's update had fewer components than the widest client
    # (HETLoRA and truncate: orthonormal rows completed the basis) and was still resumed exactly
    assert any(8 not in [RANKS[k] for k in starts] for starts in full[1:])


def test_a_checkpoint_written_before_the_start_basis_resumes_as_it_was():
    """Older checkpoints hold one start per client under ``start/<k>`` (``meta["starts"]``):
    they load, every client starts from exactly its stored adapter, and the next round writes
    the new form."""
    server = _server("RB-LoRA", None)
    _play(server, [1])
    starts = {k: server.deliver(k).factors for k in range(len(RANKS))}
    tensors = encode("server", dense=server.dense, deltas=server.base_total.as_dict())
    for k, factors in starts.items():
        tensors.update(encode(f"start/{k}", factors=factors))
    meta = {"completed_rounds": 1, "merge_widths": [0], "synced": {}, "starts": list(starts)}

    old = _server("RB-LoRA", None)
    old.load_state_tensors(dict(tensors), json.loads(json.dumps(meta)))
    for k, factors in starts.items():
        got = old.deliver(k).factors
        for m, (a, b) in factors.items():
            assert torch.equal(got[m][0], a) and torch.equal(got[m][1], b)
    again, again_meta = old.state_tensors()  # no round since: written as it was read
    assert again_meta["starts"] == list(starts) and set(again) == set(tensors)

    _play(old, [2])
    tensors, meta = old.state_tensors()
    assert "starts" not in meta and meta["start_basis"]["width"] == max(RANKS)
    assert not any(key.startswith("start/") for key in tensors)


def test_a_start_basis_narrower_than_the_widest_client_is_refused():
    server = _server("Weighted HETLoRA", None)
    _play(server, [1])
    tensors, meta = server.state_tensors()
    meta["start_basis"]["width"] = 4
    for key in [k for k in tensors if k.startswith("start_basis/")]:
        tensors[key] = tensors[key][:4] if key.endswith("/A") else tensors[key][:, :4]
    with pytest.raises(ValueError, match="start basis of width 4, client ranks up to 8"):
        _server("Weighted HETLoRA", None).load_state_tensors(tensors, meta)


def test_a_head_only_run_checkpoints_and_resumes():
    """No client trains a LoRA (dense extras only): the basis has no modules, and still loads."""
    specs = _specs()[:2]
    server = FederatedServer("RB-LoRA", specs, selection="all")
    updates = [
        ClientUpdate(s.num_examples, s.lora_alpha, {}, dense={"head": torch.full((2,), s.rank / 1)})
        for s in specs
    ]
    server.redistribute(server.aggregate(updates))
    tensors, meta = server.state_tensors()
    again = FederatedServer("RB-LoRA", specs, selection="all")
    again.load_state_tensors(tensors, json.loads(json.dumps(meta)))
    assert again.deliver(0).factors == server.deliver(0).factors == {}
    assert torch.equal(again.dense["head"], server.dense["head"])


@pytest.mark.parametrize(
    ("method", "reduction"), [("RB-LoRA", None), ("Weighted HETLoRA", None), ("FLoRA", "merge")]
)
@pytest.mark.parametrize("adaptive", [False, True])
def test_a_resumed_dp_server_delivers_bitwise_what_an_uninterrupted_one_does(
    method, reduction, adaptive, tmp_path
):
    """Client-level DP: noise, selection and the adaptive clip's count come from the secret key,
    which the checkpoint keeps (file mode 0600), so a server restored from it draws exactly what
    the uninterrupted one does; a server with another key draws other noise."""
    from rblora.aggregation.privacy import AdaptiveClip
    from rblora.federation.privacy import PrivacySettings
    from rblora.protocol.types import UpdateLayout

    rule = AdaptiveClip(0.5, 0.2, 1.0, 2.0) if adaptive else None
    dp = PrivacySettings(clip=0.5, noise_multiplier=0.7, sample_rate=0.4, sampling="fixed",
                         delta=1e-5, accountant="rdp", adaptive=rule)  # fmt: skip

    def server():
        return FederatedServer(method, _specs(), reduction=reduction, frac=0.4, seed=3,
                               privacy=dp, layout=UpdateLayout(SHAPES))  # fmt: skip

    full_server = server()
    full = _play(full_server, range(1, 5))
    cut = server()
    cut._key = full_server._key  # the same run: its key drawn once at the start
    first = _play(cut, [1, 2])
    folder = RunFolder(tmp_path)
    folder.save_checkpoint(*cut.state_tensors())
    for name in ("server.safetensors", "state.json", "manifest.json"):
        assert (tmp_path / "checkpoint" / name).stat().st_mode & 0o777 == 0o600
    assert (tmp_path / "checkpoint").stat().st_mode & 0o777 == 0o700
    resumed = server()  # a fresh key, replaced by the checkpoint's
    resumed.load_state_tensors(*folder.load_checkpoint())
    assert resumed._key == full_server._key
    rest = _play(resumed, [3, 4])
    for got, want in zip(first + rest, full, strict=True):
        _assert_same_starts(got, want)
        for k in want:
            for m, value in want[k].base_delta.items():
                other = got[k].base_delta[m]
                pairs = [(value, other)] if torch.is_tensor(value) else zip(value, other)  # noqa: B905
                assert all(torch.equal(x, y) for x, y in pairs), (k, m)
    assert full_server.last_clip is not None and resumed.last_clip == full_server.last_clip
    assert resumed.clip == full_server.clip
    if adaptive:
        assert full_server.clip != 0.5  # the clip moved
    other = server()
    assert other._key != full_server._key
    assert [other.select(t) for t in range(1, 9)] != [full_server.select(t) for t in range(1, 9)]
    plain = FederatedServer(method, _specs(), reduction=reduction, frac=0.4, seed=3)
    without = _play(plain, [1, 2])[1]  # the noise reached what clients start from

    def tensors(starts):
        out = []
        for k in sorted(starts):
            for value in [*(starts[k].factors or {}).values(), *starts[k].base_delta.values()]:
                out += [value] if isinstance(value, torch.Tensor) else list(value)
        return out

    pairs = zip(tensors(without), tensors(first[1]), strict=True)
    assert not all(torch.equal(x, y) for x, y in pairs)
