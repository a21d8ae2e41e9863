"""dapeng.explain on tiny models and a test-local fake pipeline (anything with .model/.task/.labels)."""

from __future__ import annotations

import io
import json
from html.parser import HTMLParser

import numpy as np
import pytest
import torch
from PIL import Image
from tokenizers import Tokenizer, models, pre_tokenizers, processors
from torch import nn

from dapeng.errors import DapengError, ModelError, NotFoundError
from dapeng.explain import explain
from dapeng.explain.attention import rollout
from dapeng.explain.batching import internal_batch_size
from dapeng.layers.attention import capture_attention
from dapeng.models import MODELS
from dapeng.pipeline import Pipeline
from dapeng.tasks.base import Capabilities, UnsupportedError
from dapeng.tasks.causal_lm import CausalLM
from dapeng.tasks.image_classification import ImageClassificationTask
from dapeng.tasks.text_classification import TextClassificationTask

torch.set_num_threads(1)

WORDS = ["a", "the", "film", "movie", "great", "awful", "witty", "dull", "plot", ",", ".", "!", "is", "was"]


def word_tokenizer() -> Tokenizer:
    vocab = {"[PAD]": 0, "[UNK]": 1, "[CLS]": 2, "[SEP]": 3, **{w: i + 4 for i, w in enumerate(WORDS)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", special_tokens=[("[CLS]", 2), ("[SEP]", 3)]
    )
    return tok


class FakeTextTask:
    name = "text-classification"
    capabilities = TextClassificationTask.capabilities

    def __init__(self) -> None:
        self.tokenizer = word_tokenizer()

    def model_kwargs(self) -> dict:
        return {"vocab_size": self.tokenizer.get_vocab_size(), "pad_id": 0}

    def encode(self, records):
        return [{"input_ids": torch.tensor(self.tokenizer.encode(r["text"]).ids)} for r in records]

    def collate(self, items):
        ids = nn.utils.rnn.pad_sequence([i["input_ids"] for i in items], batch_first=True)
        return {"input_ids": ids, "attention_mask": ids != 0}


class FakeImageTask:
    name = "image-classification"
    capabilities = ImageClassificationTask.capabilities

    def encode(self, records):
        return [{"image": torch.tensor(np.asarray(r["image"]), dtype=torch.float32)[None] / 255.0} for r in records]

    def collate(self, items):
        return {"images": (torch.stack([i["image"] for i in items]) - 0.5) / 0.5}


class FakeTagTask(FakeTextTask):
    capabilities = Capabilities(input="text", output="tags", verbs=frozenset({"predict", "explain"}),
                                explain=("ig", "saliency"))


def FakePipeline(model: nn.Module, task, labels) -> Pipeline:
    return Pipeline(model, task, meta={"labels": labels}, precision="fp32", device="cpu")


def text_pipeline(name: str = "transformer", **kwargs) -> FakePipeline:
    torch.manual_seed(0)
    task = FakeTagTask() if kwargs.get("pooling") == "none" else FakeTextTask()
    small = {"transformer": dict(hidden=16, layers=2, heads=2, intermediate=32, max_positions=64, dropout=0.0),
             "textcnn": dict(embed_dim=8, filters=4, kernel_sizes=(1, 2), dropout=0.0),
             "lstm": dict(embed_dim=8, hidden=8, dropout=0.0)}[name]
    model = MODELS.create(name, num_labels=kwargs.pop("num_labels", 2), **task.model_kwargs(), **small, **kwargs)
    labels = ["rotten", "fresh"] if model(torch.tensor([[2, 3]])).shape[-1] == 2 else ["O", "B-X", "I-X"]
    return FakePipeline(model, task, labels)


def image_pipeline(name: str = "lenet") -> FakePipeline:
    torch.manual_seed(0)
    small = {"lenet": dict(channels=(4, 8), hidden=16, dropout=0.0), "resnet": dict(widths=(4, 8), blocks=(1, 1))}
    model = MODELS.create(name, in_channels=1, image_size=20, num_labels=3, **small[name])
    return FakePipeline(model, FakeImageTask(), ["shirt", "shoe", "bag"])


def an_image() -> np.ndarray:
    rng = np.random.default_rng(0)
    return rng.integers(0, 255, size=(20, 20), dtype=np.uint8)


# ---------------------------------------------------------------- text


def test_text_ig_is_per_word_and_complete():
    pipe = text_pipeline("transformer", pooling="cls")
    text = "the film was great , witty !"
    [e] = explain(pipe, text, method="ig")
    assert e.kind == "text" and e.words == text.split()
    assert [text[s:t] for s, t in e.spans] == e.words
    assert e.scores.shape == (7,) and np.isfinite(e.scores).all()
    assert e.completeness["relative_error"] <= 0.05
    assert abs(e.scores.sum() - e.completeness["output_difference"]) <= 0.05 * abs(
        e.completeness["output_difference"]
    ) + 1e-3


@pytest.mark.parametrize("name", ["textcnn", "lstm"])
def test_text_saliency_and_ig_on_cnn_and_rnn(name):
    pipe = text_pipeline(name)
    sal, ig = (explain(pipe, "a dull plot .", method=m)[0] for m in ("saliency", "ig"))
    assert sal.scores.shape == ig.scores.shape == (4,)
    assert (sal.scores >= 0).all() and sal.scores.max() > 0
    assert ig.completeness["relative_error"] <= 0.05


def test_target_by_name_and_unknown_target():
    pipe = text_pipeline("textcnn")
    [e] = explain(pipe, "great film", target="rotten")
    assert e.label == "rotten" and e.label_index == 0
    with pytest.raises(NotFoundError, match="unknown label"):
        explain(pipe, "great film", target="sideways")
    with pytest.raises(DapengError, match="unknown explanation method"):
        explain(pipe, "great film", method="shap")
    with pytest.raises(UnsupportedError, match="no 'gradcam' explanations"):
        explain(pipe, "great film", method="gradcam")


def test_tagger_gets_one_attribution_row_per_word():
    pipe = text_pipeline("transformer", pooling="none", num_labels=3)
    [e] = explain(pipe, "the plot is dull", method="ig")
    assert e.kind == "tokens" and e.scores.shape == (4, 4)
    assert len(e.tags) == 4 and all(t in pipe.labels for t in e.tags)


def test_small_budget_batches_internally_with_the_same_result():
    pipe = text_pipeline("transformer")
    [big] = explain(pipe, "the movie is awful", method="ig", memory_budget_mb=4096)
    [small] = explain(pipe, "the movie is awful", method="ig", memory_budget_mb=0.01)
    assert small.internal_batch_size == 1 < big.internal_batch_size
    np.testing.assert_allclose(small.scores, big.scores, atol=1e-5)


def test_internal_batch_size_bounds():
    assert internal_batch_size(10 * 2**20, 2048, 50) == 50
    assert internal_batch_size(100 * 2**20, 1000, 400) == 5
    assert internal_batch_size(10**12, 1, 400) == 1


# ---------------------------------------------------------------- attention


def test_attention_rows_sum_to_one_and_capturing_does_not_change_outputs():
    pipe = text_pipeline("transformer")
    ids = torch.tensor([[2, 5, 6, 10, 3, 0, 0]])
    mask = ids != 0
    plain = pipe.model(ids, mask)
    with capture_attention(pipe.model) as maps:
        captured = pipe.model(ids, mask)
    torch.testing.assert_close(plain, captured, atol=1e-5, rtol=1e-5)
    assert len(maps) == 2 and maps[0].shape == (1, 2, 7, 7)
    for m in maps:
        torch.testing.assert_close(m.sum(-1), torch.ones(1, 2, 7))
        assert float(m[..., 5:].detach().abs().max()) == 0.0  # padded keys get no weight
    roll = rollout(maps)
    torch.testing.assert_close(roll.sum(-1), torch.ones(1, 7))


@pytest.mark.parametrize("method", ["attention", "rollout"])
def test_attention_explanations(method):
    pipe = text_pipeline("transformer", pooling="cls")
    [e] = explain(pipe, "a witty movie", method=method)
    assert e.kind == "attention" and e.scores.shape == (3,)
    assert e.rollout.shape == (5, 5)  # [CLS] a witty movie [SEP]
    assert len(e.attention) == 2 and e.attention[0].shape == (2, 5, 5)


def test_value_weighted_attention_counts_what_a_token_passes_on():
    from dapeng.explain.attention import query_weights, value_weighted
    from dapeng.layers.attention import MultiHeadAttention

    torch.manual_seed(0)
    layer = MultiHeadAttention(4, 2, bias=False)
    with torch.no_grad():
        layer.v.weight.copy_(torch.eye(4))
        layer.o.weight.copy_(torch.eye(4))
    inputs = torch.tensor([[[1.0, 0, 0, 0], [0, 0, 0, 0], [0, 3.0, 0, 0]]])  # token 1 carries nothing
    weights = torch.full((1, 2, 3, 3), 1 / 3)  # every query looks at every token alike
    weights[:, :, :, 1] = 0.8  # ... and mostly at the empty token
    weights[:, :, :, [0, 2]] = 0.1
    scores = value_weighted(weights, layer, inputs, query_weights(3, 1, None, "mean"))[0]
    torch.testing.assert_close(scores, torch.tensor([0.1, 0.0, 0.3]))  # weight x norm of W_o v
    cls = query_weights(3, 1, torch.tensor([[1, 1, 0]]), "cls")
    assert cls.tolist() == [[1.0, 0.0, 0.0]]
    assert query_weights(3, 1, torch.tensor([[1, 1, 0]]), "mean").tolist() == [[0.5, 0.5, 0.0]]


def test_attention_needs_attention_layers():
    with pytest.raises(ModelError, match="no attention layers"):
        explain(text_pipeline("lstm"), "a witty movie", method="attention")


def test_language_model_attention_over_prompt(tmp_path):
    torch.manual_seed(0)
    task = FakeLMTask()
    lm = MODELS.create("lm", vocab_size=task.tokenizer.get_vocab_size(), hidden=16, layers=2, heads=4, kv_heads=2,
                       intermediate=32, max_positions=32)
    pipe = FakePipeline(lm, task, None)
    [e] = explain(pipe, "the plot was dull", method="attention", target=1)
    assert e.kind == "attention" and len(e.extra["generated"]) == 2
    assert len(e.attention) == 2 and e.attention[0].shape == (4, 5)  # 4 prompt tokens + 1 generated
    torch.testing.assert_close(torch.tensor(e.attention[0].sum(-1)), torch.ones(4))
    assert e.scores.shape == (4,)
    assert _png_info(e.save(tmp_path / "lm.png"))["predicted"] == e.predicted
    with pytest.raises(UnsupportedError, match="choose one of: attention, rollout"):
        explain(pipe, "the plot was dull", method="ig")
    for bad in (-5, "-5", "first", 10**6, True):  # was an IndexError (HTTP 500) for -5
        with pytest.raises(NotFoundError, match="generated token"):
            explain(pipe, "the plot was dull", method="attention", target=bad)


# ---------------------------------------------------------------- images


@pytest.mark.parametrize("name", ["lenet", "resnet"])
def test_gradcam_map_has_the_input_spatial_size(name):
    [e] = explain(image_pipeline(name), an_image(), method="gradcam")
    assert e.kind == "image" and e.scores.shape == (20, 20)
    assert (e.scores >= 0).all()


def test_image_ig_and_saliency():
    pipe = image_pipeline("lenet")
    [ig] = explain(pipe, an_image(), method="ig", target="bag")
    [sal] = explain(pipe, an_image(), method="saliency")
    assert ig.label == "bag" and ig.scores.shape == sal.scores.shape == (20, 20)
    assert ig.completeness["relative_error"] <= 0.05
    assert ig.image.shape == (20, 20, 1)


# ---------------------------------------------------------------- rendering


class _Collect(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.text: list[str] = []
        self.urls: list[str] = []

    def handle_data(self, data: str) -> None:
        self.text.append(data)

    def handle_starttag(self, tag, attrs) -> None:
        self.urls += [v for k, v in attrs if k in ("href", "src") and v]


def _parse(path) -> _Collect:
    parser = _Collect()
    parser.feed(path.read_text(encoding="utf-8"))
    parser.close()
    return parser


def _png_info(path) -> dict:
    with Image.open(path) as img:
        img.load()
        assert img.size[0] > 50 and img.size[1] > 50
        return json.loads(img.info["Description"])


def test_text_html_parses_and_contains_the_prediction(tmp_path):
    [e] = explain(text_pipeline("transformer"), "the film was great", method="ig")
    page = _parse(e.save(tmp_path / "report.html"))
    text = "".join(page.text)
    assert f"Prediction: {e.predicted} ({e.predicted_probability:.1%})" in text
    assert "the film was great" in text
    assert all(u.startswith("data:") for u in page.urls)  # self-contained: nothing fetched
    assert _png_info(e.save(tmp_path / "report.png"))["predicted"] == e.predicted


def test_image_png_decodes_and_contains_the_prediction(tmp_path):
    [e] = explain(image_pipeline(), an_image(), method="gradcam")
    info = _png_info(e.save(tmp_path / "cam.png"))
    assert info["predicted"] == e.predicted and info["method"] == "gradcam"
    page = _parse(e.save(tmp_path / "cam.html"))
    assert e.predicted in "".join(page.text) and page.urls[0].startswith("data:image/png;base64,")


def test_attention_png_and_tagger_html(tmp_path):
    [att] = explain(text_pipeline("transformer"), "a dull movie", method="attention")
    assert _png_info(att.save(tmp_path / "att.png"))["predicted"] == att.predicted
    [tags] = explain(text_pipeline("transformer", pooling="none", num_labels=3), "a dull movie")
    text = "".join(_parse(tags.save(tmp_path / "tags.html")).text)
    assert tags.predicted in text or all(t in text for t in tags.tags)


def test_unknown_suffix_is_an_error(tmp_path):
    [e] = explain(image_pipeline(), an_image(), method="saliency")
    with pytest.raises(DapengError, match="use a .html or .png"):
        e.save(tmp_path / "x.pdf")
    assert not list(tmp_path.iterdir())


def test_image_bytes_input():
    buf = io.BytesIO()
    Image.fromarray(an_image()).save(buf, format="PNG")
    [e] = explain(image_pipeline(), buf.getvalue(), method="saliency")
    assert e.scores.shape == (20, 20)


# ---------------------------------------------------------------- faithfulness


class LinearImage(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(400, 3)

    def forward(self, images):
        return self.fc(images.flatten(1))


def test_deletion_curve_ranks_faithful_orders_lower():
    from dapeng.explain.faithfulness import completeness_rate, deletion_auc, deletion_curve

    torch.manual_seed(0)
    pipe = FakePipeline(LinearImage(), FakeImageTask(), ["shirt", "shoe", "bag"])
    [e] = explain(pipe, an_image(), method="ig")
    ig_auc = deletion_auc(pipe, an_image(), e.label_index, scores=e.scores)
    rng = np.random.default_rng(0)
    random_auc = np.mean([deletion_auc(pipe, an_image(), e.label_index, order=rng.permutation(400)) for _ in range(5)])
    assert ig_auc < random_auc
    fractions, curve, _ = deletion_curve(
        lambda b: b.sum(1), torch.ones(1, 4), torch.zeros(1, 4), torch.arange(4)[None], np.arange(4)
    )
    np.testing.assert_allclose(fractions, [0, 0.25, 0.5, 0.75, 1])
    np.testing.assert_allclose(curve, [4, 3, 2, 1, 0])
    assert completeness_rate([e.completeness]) == 1.0


def test_text_deletion_auc_runs_on_words():
    from dapeng.explain.faithfulness import deletion_auc

    pipe = text_pipeline("textcnn")
    [e] = explain(pipe, "the plot was dull .", method="saliency")
    assert 0.0 <= deletion_auc(pipe, "the plot was dull .", e.label_index, scores=e.scores) <= 1.0


def test_truncated_input_aligns_the_words_it_kept():
    from dapeng.explain.words import align_words

    task = FakeTextTask()
    text = "the film was great"
    ids = task.tokenizer.encode(text).ids  # [CLS] the film was great [SEP]
    truncated = ids[:3] + ids[-1:]  # [CLS] the film [SEP], as tasks truncate
    a = align_words(task, text, truncated)
    assert a.words == ["the", "film"] and a.word_of_token == [None, 0, 1, None]
    assert a.spans == [(0, 3), (4, 8)]


def test_half_precision_models_are_explained_in_fp32():
    pipe = image_pipeline("lenet")
    pipe.model.to(torch.bfloat16)
    [e] = explain(pipe, an_image(), method="ig")
    assert e.completeness["relative_error"] <= 0.05
    assert next(pipe.model.parameters()).dtype == torch.bfloat16  # the pipeline's own model is untouched


class FakeLMTask(FakeTextTask):
    capabilities = CausalLM.capabilities

    def prompt_ids(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False).ids


def test_language_model_prompt_is_encoded_as_generate_encodes_it():
    torch.manual_seed(0)
    task = FakeLMTask()
    lm = MODELS.create("lm", vocab_size=task.tokenizer.get_vocab_size(), hidden=16, layers=1, heads=2, kv_heads=1,
                       intermediate=32, max_positions=32)
    [e] = explain(FakePipeline(lm, task, None), "the plot was dull", method="attention")
    assert e.tokens == ["the", "plot", "was", "dull"] and e.attention[0].shape == (2, 4)
    assert e.words == ["the", "plot", "was", "dull"]
