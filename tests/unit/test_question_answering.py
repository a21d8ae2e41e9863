"""question-answering: SQuAD's normalisation and scores, strided windows, offsets, no-answer, the SQuAD reader."""

from __future__ import annotations

import json

import pytest
import torch

from dapeng.data.readers import infer_format, read_records, read_squad
from dapeng.errors import DataError
from dapeng.models import MODELS
from dapeng.tasks import TASKS
from dapeng.tasks.question_answering import exact_match, f1_score, normalize_answer, score_answers

pytestmark = pytest.mark.usefixtures("one_thread")


# ---------------------------------------------------------------- SQuAD's evaluation


@pytest.mark.parametrize(("text", "normal"), [
    ("The Cat, sat!", "cat sat"),              # lower case, punctuation, articles
    ("an apple a day", "apple day"),
    ("  Denver   Broncos ", "denver broncos"),   # whitespace
    ("the theory", "theory"),                  # "the" only as a word
    ("Théâtre", "théâtre"),                    # no accent stripping in the official script
    ("A.B.C.", "abc"),                         # punctuation goes before articles are looked for
])
def test_normalisation_is_the_official_scripts(text, normal):
    assert normalize_answer(text) == normal


def test_exact_match_and_f1_as_the_official_script_scores_them():
    assert exact_match("the Denver Broncos", "Denver Broncos!") == 1.0
    assert exact_match("Broncos", "Denver Broncos") == 0.0
    # precision 1/1, recall 1/2
    assert f1_score("Broncos", "Denver Broncos") == pytest.approx(2 / 3)
    assert f1_score("Carolina Panthers", "Denver Broncos") == 0.0
    # repeated tokens count once per occurrence (Counter intersection)
    assert f1_score("go go go", "go") == pytest.approx(2 * (1 / 3) * 1 / (1 / 3 + 1))
    # v2: an empty answer scores 1 only against an empty gold
    assert f1_score("", "") == 1.0 and f1_score("", "Denver") == 0.0 and f1_score("a", "") == 1.0


def test_scores_take_the_max_over_gold_answers_and_no_gold_means_no_answer():
    assert score_answers("Denver", ["Broncos", "Denver", "the Denver Broncos"]) == (1.0, 1.0)
    assert score_answers("", []) == (1.0, 1.0)
    assert score_answers("Denver", []) == (0.0, 0.0)


# ---------------------------------------------------------------- windows and offsets


def _word_task(**options):
    task = TASKS.create("question-answering", tokenizer="word", **options)
    context = "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu"
    task.setup([{"question": "which letter ?", "context": context, "answers": []}])
    return task, context


def test_windows_overlap_by_stride_and_cover_the_context():
    task, _ = _word_task(max_length=10, stride=2, max_question_length=2)
    # budget 10 - 2 - 3 = 5 context tokens per window, 3 new ones each step
    assert task.windows(12, 2) == [(0, 5), (3, 8), (6, 11), (9, 12)]
    assert task.windows(4, 2) == [(0, 4)]
    with pytest.raises(DataError, match="max_length"):
        task.windows(12, 7)


def test_the_answer_in_the_second_window_is_found_and_mapped_back_to_characters():
    task, context = _word_task(max_length=10, stride=2, max_question_length=2)
    text = "They said it was not ,  Theta they asked"  # odd spacing and case: the answer comes back as written
    start = text.index("Theta")
    record = {"question": "which letter", "context": text, "answers": [{"text": "Theta", "answer_start": start}]}
    (item,) = task.encode([record])
    assert item["input_ids"].shape[0] == 3  # windows of tokens 0-4, 3-7, 6-8 of the nine
    assert item["start"][0] == 0 and item["start"][1] > 0  # "theta" (token 6) is not in the first window
    batch = task.collate([item])
    rows, width = batch["input_ids"].shape
    # scores that pick "theta" in the second window only
    logits = torch.full((rows, width, 2), -5.0)
    second = 1
    position = int((batch["context_index"][second] == 6).nonzero()[0, 0])  # context token 6: "theta"
    logits[second, position] = 5.0

    class Fixed(torch.nn.Module):
        def forward(self, input_ids, attention_mask=None, token_type_ids=None):
            return logits

    (answer,) = task.decode(task.forward(Fixed(), batch))
    assert answer["answer"] == "Theta" and (answer["start"], answer["end"]) == (start, start + 5)
    assert text[answer["start"] : answer["end"]] == "Theta"
    assert 0.0 < answer["score"] <= 1.0


def test_training_targets_point_at_the_answer_tokens_or_cls():
    task, context = _word_task(max_length=10, stride=2, max_question_length=2)
    start = context.index("kappa")
    (item,) = task.encode([{"question": "which", "context": context,
                            "answers": [{"text": "kappa lambda", "answer_start": start}]}])
    ids = item["input_ids"]
    hits = [(r, int(item["start"][r]), int(item["end"][r])) for r in range(ids.shape[0]) if item["start"][r] > 0]
    assert hits, "some window holds the whole answer"
    for r, s, e in hits:
        assert task.tokenizer.decode(ids[r, s : e + 1].tolist()) == "kappa lambda"
    assert (item["start"] == 0).sum() >= 1  # the windows without it train on [CLS]
    assert (item["token_type_ids"][:, :3] == 0).all() and (item["token_type_ids"][:, 3] == 1).all()


def test_no_answer_follows_the_threshold():
    task, _ = _word_task(max_length=16, no_answer=True)
    (item,) = task.encode([{"question": "which", "context": "alpha beta gamma"}])
    batch = task.collate([item])
    logits = torch.zeros((1, batch["input_ids"].shape[1], 2))
    logits[0, 0] = 2.0  # [CLS]: null score 4
    beta = int((batch["context_index"][0] == 1).nonzero()[0, 0])
    logits[0, beta] = 1.5  # best span "beta": 3

    class Fixed(torch.nn.Module):
        def forward(self, input_ids, attention_mask=None, token_type_ids=None):
            return logits

    outputs = task.forward(Fixed(), batch)
    assert task.decode(outputs)[0] == {"answer": "", "score": pytest.approx(task.decode(outputs)[0]["score"]),
                                       "start": None, "end": None}
    raised, _ = _word_task(max_length=16, no_answer=True, null_threshold=1.5)
    assert raised.decode(outputs)[0]["answer"] == "beta"  # null ahead by 1.0 only
    never, _ = _word_task(max_length=16, no_answer=False)
    assert never.decode(outputs)[0]["answer"] == "beta"


def test_no_answer_defaults_to_whether_training_has_unanswerable_questions():
    answered = {"question": "q", "context": "a b", "answers": [{"text": "b", "answer_start": 2}]}
    task = TASKS.create("question-answering", tokenizer="word")
    task.setup([answered])
    assert task.no_answer is False
    task.setup([answered, {"question": "q", "context": "a b", "answers": []}])
    assert task.no_answer is True


def test_a_tiny_model_learns_to_answer_and_round_trips_its_state():
    torch.manual_seed(0)
    contexts = ["red fox runs fast", "blue cat sleeps late", "green owl sings well"]
    records = [{"question": f"what does the {c.split()[1]} do", "context": c,
                "answers": [{"text": c.split()[2], "answer_start": c.index(c.split()[2])}]} for c in contexts]
    task = TASKS.create("question-answering", tokenizer="word", max_length=16)
    task.setup(records)
    model = MODELS.create("transformer", **{**task.model_kwargs(), "hidden": 32, "layers": 1, "heads": 2,
                                            "intermediate": 64, "max_positions": 16, "dropout": 0.0})
    batch = task.collate(task.encode(records))
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for _ in range(150):
        loss, _ = task.loss(model, batch)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()
    rebuilt = type(task).from_state(json.loads(json.dumps(task.state())))
    with torch.inference_mode():
        answers = rebuilt.decode(rebuilt.forward(model, rebuilt.collate(rebuilt.encode(records))))
    assert [a["answer"] for a in answers] == ["runs", "sleeps", "sings"]
    metric = task.metric()
    with torch.inference_mode():
        metric.update(task.forward(model, batch), batch)
    assert metric.compute() == {"exact_match": 100.0, "f1": 100.0}


def test_bad_records_name_the_record():
    task = TASKS.create("question-answering", tokenizer="word")
    with pytest.raises(DataError, match="record 0: 'context' must be a string"):
        task.setup([{"question": "q", "answers": []}])
    with pytest.raises(DataError, match="record 0: training record has no 'answers'"):
        task.setup([{"question": "q", "context": "a b"}])
    with pytest.raises(DataError, match="record 1: answer 0 is not the context's text"):
        task.setup([{"question": "q", "context": "a b", "answers": []},
                    {"question": "q", "context": "a b", "answers": [{"text": "b", "answer_start": 0}]}])


# ---------------------------------------------------------------- the SQuAD reader


def _squad(tmp_path, qas, name="dev.json", version="v2.0"):
    path = tmp_path / name
    doc = {"version": version, "data": [{"title": "Denver", "paragraphs": [
        {"context": "The Denver Broncos won Super Bowl 50.", "qas": qas}]}]}
    path.write_text(json.dumps(doc))
    return path


def test_squad_v1_and_v2_files_read_into_question_records(tmp_path):
    path = _squad(tmp_path, [
        {"id": "q1", "question": "Who won?", "answers": [{"text": "Denver Broncos", "answer_start": 4},
                                                         {"text": "The Denver Broncos", "answer_start": 0}]},
        {"id": "q2", "question": "Who lost?", "answers": [], "is_impossible": True,
         "plausible_answers": [{"text": "Broncos", "answer_start": 11}]},
    ])
    assert infer_format(path) == "squad"
    records = read_records(path)
    assert records == read_squad(path)
    assert [r["id"] for r in records] == ["q1", "q2"]
    assert records[0]["answers"][1] == {"text": "The Denver Broncos", "answer_start": 0}
    assert records[1]["answers"] == [] and records[0]["doc"] == "Denver"
    assert records[0]["context"] == "The Denver Broncos won Super Bowl 50."


@pytest.mark.parametrize(("qas", "message"), [
    ([{"id": "q7", "question": "Who?", "answers": [{"text": "Broncos", "answer_start": 3}]}],
     r"dev.json: article 0 paragraph 0 question 0 \(id q7\): answer 0 'Broncos' is not the context's text at 3"),
    ([{"id": "q8", "question": "", "answers": []}], r"question 0: needs a non-empty \"question\" string"),
    ([{"id": "q9", "question": "Who?", "answers": [{"text": "Denver"}]}],
     r"\(id q9\): answer 0 needs \"text\" \(a string\) and \"answer_start\" \(an integer\)"),
])
def test_bad_squad_entries_name_the_file_and_the_question(tmp_path, qas, message):
    with pytest.raises(DataError, match=message):
        read_squad(_squad(tmp_path, qas))


def test_a_file_that_is_not_squad_says_so(tmp_path):
    path = tmp_path / "x.json"
    path.write_text('{"data": 3}')
    with pytest.raises(DataError, match='no "data" list of articles'):
        read_squad(path)
    path.write_text('{"data": [')
    with pytest.raises(DataError, match="invalid JSON"):
        read_squad(path)


# ---------------------------------------------------------------- the Pipeline and the command line


@pytest.fixture(scope="module")
def artifact(tmp_path_factory):
    from dapeng.hub.artifact import save_artifact

    torch.manual_seed(0)
    records = [{"question": "which", "context": "alpha beta gamma", "answers": [{"text": "beta", "answer_start": 6}]}]
    task = TASKS.create("question-answering", tokenizer="word", max_length=16)
    task.setup(records)
    kwargs = {**task.model_kwargs(), "hidden": 16, "layers": 1, "heads": 2, "intermediate": 32, "max_positions": 16}
    model = MODELS.create("transformer", **kwargs).eval()
    return save_artifact(tmp_path_factory.mktemp("qa") / "model", model=model, model_name="transformer",
                         model_kwargs=kwargs, task_name="question-answering", task_state=task.state(),
                         precision="fp32")


def test_the_pipeline_takes_question_records_and_refuses_a_bare_question(artifact):
    from dapeng.pipeline import InputError, load

    pipe = load(artifact)
    assert pipe.capabilities.fields == ("question", "context")
    answer = pipe.predict({"question": "which", "context": "alpha beta gamma"})
    assert set(answer) == {"answer", "score", "start", "end"} and answer["answer"] in "alpha beta gamma"
    with pytest.raises(InputError, match="input 0 must be a record with the fields question, context"):
        pipe.predict("which")
    with pytest.raises(InputError, match=r"input 0.context must be a string"):
        pipe.predict({"question": "which", "context": 3})


def test_predict_cli_asks_questions_of_a_context_file_or_reads_json_records(artifact, tmp_path, capsys):
    from dapeng.cli.main import main

    story = tmp_path / "story.txt"
    story.write_text("alpha beta gamma")
    assert main(["predict", str(artifact), "--context", str(story), "which", "--json"]) == 0
    by_file = json.loads(capsys.readouterr().out)
    assert by_file["question"] == "which" and by_file["context"] == "alpha beta gamma"
    record = json.dumps({"question": "which", "context": "alpha beta gamma"})
    assert main(["predict", str(artifact), record, "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["prediction"] == by_file["prediction"]
    assert main(["predict", str(artifact), "which"]) == 2
    assert "a question needs a context" in capsys.readouterr().err


def test_v2_reads_a_bytes_tensor_per_field_into_records():
    from dapeng.errors import DapengError
    from dapeng.serve import v2
    from dapeng.serve.schemas import V2Tensor
    from dapeng.tasks.question_answering import QuestionAnswering

    caps = QuestionAnswering.capabilities
    assert [s.name for s in v2.input_specs(caps)] == ["question", "context"]
    tensors = [V2Tensor(name="context", shape=[2], datatype="BYTES", data=["alpha beta", "gamma"]),
               V2Tensor(name="question", shape=[2], datatype="BYTES", data=["which", "what"])]
    assert v2.instances_from(tensors, caps, 8) == [{"context": "alpha beta", "question": "which"},
                                                   {"context": "gamma", "question": "what"}]
    with pytest.raises(DapengError, match=r"expected tensors \['question', 'context'\]"):
        v2.instances_from(tensors[:1], caps, 8)
    with pytest.raises(DapengError, match="the tensors' batch sizes differ"):
        v2.instances_from([tensors[0], V2Tensor(name="question", shape=[1], datatype="BYTES", data=["q"])], caps, 8)


@pytest.mark.data
def test_brown_qa_is_split_by_document_and_paraphrases_every_content_word():
    from dapeng.data.brown_qa import _CONTENT, _base
    from dapeng.data.catalog import load_dataset

    splits = load_dataset("brown-qa")
    docs = {name: {r["doc"] for r in records} for name, records in splits.items()}
    assert not docs["train"] & docs["test"] and not docs["eval"] & docs["test"]
    for record in splits["test"][:200]:
        answer = record["answers"][0]
        assert record["context"][answer["answer_start"] :].startswith(answer["text"])
        cloze, question = record["cloze"].split(), record["question"].split()
        assert len(cloze) == len(question) and "what" in cloze
    # the paraphrase changed most words the cloze keeps from its sentence
    changed = sum(c != q for r in splits["test"] for c, q in zip(r["cloze"].split(), r["question"].split()))
    assert changed / sum(len(r["cloze"].split()) for r in splits["test"]) > 0.25
    assert _CONTENT.match(_base("NNS-TL")) and not _CONTENT.match(_base("NP"))


def test_train_step_and_predict_under_bf16(artifact):
    from dapeng.pipeline import Pipeline, load
    from dapeng.train.precision import autocast

    pipe = load(artifact)
    record = {"question": "which", "context": "alpha beta gamma", "answers": [{"text": "beta", "answer_start": 6}]}
    model = pipe.model.train()
    batch = pipe.task.collate(pipe.task.encode([record]))
    with autocast("bf16", torch.device("cpu")):
        loss, _ = pipe.task.loss(model, batch)
    loss.backward()
    assert torch.isfinite(loss) and any(p.grad is not None for p in model.parameters())
    model.zero_grad(set_to_none=True)
    bf16 = Pipeline(model.eval(), pipe.task, precision="bf16", device="cpu")
    answer = bf16.predict({"question": "which", "context": "alpha beta gamma"})
    assert answer["answer"] in "alpha beta gamma" and 0.0 <= answer["score"] <= 1.0
