"""Compressors and the compressed (CHOCO-style) combine, against references written out here."""

from __future__ import annotations

import math

import networkx as nx
import numpy as np
import pytest
import torch

from dif_maml_dist import seeding
from dif_maml_dist.config import CompressionConfig, Config
from dif_maml_dist.gossip.compression import QSGD, RandK, ScaledSign, TopK, pack_bits, unpack_bits
from dif_maml_dist.gossip.schemes import ChocoGossip, FullStateGossip, gossip_round, make_gossip
from dif_maml_dist.graphs.schedules import GraphSchedule, static_schedule
from dif_maml_dist.graphs.topology import PAPER6_EDGES
from dif_maml_dist.graphs.weights import metropolis_weights

P = 1001  # not a multiple of 8: the packed formats need their padding


def _x(seed=0, n=P, dtype=torch.float64):
    return torch.randn(n, dtype=dtype, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("bits", [1, 2, 3, 4, 7, 8, 11, 16])
def test_bit_packing_round_trips_and_is_dense(bits):
    """Codes of every width survive packing, in ceil(n*bits/8) bytes. Catches: a wrong bit order or width, lost
    codes at the padded end, a payload larger than the format claims."""
    codes = torch.randint(0, 2 ** bits, (P,), generator=torch.Generator().manual_seed(bits))
    packed = pack_bits(codes, bits)
    assert packed.dtype == torch.uint8 and packed.numel() == math.ceil(P * bits / 8)
    assert torch.equal(unpack_bits(packed, bits, P), codes.to(torch.int32))


def test_pack_bits_is_most_significant_bit_first():
    """The wire format is fixed (both ends may run different builds): 3-bit codes 5, 3, 7 are 101 011 11|1 ..."""
    assert pack_bits(torch.tensor([5, 3, 7]), 3).tolist() == [0b10101111, 0b10000000]


@pytest.mark.parametrize("dtype, ratio", [(torch.float64, 0.1), (torch.float32, 0.01), (torch.float32, 1.0)])
def test_topk_keeps_the_largest_magnitudes(dtype, ratio):
    """topk sends the ceil(ratio*P) largest |x| as values and int32 indices; the receiver rebuilds x with every other
    entry zero. Reference: numpy's argsort. Catches: keeping the largest signed values, off-by-one k, lost signs."""
    x = _x(1, dtype=dtype)
    c = TopK(ratio)
    payload = c.encode(x, None)
    k = math.ceil(ratio * P - 1e-9)
    assert payload.dtype == torch.uint8 and payload.numel() == k * (x.element_size() + 4) == c.payload_bytes(P, dtype)
    ref = np.zeros(P)
    keep = np.argsort(-np.abs(x.numpy()))[:k]
    ref[keep] = x.numpy()[keep]
    assert np.array_equal(c.decode(payload, P, dtype, None).numpy(), ref.astype(x.numpy().dtype))


def test_randk_sends_values_only_and_the_receiver_draws_the_same_indices():
    """randk's payload is k values and nothing else; a receiver with the sender's (seed, sender, round) stream
    puts them back at the right places, and the indices change from round to round.
    Catches: indices sent anyway (bytes), or a receiver whose stream differs from the sender's (scrambled values)."""
    x = _x(2)
    c = RandK(0.1)
    k = math.ceil(0.1 * P)
    payload = c.encode(x, seeding.generator(0, 6, 3, 17))
    assert payload.numel() == k * 8 == c.payload_bytes(P, torch.float64)
    y = c.decode(payload, P, torch.float64, seeding.generator(0, 6, 3, 17))
    kept = torch.nonzero(y).flatten()
    assert kept.numel() == k and torch.equal(y[kept], x[kept])
    other = c.decode(c.encode(x, seeding.generator(0, 6, 3, 18)), P, torch.float64, seeding.generator(0, 6, 3, 18))
    assert not torch.equal(torch.nonzero(other).flatten(), kept)


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_qsgd_is_an_unbiased_grid_quantiser(bits):
    """qsgd decodes to sign * (j/s) * max|x| with s = 2^(bits-1) - 1, within one grid step of x, unbiased over the
    random rounding, in bits/entry plus one scale. Catches: a biased rounding (e.g. always down), a wrong number of
    levels, lost signs, or more bytes than bits per entry."""
    x = _x(3)
    c, s = QSGD(bits), 2 ** (bits - 1) - 1
    scale = x.abs().max()
    decoded = []
    for seed in range(400):
        payload = c.encode(x, torch.Generator().manual_seed(seed))
        assert payload.numel() == 8 + math.ceil(P * bits / 8) == c.payload_bytes(P, torch.float64)
        decoded.append(c.decode(payload, P, torch.float64, None))
    y = torch.stack(decoded)
    levels = y.abs() / scale * s
    assert torch.allclose(levels, levels.round(), atol=1e-9) and levels.max() <= s + 1e-9
    assert ((y == 0) | (torch.sign(y) == torch.sign(x))).all()
    assert ((y - x).abs() <= scale / s + 1e-12).all()
    # Mean of 400 draws: each entry's rounding noise has sd <= scale/(2s), so the mean is within 5 sd/sqrt(400).
    assert ((y.mean(0) - x).abs() <= 5 * scale / (2 * s) / 20).all()


def test_scaled_sign_is_mean_magnitude_times_sign():
    """sign sends one bit per entry and ||x||_1/P: decoded = mean|x| * sign(x) (sign(0) counted +). Reference in
    numpy. Catches: a scale of ||x||_2 or max|x|, flipped bits, more than one bit per entry."""
    x = _x(4)
    x[5] = 0.0
    c = ScaledSign()
    payload = c.encode(x, None)
    assert payload.numel() == 8 + math.ceil(P / 8)
    xn = x.numpy()
    ref = np.abs(xn).mean() * np.where(xn >= 0, 1.0, -1.0)
    np.testing.assert_allclose(c.decode(payload, P, torch.float64, None).numpy(), ref, rtol=1e-14)


# ------------------------------------------------------------------------------------------ compressed combine
def _cfg(name: str, **kw) -> Config:
    cfg = Config()
    cfg.compression = CompressionConfig(name=name, **kw)
    return cfg


def _choco_reference(phis, schedule, rounds, compress, gamma, zeta, init):
    """CHOCO gossip for all agents at once, written out with dense per-edge copy matrices: h[k][l] is the copy
    of agent k's state that edge k->l holds; compress(k, r, v) the decoded message."""
    k_agents = phis[0].shape[0]
    h = {}
    out = []
    for r in range(rounds):
        phi = phis[r]
        a = schedule.weights(r)
        for k in range(k_agents):
            for l in range(k_agents):
                if l != k and a[l, k] > 0:
                    h.setdefault((k, l), init[k].clone())
        for (k, l), copy in h.items():
            if a[l, k] > 0:
                copy += zeta * compress(k, r, phi[k] - copy)
        w = phi.clone()
        for k in range(k_agents):
            for l in range(k_agents):
                if l != k and a[l, k] > 0:
                    w[k] += gamma * a[l, k] * (h[(l, k)] - h[(k, l)])
        out.append(w)
    return out


@pytest.mark.parametrize("name, kw, schedule_name", [
    ("topk", {"ratio": 0.05}, "static"), ("randk", {"ratio": 0.2}, "random_matching"),
    ("qsgd", {"bits": 3}, "resample"), ("sign", {}, "one_peer_exponential")])
def test_compressed_combine_equals_dense_reference_and_keeps_the_average(name, kw, schedule_name):
    """Four rounds of every agent's ChocoGossip (through gossip_round, as the simulator runs them) equal the CHOCO
    recursion written out over dense copy matrices; both ends of every edge hold the same copy; and each round
    keeps the network average of phi (Metropolis weights are symmetric: each edge's two terms cancel).
    Catches: copies updated on one end only, a wrong weight (a_kl for a_lk), a sender and receiver decoding
    different draws, and an update that leaks or creates mass."""
    graph = nx.Graph(PAPER6_EDGES)
    schedule = GraphSchedule(schedule_name, graph, metropolis_weights(graph), seed=5, active_prob=0.6)
    cfg = _cfg(name, gamma=0.7, zeta=0.9, **kw)
    init = [_x(100 + k, n=P) for k in range(6)]
    gossips = [make_gossip(cfg, k, lambda l: init[l]) for k in range(6)]
    phis = [torch.stack([_x(10 * r + k) for k in range(6)]) for r in range(4)]
    compressor = gossips[0].compressor
    gen = (lambda k, r: seeding.generator(cfg.seed, 6, k, r)) if compressor.random else (lambda k, r: None)

    def compress(k, r, v):
        return compressor.decode(compressor.encode(v, gen(k, r)), P, v.dtype, gen(k, r))

    ref = _choco_reference(phis, schedule, 4, compress, 0.7, 0.9, init)
    for r in range(4):
        got, _ = gossip_round(gossips, list(phis[r]), schedule, r)
        torch.testing.assert_close(torch.stack(got), ref[r], rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(torch.stack(got).mean(0), phis[r].mean(0), rtol=1e-12, atol=1e-12)
    for k, g in enumerate(gossips):
        for l, copy in g.sent.items():
            assert torch.equal(copy, gossips[l].held[k])


def test_uncompressed_choco_reduces_to_the_full_state_combine():
    """CHOCO with an exact 'compressor' (topk keeping every entry), gamma = zeta = 1 gives the paper's combine:
    the copies equal phi after each exchange, so w_k = sum_l a_lk phi_l. Catches a consensus step that is not the
    diffusion combine at its limits (a sign error, a missing self term)."""
    weights = metropolis_weights(nx.Graph(PAPER6_EDGES))
    schedule = static_schedule(weights)
    cfg = _cfg("topk", ratio=1.0, gamma=1.0, zeta=1.0)
    choco = [make_gossip(cfg, k, lambda l: torch.zeros(P, dtype=torch.float64)) for k in range(6)]
    assert isinstance(choco[0], ChocoGossip)
    full = [FullStateGossip() for _ in range(6)]
    for r in range(3):
        phis = list(torch.stack([_x(7 * r + k) for k in range(6)]))
        a, bytes_a = gossip_round(choco, phis, schedule, r)
        b, bytes_b = gossip_round(full, phis, schedule, r)
        torch.testing.assert_close(torch.stack(a), torch.stack(b), rtol=1e-13, atol=1e-13)
        torch.testing.assert_close(torch.stack(b), torch.as_tensor(weights.T) @ torch.stack(phis))
        assert bytes_b == [d * P * 8 for d in (1, 1, 4, 2, 3, 1)]
        assert bytes_a == [d * P * 12 for d in (1, 1, 4, 2, 3, 1)]  # values + int32 indices
