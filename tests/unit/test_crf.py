"""The linear-chain CRF against brute-force enumeration of every tag path on tiny inputs."""

import itertools

import pytest
import torch

from dapeng.errors import ModelError
from dapeng.layers import crf as crf_module
from dapeng.layers.crf import CRF, allowed_transitions

torch.set_num_threads(1)

K = 3


def _crf(seed: int = 0, k: int = K) -> CRF:
    torch.manual_seed(seed)
    crf = CRF(k)
    with torch.no_grad():  # scores large enough that the paths differ clearly
        for p in crf.parameters():
            p.normal_(std=1.0)
    return crf


def _batch(lengths: list[int], t: int = 4, k: int = K, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    emissions = torch.randn(len(lengths), t, k, generator=g) * 2
    mask = torch.arange(t) < torch.tensor(lengths).unsqueeze(1)
    tags = torch.randint(0, k, (len(lengths), t), generator=g).masked_fill(~mask, -100)
    return emissions, tags, mask


def _path_score(crf: CRF, em: torch.Tensor, path: tuple[int, ...]) -> torch.Tensor:
    start, trans, end = crf._scores()
    s = start[path[0]] + end[path[-1]] + sum(em[t, y] for t, y in enumerate(path))
    return s + sum(trans[a, b] for a, b in zip(path, path[1:]))


def _brute_force(crf: CRF, em: torch.Tensor, length: int) -> tuple[torch.Tensor, list[int]]:
    """(log Z, best path) of one row by scoring all K^length paths."""
    paths = list(itertools.product(range(crf.num_tags), repeat=length))
    scores = torch.stack([_path_score(crf, em, p) for p in paths])
    return torch.logsumexp(scores, 0), list(paths[int(scores.argmax())])


LENGTHS = [[4, 4], [4, 2, 1, 3], [1], [3, 0, 2]]


@pytest.mark.parametrize("lengths", LENGTHS)
def test_nll_equals_brute_force_over_all_paths(lengths):
    crf = _crf()
    em, tags, mask = _batch(lengths)
    expected = []
    for b, n in enumerate(lengths):
        if n == 0:
            expected.append(torch.tensor(0.0))
            continue
        log_z, _ = _brute_force(crf, em[b], n)
        expected.append(log_z - _path_score(crf, em[b], tuple(tags[b, :n].tolist())))
    torch.testing.assert_close(crf.nll(em, tags, mask), torch.stack(expected).mean())


@pytest.mark.parametrize("lengths", LENGTHS)
def test_viterbi_equals_brute_force_argmax(lengths):
    crf = _crf()
    em, _, mask = _batch(lengths)
    decoded = crf.decode(em, mask)
    assert [len(p) for p in decoded] == lengths
    for b, n in enumerate(lengths):
        if n:
            assert decoded[b] == _brute_force(crf, em[b], n)[1]


@pytest.mark.parametrize("lengths", LENGTHS)
def test_pruned_viterbi_equals_brute_force_argmax(lengths, monkeypatch):
    # one candidate per row: most steps need the exactness check's full fallback
    monkeypatch.setattr(crf_module, "_PRUNE_ABOVE", 0)
    monkeypatch.setattr(crf_module, "_CANDIDATES", 1)
    crf = _crf()
    em, _, mask = _batch(lengths)
    for b, path in enumerate(crf.decode(em, mask)):
        if lengths[b]:
            assert path == _brute_force(crf, em[b], lengths[b])[1]


def test_pruned_viterbi_equals_full_viterbi_over_many_tags(monkeypatch):
    crf = _crf(k=100)
    for scale in (0.3, 3.0):  # flat emissions: many fallbacks; peaked: few
        em, _, mask = _batch([7, 3, 5, 1, 6], t=7, k=100)
        em = em * scale
        pruned = crf.decode(em, mask)
        with monkeypatch.context() as m:
            m.setattr(crf_module, "_PRUNE_ABOVE", 10**9)
            assert crf.decode(em, mask) == pruned


def test_batch_equals_rows_and_ignores_what_padding_holds():
    crf = _crf()
    lengths = [4, 2, 1, 3]
    em, tags, mask = _batch(lengths, t=6)
    rows = [crf.nll(em[b : b + 1, :n], tags[b : b + 1, :n], mask[b : b + 1, :n]) for b, n in enumerate(lengths)]
    torch.testing.assert_close(crf.nll(em, tags, mask), torch.stack(rows).mean())
    noisy = em.masked_fill(~mask.unsqueeze(-1), 1e3)  # garbage where the mask is False
    torch.testing.assert_close(crf.nll(noisy, tags, mask), crf.nll(em, tags, mask))
    assert crf.decode(noisy, mask) == [crf.decode(em[b : b + 1, :n], mask[b : b + 1, :n])[0] for b, n in enumerate(lengths)]


def test_gradients_flow_to_emissions_and_every_score():
    crf = _crf()
    em, tags, mask = _batch([4, 2])
    em.requires_grad_(True)
    crf.nll(em, tags, mask).backward()
    for p in [em, *crf.parameters()]:
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0
    assert em.grad[1, 2:].abs().max() == 0  # padding gets no gradient


def test_gradient_matches_brute_force_autograd():
    crf = _crf()
    em, tags, mask = _batch([3, 2])
    crf.nll(em, tags, mask).backward()
    fast = [p.grad.clone() for p in crf.parameters()]
    crf.zero_grad()
    total = 0
    for b, n in enumerate([3, 2]):
        log_z, _ = _brute_force(crf, em[b], n)
        total = total + log_z - _path_score(crf, em[b], tuple(tags[b, :n].tolist()))
    (total / 2).backward()
    for a, p in zip(fast, crf.parameters()):
        torch.testing.assert_close(a, p.grad)


def test_nll_is_stable_when_scores_are_huge():
    crf = _crf()
    em, tags, mask = _batch([4, 3])
    em = em * 200  # alphas hundreds of nats apart: exp would overflow without the shifts
    em.requires_grad_(True)
    loss = crf.nll(em, tags, mask)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(em.grad).all()
    expected = []
    for b, n in enumerate([4, 3]):
        log_z, _ = _brute_force(crf, em[b].detach(), n)
        expected.append(log_z - _path_score(crf, em[b].detach(), tuple(tags[b, :n].tolist())))
    torch.testing.assert_close(loss, torch.stack(expected).mean(), rtol=1e-4, atol=1e-3)


def test_runs_in_fp32_under_bf16_autocast():
    crf = _crf()
    em, tags, mask = _batch([4, 2, 3])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = crf.nll(em.bfloat16(), tags, mask)
        decoded = crf.decode(em.bfloat16(), mask)
    assert loss.dtype == torch.float32
    rounded = em.bfloat16().float()
    torch.testing.assert_close(loss, crf.nll(rounded, tags, mask))
    assert decoded == crf.decode(rounded, mask)


BIO = ["O", "B-PER", "I-PER", "B-LOC", "I-LOC"]


def _valid_bio(labels: list[str], path: list[int]) -> bool:
    prev = "O"
    for tag in (labels[i] for i in path):
        if tag.startswith("I-") and prev[2:] != tag[2:]:
            return False
        prev = tag
    return True


def test_constrained_decoding_never_puts_i_after_o_or_first():
    torch.manual_seed(0)
    crf = CRF(len(BIO))
    # emissions that favour I- everywhere: unconstrained, the best paths break BIO
    em = torch.randn(16, 6, len(BIO))
    em[..., 2] += 3.0
    em[..., 4] += 2.5
    mask = torch.arange(6) < torch.randint(1, 7, (16, 1))
    assert not all(_valid_bio(BIO, p) for p in crf.decode(em, mask))
    crf.constrain_bio(BIO, "BIO")
    assert all(_valid_bio(BIO, p) for p in crf.decode(em, mask))


def test_constraints_survive_training_steps_and_a_state_dict_round_trip():
    crf = CRF(len(BIO))
    crf.constrain_bio(BIO)
    opt = torch.optim.SGD(crf.parameters(), lr=1.0)
    em, tags, mask = _batch([5, 3], t=5, k=len(BIO))
    tags = torch.tensor([[2, 2, 4, 4, 2], [4, 2, 2, -100, -100]])  # I- tags everywhere: learn to want them
    for _ in range(5):
        opt.zero_grad()
        crf.nll(em, tags.masked_fill(~mask, -100), mask).backward()
        opt.step()
    twin = CRF(len(BIO))
    twin.load_state_dict(crf.state_dict())
    strong = torch.zeros(1, 5, len(BIO))
    strong[..., 2] = 5.0
    for model in (crf, twin):
        assert _valid_bio(BIO, model.decode(strong, torch.ones(1, 5, dtype=torch.bool))[0])


def test_bioes_allowed_transitions():
    labels = ["O", "B-X", "I-X", "E-X", "S-X", "B-Y", "E-Y"]
    start, trans, end = allowed_transitions(labels, "BIOES")
    idx = {lab: i for i, lab in enumerate(labels)}
    assert start.tolist() == [True, True, False, False, True, True, False]
    assert end.tolist() == [True, False, False, True, True, False, True]
    assert trans[idx["B-X"], idx["I-X"]] and trans[idx["B-X"], idx["E-X"]]
    assert not trans[idx["B-X"], idx["O"]] and not trans[idx["B-X"], idx["E-Y"]]
    assert trans[idx["E-X"], idx["B-Y"]] and trans[idx["S-X"], idx["O"]]
    assert not trans[idx["O"], idx["I-X"]] and not trans[idx["S-X"], idx["E-X"]]


def test_bio_allows_i_only_after_its_own_type():
    start, trans, end = allowed_transitions(BIO, "BIO")
    assert start.tolist() == [True, True, False, True, False] and end.all()
    assert trans[1, 2] and trans[2, 2] and not trans[0, 2] and not trans[3, 2] and not trans[4, 2]


def test_bad_inputs_are_one_line_errors():
    crf = CRF(3)
    em, tags, mask = _batch([2, 3], k=3)
    with pytest.raises(ModelError, match="left-aligned"):
        crf.nll(em, tags, torch.tensor([[True, False, True, False], [True] * 4]))
    with pytest.raises(ModelError, match="0…2"):
        crf.nll(em, torch.full_like(tags, -100), mask)
    with pytest.raises(ModelError, match="emissions"):
        crf.decode(em[..., :2], mask)
    with pytest.raises(ModelError, match="not a BIO tag"):
        crf.constrain_bio(["O", "NN", "B-X"])
    with pytest.raises(ModelError, match="2 labels"):
        crf.constrain_bio(["O", "B-X"])
    with pytest.raises(ModelError, match="scheme"):
        crf.constrain_bio(["O", "B-X", "I-X"], "IOB2")


def test_empty_batch_rows():
    crf = CRF(3)
    em = torch.randn(2, 3, 3, requires_grad=True)
    mask = torch.zeros(2, 3, dtype=torch.bool)
    loss = crf.nll(em, torch.full((2, 3), -100), mask)
    loss.backward()
    assert loss.item() == 0.0 and crf.decode(em, mask) == [[], []]
