import numpy as np
import pytest
import torch

from panorama import checkpoint
from panorama.errors import CheckpointError
from panorama.geometry import resolve_views
from panorama.model import ModelConfig, NefNetV2, inv3x3
from training.data import masked_l1

TINY = ModelConfig(channels=16, embed_dim=16, heads=2, blocks=2, encoder_blocks=2)


def _inputs(b, l, t, q, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, l, t, generator=g) * 0.3
    ia = torch.rand(b, l, 3, generator=g) * torch.tensor([180.0, 360.0, 0.0]) - torch.tensor([0.0, 180.0, 0.0])
    qa = torch.rand(b, q, 3, generator=g) * torch.tensor([180.0, 360.0, 0.0]) - torch.tensor([0.0, 180.0, 0.0])
    return x, ia, torch.ones(b, l, dtype=torch.bool), qa


@pytest.mark.parametrize("b,l,t,q", [(1, 3, 5000, 2), (2, 12, 777, 8), (1, 1, 64, 1), (3, 5, 2048, 4)])
def test_any_length_and_lead_count(b, l, t, q):
    model = NefNetV2(TINY).eval()
    with torch.no_grad():
        y = model(*_inputs(b, l, t, q))
    assert y.shape == (b, q, t) and torch.isfinite(y).all()


def test_masked_leads_are_ignored():
    model = NefNetV2(TINY).eval()
    x, ia, mask, qa = _inputs(1, 4, 512, 2)
    mask[0, 3] = False
    with torch.no_grad():
        a = model(x, ia, mask, qa)
        x2 = x.clone()
        x2[0, 3] = torch.randn(512) * 5  # garbage in a masked slot
        b = model(x2, ia, mask, qa)
    assert torch.allclose(a, b, atol=1e-3)


def test_dipole_skip_reproduces_the_dipole_baseline():
    from panorama.baselines import DipoleMethod

    model = NefNetV2(TINY)
    inputs, queries = resolve_views("I,II,V3"), resolve_views("V2,V6")
    x = np.random.default_rng(0).standard_normal((3, 300)).astype(np.float32)
    u_in = torch.tensor(np.stack([v.direction for v in inputs]), dtype=torch.float32)[None]
    u_q = torch.tensor(np.stack([v.direction for v in queries]), dtype=torch.float32)[None]
    got = model.dipole_skip(torch.from_numpy(x)[None], u_in, u_q, torch.ones(1, 2, 3, dtype=torch.bool))
    want = DipoleMethod().predict(x, inputs, queries)
    assert np.allclose(got[0].detach().numpy(), want, atol=5e-3)


def test_inv3x3_matches_linalg():
    m = torch.randn(5, 3, 3) + 3 * torch.eye(3)
    assert torch.allclose(inv3x3(m), torch.linalg.inv(m), atol=1e-5)


def test_attention_prefers_the_geometrically_nearest_input():
    model = NefNetV2(TINY).eval()
    ia = torch.tensor([[[90.0, 90.0, 1.0], [150.0, 90.0, 1.0], [95.0, 15.0, 0.0]]])  # I, II, V3
    from panorama.model import directions

    u_in, u_q = directions(ia), directions(ia)  # a query at each input's own angle
    e_in = model.embed(u_in, ia[..., 2:3])
    attn = model.attention(e_in, e_in, u_q, u_in, torch.ones(1, 3, 3, dtype=torch.bool))  # (1, Q, H, L)
    mean = attn.mean(2)[0]
    assert torch.equal(mean.argmax(-1), torch.arange(3))


def test_tiny_model_overfits_a_tiny_batch():
    torch.manual_seed(0)
    model = NefNetV2(TINY)
    t = torch.linspace(0, 4 * np.pi, 128)
    x = torch.stack([torch.sin(t), torch.cos(2 * t), torch.sin(3 * t) ** 3])[None].repeat(2, 1, 1)
    y = torch.stack([torch.tanh(3 * torch.sin(t)) * torch.cos(t)])[None].repeat(2, 1, 1)  # not in the dipole span
    ia = torch.tensor([[[90.0, 90.0, 1.0], [150.0, 90.0, 1.0], [95.0, 15.0, 0.0]]]).repeat(2, 1, 1)
    qa = torch.tensor([[[90.0, 10.0, 0.0]]]).repeat(2, 1, 1)
    mask, qm = torch.ones(2, 3, dtype=torch.bool), torch.ones(2, 1, dtype=torch.bool)
    opt = torch.optim.Adam(model.parameters(), lr=5e-3)
    first = None
    for _ in range(200):
        loss = masked_l1(model(x, ia, mask, qa), y, qm)
        first = first if first is not None else loss.item()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.1 * first


def test_checkpoint_round_trip_is_bit_exact(tmp_path):
    model = NefNetV2(TINY).eval()
    path = tmp_path / "m.safetensors"
    digest = checkpoint.save(model, path, {"stage": 1})
    back, meta = checkpoint.load(path)
    assert meta["sha256"] == digest and meta["stage"] == 1 and meta["config"]["channels"] == 16
    inp = _inputs(1, 3, 1000, 2)
    with torch.no_grad():
        assert torch.equal(model(*inp), back(*inp))


def test_bad_checkpoints_are_clear_errors(tmp_path):
    with pytest.raises(CheckpointError, match="no checkpoint"):
        checkpoint.load(tmp_path / "none.safetensors")
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"\x00" * 100)
    with pytest.raises(CheckpointError):
        checkpoint.load(junk)
    path = tmp_path / "m.safetensors"
    checkpoint.save(NefNetV2(TINY), path)
    data = path.read_bytes()
    (tmp_path / "trunc.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError):
        checkpoint.load(tmp_path / "trunc.safetensors")
    flipped = bytearray(data)
    flipped[-10] ^= 0xFF  # one corrupted weight byte
    (tmp_path / "flip.safetensors").write_bytes(bytes(flipped))
    with pytest.raises(CheckpointError, match="hash mismatch"):
        checkpoint.load(tmp_path / "flip.safetensors")


def test_a_long_recording_drawn_in_chunks_equals_one_pass():
    """Any length in bounded memory: chunks with context either side join into one pass."""
    from panorama.geometry import resolve_views
    from panorama.synth import Synthesizer
    from training.simulator import simulate

    sim = simulate(5, duration_s=12.0, device="diagnostic")
    x, inputs, views = sim.signals.astype(np.float32), resolve_views(sim.names), resolve_views("V7,V4R,120:45")
    whole = Synthesizer.load()
    ref = whole(x, inputs, views)
    for chunk in (1000, 1003, 2500):  # odd sizes too: each chunk's window still starts on the stride
        got = Synthesizer(whole.model, whole.meta, chunk=chunk)(x, inputs, views)
        assert got.shape == ref.shape and np.abs(got - ref).max() * 1000 < 0.05, chunk  # µV


def test_the_long_recording_bench_reports_both_ways_and_their_agreement():
    from panorama.synth import Synthesizer
    from training.bench_long import bench_long

    res = bench_long(Synthesizer.load(), minutes=1.5)  # two chunks of 60 s
    assert res["samples"] == 45_000 and res["max_diff_uv"] < 0.05
    assert res["chunked_peak_rss_mb"] >= res["start_rss_mb"] and res["one_pass_s"] > 0
