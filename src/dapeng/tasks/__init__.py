"""Tasks: heads, losses, metrics, decoding and label maps, one file per task; the `TASKS` registry."""

from __future__ import annotations

from dapeng.registry import Registry

TASKS: Registry = Registry("task")

# The one explicit list of tasks: name -> "module:class" (imported on first use).
BUILTIN_TASKS: dict[str, str] = {
    "text-classification": "dapeng.tasks.text_classification:TextClassificationTask",
    "token-classification": "dapeng.tasks.token_classification:TokenClassificationTask",
    "image-classification": "dapeng.tasks.image_classification:ImageClassificationTask",
    "sentence-embedding": "dapeng.tasks.embedding:SentenceEmbedding",
    "causal-lm": "dapeng.tasks.causal_lm:CausalLM",
    "topic-model": "dapeng.tasks.topic_model:TopicModelTask",
    "masked-lm": "dapeng.tasks.masked_lm:MaskedLM",
    "contrastive": "dapeng.tasks.contrastive:Contrastive",
    "question-answering": "dapeng.tasks.question_answering:QuestionAnswering",
    "translation": "dapeng.tasks.seq2seq:Translation",
    "summarization": "dapeng.tasks.seq2seq:Summarization",
    "visual-question-answering": "dapeng.tasks.vqa:VQATask",
    "image-text-contrastive": "dapeng.tasks.image_text:ImageTextContrastiveTask",
}
for _name, _target in BUILTIN_TASKS.items():
    TASKS.register(_name, _target)

__all__ = ["BUILTIN_TASKS", "TASKS"]
