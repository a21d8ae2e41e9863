"""The shared decoding engine (`models/decoding.py`) on both decoder families: LlamaLM and Seq2SeqTransformer."""

import itertools
import json

import pytest
import torch

from dapeng.models import MODELS
from dapeng.models.decoding import beam_search, block_ngrams, sample_steps

torch.set_num_threads(1)
EOS = 11  # a token the tiny models produce now and then


def _lm(vocab: int = 12, seed: int = 0, scale: float = 40.0) -> torch.nn.Module:
    torch.manual_seed(seed)
    model = MODELS.create("lm", vocab_size=vocab, hidden=16, layers=2, heads=4, kv_heads=2, intermediate=32,
                          max_positions=48)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1:
                p.mul_(scale)  # spread the logits so that tokens vary (std 0.02 makes them all alike)
    return model.eval()


def _s2s(vocab: int = 12, seed: int = 0, eos: int = EOS) -> torch.nn.Module:
    torch.manual_seed(seed)
    model = MODELS.create("seq2seq", vocab_size=vocab, pad_id=0, bos_id=1, eos_id=eos, hidden=16, layers=2,
                          heads=4, intermediate=32, max_positions=48, dropout=0.0, tie_embeddings=False)
    with torch.no_grad():
        model.head.weight.mul_(8)
    return model.eval()


def _prompts(vocab: int, rows: int = 3, length: int = 5, seed: int = 1) -> torch.Tensor:
    return torch.randint(4, vocab, (rows, length), generator=torch.Generator().manual_seed(seed))


def _greedy_new(model: torch.nn.Module, ids: torch.Tensor, n: int, eos: int = EOS) -> torch.Tensor:
    steps = sample_steps(model, ids, None, n, eos_ids=(eos,), pad_id=0)
    return torch.stack(list(steps), dim=1)


@pytest.mark.parametrize("family", ["lm", "seq2seq"])
@pytest.mark.parametrize(("length_penalty", "early_stopping"), [(0.0, False), (1.0, True)])
def test_beam_width_one_equals_greedy(family, length_penalty, early_stopping):
    model = _lm() if family == "lm" else _s2s()
    ids = _prompts(12, rows=4)
    greedy = _greedy_new(model, ids, 10)
    assert (greedy == EOS).any()  # eos happens, so ending hypotheses is exercised
    beams = beam_search(model, ids, None, 10, 1, eos_ids=(EOS,), pad_id=0, length_penalty=length_penalty,
                        early_stopping=early_stopping)
    assert torch.equal(beams.sequences[:, 0], greedy[:, : beams.sequences.shape[2]])
    assert (greedy[:, beams.sequences.shape[2]:] == 0).all()


def _sequence_logprob(model: torch.nn.Module, prompt: torch.Tensor, seq: list[int]) -> float:
    """log p(seq | prompt) by a full forward pass, no cache."""
    with torch.no_grad():
        if hasattr(model, "bos_id"):
            target = torch.tensor([[model.bos_id, *seq]])
            logits = model(prompt[None], None, target[:, :-1])[0]
            new = target[0, 1:]
        else:
            full = torch.cat([prompt, torch.tensor(seq)])[None]
            logits = model(full)[0, prompt.shape[0] - 1 : -1]
            new = torch.tensor(seq)
        return float(logits.float().log_softmax(-1).gather(-1, new[:, None]).sum())


@pytest.mark.parametrize("family", ["lm", "seq2seq"])
def test_beam_search_finds_the_best_sequence_by_enumeration(family):
    vocab, steps, eos = 5, 3, 3
    # seed 1: a model on which greedy decoding misses the best sequence
    model = _lm(vocab, seed=1, scale=6.0) if family == "lm" else _s2s(vocab, seed=1, eos=eos)
    prompt = torch.tensor([4, 2, 4, 1])
    # every output: eos ends it, or it stops at `steps` tokens
    candidates = [list(s) for n in range(1, steps + 1) for s in itertools.product(range(vocab), repeat=n)
                  if eos not in s[:-1] and (s[-1] == eos or n == steps)]
    scored = sorted(((_sequence_logprob(model, prompt, s), s) for s in candidates), reverse=True)
    result = beam_search(model, prompt[None], None, steps, vocab**steps, eos_ids=(eos,), pad_id=0,
                         length_penalty=0.0, num_return_sequences=3)
    for rank in range(3):
        score, seq = scored[rank]
        got = result.sequences[0, rank].tolist()[: len(seq)]
        assert got == seq and abs(float(result.scores[0, rank]) - score) < 1e-4
    greedy = _greedy_new(model, prompt[None], steps, eos)[0].tolist()  # one row: it stops at its eos
    assert _sequence_logprob(model, prompt, greedy) < scored[0][0]  # greedy misses it: the search is what finds it


def _ngrams(seq: list[int], n: int) -> list[tuple[int, ...]]:
    return [tuple(seq[i : i + n]) for i in range(len(seq) - n + 1)]


def test_block_ngrams_bans_exactly_the_repeating_tokens():
    logits = torch.zeros(1, 6)
    block_ngrams(logits, torch.tensor([[1, 2, 5, 1, 2, 4, 1]]), 3)
    assert torch.isinf(logits).nonzero()[:, 1].tolist() == []  # "4 1" was never followed
    logits = torch.zeros(1, 6)
    block_ngrams(logits, torch.tensor([[1, 2, 5, 1, 2, 4, 1, 2]]), 3)
    assert torch.isinf(logits[0]).nonzero().flatten().tolist() == [4, 5]  # "1 2 5" and "1 2 4" seen


@pytest.mark.parametrize("family", ["lm", "seq2seq"])
@pytest.mark.parametrize("num_beams", [1, 3])
def test_no_repeat_ngram_size_never_repeats_an_ngram(family, num_beams):
    model = _lm(6) if family == "lm" else _s2s(6, eos=5)
    ids = _prompts(6, rows=3)
    kwargs = {"num_beams": num_beams, "max_new_tokens": 16, "min_new_tokens": 16}
    if family == "lm":
        plain = model.generate(ids, **kwargs)[:, ids.shape[1]:]
        blocked = model.generate(ids, no_repeat_ngram_size=2, **kwargs)[:, ids.shape[1]:]
    else:
        plain = model.generate(ids, None, **kwargs)[:, 1:]
        blocked = model.generate(ids, None, no_repeat_ngram_size=2, **kwargs)[:, 1:]
    assert any(len(set(_ngrams(row, 2))) < len(_ngrams(row, 2)) for row in plain.tolist())  # repeats without it
    for row in blocked.tolist():
        assert len(set(_ngrams(row, 2))) == len(_ngrams(row, 2))


def test_batched_beam_search_equals_per_row_on_the_lm_with_left_padding():
    model = _lm()
    lengths = [5, 2, 4]
    rows = [_prompts(12, rows=1, length=n, seed=n)[0] for n in lengths]
    ids = torch.zeros(3, 5, dtype=torch.long)
    mask = torch.zeros(3, 5, dtype=torch.bool)
    for i, row in enumerate(rows):
        ids[i, 5 - len(row):], mask[i, 5 - len(row):] = row, True
    batch = beam_search(model, ids, mask, 8, 4, eos_ids=(EOS,), pad_id=0, num_return_sequences=4)
    for i, row in enumerate(rows):
        alone = beam_search(model, row[None], None, 8, 4, eos_ids=(EOS,), pad_id=0, num_return_sequences=4)
        width = alone.sequences.shape[2]
        assert torch.equal(batch.sequences[i, :, :width], alone.sequences[0])
        assert (batch.sequences[i, :, width:] == 0).all()
        torch.testing.assert_close(batch.scores[i], alone.scores[0], atol=1e-4, rtol=1e-4)


def test_batched_beam_search_equals_per_row_on_seq2seq_with_padded_sources():
    model = _s2s()
    src = _prompts(12, rows=3, length=6)
    mask = torch.ones(3, 6, dtype=torch.bool)
    mask[1, 3:], mask[2, 5:] = False, False
    src = src.masked_fill(~mask, 0)
    batch = model.generate(src, mask, max_new_tokens=8, num_beams=4)
    for i in range(3):
        n = int(mask[i].sum())
        alone = model.generate(src[i : i + 1, :n], None, max_new_tokens=8, num_beams=4)
        assert torch.equal(batch[i, : alone.shape[1]], alone[0])
        assert (batch[i, alone.shape[1]:] == 0).all()


@pytest.mark.parametrize("family", ["lm", "seq2seq"])
def test_sampling_is_reproducible_with_a_seed_and_top_k_one_is_greedy(family):
    model = _lm() if family == "lm" else _s2s()
    ids = _prompts(12, rows=2)
    extra = () if family == "lm" else (None,)

    def run(seed: int, **kwargs) -> torch.Tensor:
        generator = torch.Generator().manual_seed(seed)
        return model.generate(ids, *extra, max_new_tokens=10, temperature=1.5, generator=generator, **kwargs)

    assert torch.equal(run(0, top_p=0.95), run(0, top_p=0.95))
    assert not all(torch.equal(run(0), run(s)) for s in range(1, 4))  # it does sample
    assert torch.equal(run(5, top_k=1), model.generate(ids, *extra, max_new_tokens=10))


class _Recompute:
    """A `Decodable` without a KV cache: every step runs the model over the whole sequence so far."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.model = model

    def start_decoding(self, input_ids, attention_mask, expand, max_new_tokens):
        self.prompts = input_ids.repeat_interleave(expand, dim=0)
        self.history = torch.zeros(self.prompts.shape[0], 0, dtype=torch.long)
        return self, self._logits()

    def _logits(self) -> torch.Tensor:
        with torch.no_grad():
            if hasattr(self.model, "bos_id"):
                bos = torch.full((self.prompts.shape[0], 1), self.model.bos_id)
                return self.model(self.prompts, None, torch.cat([bos, self.history], dim=1))[:, -1]
            return self.model(torch.cat([self.prompts, self.history], dim=1))[:, -1]

    def step(self, tokens):
        self.history = torch.cat([self.history, tokens[:, None]], dim=1)
        return self._logits()

    def reorder(self, index):
        self.history = self.history[index]


@pytest.mark.parametrize("family", ["lm", "seq2seq"])
def test_kv_cache_beam_search_equals_recomputation(family):
    model = _lm() if family == "lm" else _s2s()
    ids = _prompts(12, rows=3)
    kwargs = {"eos_ids": (EOS,), "pad_id": 0, "num_return_sequences": 3, "no_repeat_ngram_size": 3}
    cached = beam_search(model, ids, None, 9, 3, **kwargs)
    recomputed = beam_search(_Recompute(model), ids, None, 9, 3, **kwargs)
    assert torch.equal(cached.sequences, recomputed.sequences)
    torch.testing.assert_close(cached.scores, recomputed.scores, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("family", ["lm", "seq2seq"])
def test_bf16_beam_search_runs_and_width_one_is_greedy(family):
    model = (_lm() if family == "lm" else _s2s()).to(torch.bfloat16)
    ids = _prompts(12, rows=2, length=4)
    result = beam_search(model, ids, None, 5, 2, eos_ids=(EOS,), pad_id=0, num_return_sequences=2)
    assert result.sequences.shape[:2] == (2, 2) and torch.isfinite(result.scores).all()
    assert (result.scores[:, 0] >= result.scores[:, 1]).all()
    one = beam_search(model, ids, None, 5, 1, eos_ids=(EOS,), pad_id=0, early_stopping=True)
    greedy = _greedy_new(model, ids, 5)
    assert torch.equal(one.sequences[:, 0], greedy[:, : one.sequences.shape[2]])


def test_causal_lm_task_and_cli_pass_the_beam_options(monkeypatch, capsys):
    from _tiny_decoder import tiny_pipeline

    from dapeng.cli.main import main

    pipe = tiny_pipeline()
    prompt = "the cat"
    ids = pipe.task.prompt_ids(prompt)
    best = pipe.model.generate(torch.tensor([ids]), max_new_tokens=6, num_beams=3, stop_ids=pipe.task.stop_ids or ())
    expected = pipe.task.tokenizer.decode(best[0, len(ids):].tolist())
    assert pipe.generate(prompt, max_new_tokens=6, num_beams=3) == expected
    assert "".join(pipe.generate(prompt, max_new_tokens=6, num_beams=3, stream=True)) == expected
    assert pipe.generate(prompt, max_new_tokens=6, num_beams=1) == pipe.generate(prompt, max_new_tokens=6)
    monkeypatch.setattr("dapeng.pipeline.load", lambda *args, **kwargs: pipe)
    assert main(["generate", "tiny", "--prompt", prompt, "--max-new-tokens", "6", "--num-beams", "3",
                 "--length-penalty", "1.0", "--no-repeat-ngram-size", "0", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["text"] == expected
