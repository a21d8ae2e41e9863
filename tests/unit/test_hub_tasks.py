"""Fine-tuning pieces on tiny models: load_init, freezing, LLRD; the causal-lm and sentence-embedding tasks."""

import json

import numpy as np
import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers

from dapeng.errors import ConfigError, DataError, ModelError
from dapeng.hub.artifact import save_artifact
from dapeng.hub.init import load_init
from dapeng.models import MODELS
from dapeng.tasks import TASKS
from dapeng.tasks.causal_lm import CausalLM, _detokenize, render_chat
from dapeng.tasks.embedding import SentenceEmbedding
from dapeng.train.finetune import GradualUnfreezing, freeze, layer_groups, layerwise_lr_groups
from dapeng.train.optim import build_optimizer, build_schedule

pytestmark = pytest.mark.usefixtures("one_thread")


TINY_ENCODER = {"vocab_size": 60, "num_labels": 2, "pad_id": 0, "hidden": 16, "layers": 3, "heads": 2,
                "intermediate": 32, "max_positions": 32, "pooling": "mean", "dropout": 0.0}
WORDS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "good", "bad", "film", "plot", "great", "dull"]


def word_tokenizer() -> str:
    vocab = {w: i for i, w in enumerate(WORDS + [f"x{i}" for i in range(60 - len(WORDS))])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return tok.to_str()


@pytest.fixture
def pretrained(tmp_path):
    torch.manual_seed(0)
    model = MODELS.create("transformer", **TINY_ENCODER)
    task = SentenceEmbedding(tokenizer=word_tokenizer(), max_length=16)
    return save_artifact(tmp_path / "enc", model=model, model_name="transformer", model_kwargs=TINY_ENCODER,
                         task_name="sentence-embedding", task_state=task.state()), model


def test_load_init_new_head_same_backbone_and_pretrained_tokenizer(pretrained):
    path, source = pretrained
    task = TASKS.create("text-classification", max_length=16)
    records = [{"text": "good film", "label": "pos"}, {"text": "dull plot", "label": "neg"},
               {"text": "great", "label": "meh"}]
    task.setup(records)
    model, kwargs = load_init(str(path), "transformer", {"dropout": 0.2}, task)
    assert kwargs["num_labels"] == 3 and kwargs["dropout"] == 0.2 and model.head.out_features == 3
    for name, value in source.state_dict().items():
        if not name.startswith("head."):
            assert torch.equal(model.state_dict()[name], value), name
    assert task.tokenizer.token_to_id("good") == 4  # the pretrained vocabulary, not one learned from 3 records
    items = task.encode(records)
    assert model(task.collate(items)["input_ids"]).shape == (3, 3)


def test_load_init_refuses_shape_changes_and_wrong_model(pretrained):
    path, _ = pretrained
    task = TASKS.create("text-classification")
    task.setup([{"text": "good", "label": "a"}, {"text": "bad", "label": "b"}])
    with pytest.raises(ConfigError, match="model.kwargs.hidden"):
        load_init(str(path), "transformer", {"hidden": 32}, task)
    with pytest.raises(ConfigError, match="model.name"):
        load_init(str(path), "lstm", {}, task)
    with pytest.raises(ModelError, match=r"model\.kwargs\.pooling: 'foo' .*choose cls, mean, max or none"):
        load_init(str(path), "transformer", {"pooling": "foo"}, task)


def test_freeze_gradual_unfreezing_and_layerwise_lr():
    model = MODELS.create("transformer", **TINY_ENCODER)
    groups = layer_groups(model)
    assert len(groups) == 5  # embeddings, 3 blocks, head
    freeze(model, 2)
    assert not any(p.requires_grad for p in groups[0] + groups[1])
    assert all(p.requires_grad for p in groups[2] + groups[4])

    class FakeTrainer:
        def __init__(self, epoch):
            self.model, self.state = model, type("S", (), {"epoch": epoch})()

    GradualUnfreezing(start=1, per_epoch=2).on_epoch_start(FakeTrainer(0))
    assert [any(p.requires_grad for p in g) for g in layer_groups(model)] == [False] * 4 + [True]
    GradualUnfreezing(start=1, per_epoch=2).on_epoch_start(FakeTrainer(1))
    assert [any(p.requires_grad for p in g) for g in layer_groups(model)] == [False, False, True, True, True]
    freeze(model, 0)
    lrs = sorted({g["lr"] for g in layerwise_lr_groups(model, 1.0, 0.5, weight_decay=0.01)}, reverse=True)
    assert lrs == [1.0, 0.5, 0.25, 0.125, 0.0625]


def test_layerwise_lr_groups_drive_the_trainer_optimizer_and_schedule():
    model = MODELS.create("transformer", **TINY_ENCODER)
    groups = layerwise_lr_groups(model, 1e-3, 0.5, weight_decay=0.01)
    opt = build_optimizer(model, "adamw", lr=1e-3, groups=groups)
    sched = build_schedule(opt, "constant", warmup_steps=1, total_steps=10)
    assert len(opt.param_groups) > 2
    assert sum(len(g["params"]) for g in opt.param_groups) == len(list(model.parameters()))
    assert max(g["lr"] for g in opt.param_groups) == pytest.approx(5e-4)  # half-way through warm-up
    opt.step()
    sched.step()
    assert max(g["lr"] for g in opt.param_groups) == pytest.approx(1e-3)
    assert min(g["lr"] for g in opt.param_groups) == pytest.approx(1e-3 * 0.5**4)


def test_sentence_embedding_task_embeds_and_trains():
    torch.manual_seed(0)
    model = MODELS.create("transformer", **TINY_ENCODER)
    task = SentenceEmbedding.from_state({"tokenizer": word_tokenizer(), "normalize": True, "max_length": 8})
    vectors = task.embed(model, ["good film", "dull plot great bad film", "great"])
    assert vectors.shape == (3, 16) and vectors.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    np.testing.assert_allclose(task.embed(model, "great")[0], vectors[2], atol=1e-6)
    batch = task.collate(task.encode([{"text": "good film", "positive": "great film"},
                                      {"text": "dull plot", "positive": "bad plot"}]))
    loss, out = task.loss(model, batch)
    loss.backward()
    assert out["scores"].shape == (2, 2) and model.embeddings.word.weight.grad is not None
    with pytest.raises(DataError):
        task.embed(model, [])


def byte_bpe() -> str:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    from tokenizers import trainers

    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(["the cat sat on the mat", "café crème brûlée"] * 5, trainer)
    return tok.to_str()


TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
            "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def test_causal_lm_learns_a_text_and_generates():
    torch.manual_seed(0)
    task = CausalLM(block_size=16, vocab_size=300)
    records = [{"text": "the cat sat on the mat. " * 4}] * 4
    task.setup(records)
    assert task.stop_ids == [0]
    model = MODELS.create("lm", **task.model_kwargs(), hidden=32, layers=2, heads=4, kv_heads=2, intermediate=64)
    items = task.encode(records)
    assert all(len(it["input_ids"]) <= 16 for it in items)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    batch = task.collate(items)
    first = None
    for _ in range(60):
        loss, out = task.loss(model, batch)
        first = first if first is not None else loss.item()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < first / 3
    metric = task.metric()
    metric.update(out, batch)
    assert metric.compute()["perplexity"] < 10
    restored = CausalLM.from_state(json.loads(json.dumps(task.state())))
    text = restored.generate(model.eval(), "the cat", max_new_tokens=6)
    assert isinstance(text, str) and text.startswith(" sat")
    assert "".join(restored.generate(model, "the cat", max_new_tokens=6, stream=True)) == text
    assert restored.generate(model, "the cat", max_new_tokens=12, stop=["mat"]).endswith("the ")


def test_chat_template_and_streaming_detokenizer():
    prompt = render_chat(TEMPLATE, [{"role": "user", "content": "hi"}])
    assert prompt == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    task = CausalLM(tokenizer=byte_bpe(), chat_template=TEMPLATE)
    assert task.prompt_text("hi", chat=True, system="be brief").startswith("<|im_start|>system\nbe brief")
    tok = task.tokenizer
    ids = tok.encode("café crème", add_special_tokens=False).ids
    byte_ids = [tok.token_to_id(c) for c in "cafÃ©"]  # "é" as two byte tokens: never split mid-character
    pieces = list(_detokenize(tok, iter(byte_ids + ids[-3:]), set(), ()))
    assert "".join(pieces) == "café" + tok.decode(ids[-3:]) and all("\ufffd" not in p for p in pieces)
    with pytest.raises(DataError, match="chat template"):
        CausalLM(tokenizer=byte_bpe()).prompt_text("hi", chat=True)


def test_generation_says_why_it_ended():
    from dapeng.tasks.causal_lm import Generation

    tok = CausalLM(tokenizer=byte_bpe()).tokenizer
    ids = tok.encode("the cat sat", add_special_tokens=False).ids
    ran_out = Generation(tok, iter(ids), set(), ())
    assert ran_out.finish_reason is None and "".join(ran_out) == "the cat sat" and ran_out.finish_reason == "length"
    stop_token = Generation(tok, iter(ids[:2] + [999] + ids[2:]), {999}, ())
    assert "".join(stop_token) == tok.decode(ids[:2]) and stop_token.finish_reason == "stop"
    stop_string = Generation(tok, iter(ids), set(), (" sat",))
    assert "".join(stop_string) == "the cat" and stop_string.finish_reason == "stop"


def _finetune_config(tmp_path, init, **model_keys):
    from dapeng.config import RunConfig

    rows = ["text,label"] + [f"{w} film {w},{'pos' if w in ('good', 'great') else 'neg'}"
                             for w in ("good", "bad", "great", "dull") for _ in range(6)]
    (tmp_path / "reviews.csv").write_text("\n".join(rows) + "\n")
    return RunConfig.model_validate({
        "task": "text-classification", "task_options": {"max_length": 16},
        "data": {"train": str(tmp_path / "reviews.csv")},
        "model": {"name": "transformer", "init": str(init), **model_keys},
        "train": {"epochs": 3, "batch_size": 8, "optimizer": {"name": "adamw", "lr": 5e-3, "layerwise_decay": 0.8},
                  "precision": "fp32", "log_every": 1},
    })


def test_lora_from_a_config_trains_adapters_only_and_saves_a_merged_model(pretrained, tmp_path):
    import dapeng
    from dapeng.runner import train

    path, source = pretrained
    cfg = _finetune_config(tmp_path, path, lora={"rank": 2, "targets": ["q", "v"]})
    result = train(cfg, tmp_path / "run", progress=False)
    fraction = result["metrics"]["train"]["trainable_fraction"]
    assert 0 < fraction < 0.2
    saved = dapeng.load(tmp_path / "run", precision="fp32").model.cpu()
    keys = saved.state_dict().keys()
    assert not any("lora" in k or ".base." in k for k in keys)  # merged: the plain architecture
    # the frozen parts are the pretrained weights; the adapted ones moved
    ref = source.state_dict()
    assert torch.equal(saved.state_dict()["layers.0.ffn.up.weight"], ref["layers.0.ffn.up.weight"])
    q = next(k for k in keys if k.startswith("layers.0.") and k.endswith("q.weight"))
    assert not torch.equal(saved.state_dict()[q], ref[q])
    assert "LoRA rank 2" in (tmp_path / "run" / "model" / "card.md").read_text()


def test_freeze_from_a_config_keeps_the_lowest_groups(pretrained, tmp_path):
    import dapeng
    from dapeng.runner import train

    path, source = pretrained
    train(_finetune_config(tmp_path, path, freeze=2), tmp_path / "run", progress=False)
    saved = dapeng.load(tmp_path / "run", precision="fp32").model.cpu().state_dict()
    ref = source.state_dict()
    frozen = [k for k in ref if k.startswith(("embeddings.", "layers.0."))]
    assert frozen and all(torch.equal(saved[k], ref[k]) for k in frozen)
    assert not torch.equal(saved["layers.2.ffn.up.weight"], ref["layers.2.ffn.up.weight"])


def test_conflicting_finetune_keys_are_one_config_error(pretrained, tmp_path):
    from dapeng.runner import train

    path, _ = pretrained
    with pytest.raises(ConfigError, match="model.lora and model.freeze"):
        train(_finetune_config(tmp_path, path, lora={"rank": 2}, freeze=1), tmp_path / "a", progress=False)
    with pytest.raises(ConfigError, match="model.lora.targets"):
        train(_finetune_config(tmp_path, path, lora={"targets": ["nope"]}), tmp_path / "b", progress=False)


@pytest.fixture
def pretrained_lm(tmp_path):
    """A tiny `lm` saved as a GGUF conversion is: its own BPE, chat template, stop ids [0, 2]."""
    torch.manual_seed(0)
    tokenizer = byte_bpe()
    task = CausalLM(tokenizer=tokenizer, chat_template=TEMPLATE, bos_id=1, eos_id=2, pad_id=2, stop_ids=[0, 2],
                    max_length=64)
    kwargs = {"vocab_size": 300, "pad_id": 2, "hidden": 32, "layers": 1, "heads": 4, "kv_heads": 2,
              "intermediate": 64, "max_positions": 64}
    model = MODELS.create("lm", **kwargs)
    path = save_artifact(tmp_path / "lm", model=model, model_name="lm", model_kwargs=kwargs, task_name="causal-lm",
                         task_state=task.state())
    return path, tokenizer


def test_finetuning_an_lm_keeps_its_tokenizer_chat_template_and_stop_ids(pretrained_lm, tmp_path, monkeypatch):
    import tokenizers.trainers

    import dapeng
    from dapeng.config import RunConfig
    from dapeng.runner import build_task_and_model, train

    path, tokenizer = pretrained_lm

    def no_training(*args, **kwargs):
        raise AssertionError("a throw-away tokenizer was trained")

    monkeypatch.setattr(tokenizers.trainers, "BpeTrainer", no_training)
    (tmp_path / "text.txt").write_text("the cat sat on the mat\n" * 20)
    cfg = RunConfig.model_validate({
        "task": "causal-lm", "task_options": {"block_size": 16}, "data": {"train": str(tmp_path / "text.txt")},
        "model": {"name": "lm", "init": str(path)},
        "train": {"epochs": 1, "max_steps": 2, "batch_size": 4, "precision": "fp32"},
    })
    task, _, _ = build_task_and_model(cfg, [{"text": "some other text"}] * 4)
    assert task.tokenizer_json == tokenizer  # no throw-away BPE learned from the records
    assert (task.chat_template, task.stop_ids, task.eos_id, task.bos_id) == (TEMPLATE, [0, 2], 2, 1)
    train(cfg, tmp_path / "run", progress=False)
    tuned = dapeng.load(tmp_path / "run", precision="fp32").task
    assert (tuned.chat_template, tuned.stop_ids, tuned.eos_id) == (TEMPLATE, [0, 2], 2)


def test_finetuning_sentence_embeddings_from_a_config_takes_the_pretrained_tokenizer(pretrained):
    from dapeng.config import RunConfig
    from dapeng.runner import build_task_and_model

    path, _ = pretrained
    cfg = RunConfig.model_validate({"task": "sentence-embedding", "data": {"dataset": "digits"},
                                    "model": {"name": "transformer", "init": str(path)}})
    task, model, _ = build_task_and_model(cfg, [{"text": "good film", "positive": "great film"}])
    assert task.tokenizer.token_to_id("good") == 4 and task.max_length == 16
    assert task.embed(model, ["good film"]).shape == (1, 16)
