"""Task `topic-model`: documents → a mix of topics, each topic a distribution over words.

Records are `{"text": str, ...}` (no labels). `setup` builds the bag-of-words vocabulary on the
training texts with scikit-learn's CountVectorizer (`min_df`, `max_df`, `max_features`, stop
words); items are a document's word ids and counts, collated into a dense (B, V) count matrix.
With `contextual: true` each document also carries its sentence embedding from a pretrained
encoder (MiniLM: contextualized topic models, Bianchi et al. 2021).

The loss is the negative ELBO per document of a ProdLDA VAE (`dapeng.models.prodlda`): the
reconstruction −Σ n_w log p(w | θ) plus the KL divergence of q(z | d) from the logistic-normal
prior, its weight rising linearly from 0 to 1 over `kl_warmup_steps` training batches (KL annealing).

Evaluation reports `npmi` (topic coherence: the mean NPMI of each topic's top-10 word pairs,
by document co-occurrence in the evaluated split, the held-out reference), `diversity` (unique
words among every topic's top 25) and `perplexity` (exp of the negative ELBO per word).
`npmi_coherence` and `topic_diversity` take any topic-word matrix: the scikit-learn LDA baseline
of `benchmarks/topics.py` is scored by the same functions. Inference (`predict`, `embed`) gives
each document's topic mix θ, a (K,) vector summing to 1.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from dapeng.errors import DataError
from dapeng.records import Batch, Item, Record
from dapeng.tasks._classification import parse_options, where
from dapeng.tasks.base import VECTOR_OUTPUT, Capabilities

__all__ = ["TopicModelTask", "TopicOptions", "npmi_coherence", "top_words", "topic_diversity"]

TOKEN_PATTERN = r"(?u)\b[^\W\d_]{3,}\b"  # words of three letters or more: no numbers, no "th", "st"


class TopicOptions(BaseModel):
    """`task_options` of topic-model."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    min_df: int | float = Field(5, gt=0, description="drop words in fewer documents (a count, or a fraction if < 1)")
    max_df: float = Field(0.5, gt=0.0, le=1.0, description="drop words in more than this fraction of documents")
    max_features: int | None = Field(2000, gt=0, description="keep the most frequent words (None: all)")
    stop_words: str | list[str] | None = Field("english", description='"english" (scikit-learn\'s list), a list, or None')
    lowercase: bool = True
    contextual: bool = Field(False, description="feed the encoder a sentence embedding of each document too")
    context_model: str = Field("minilm-l6", description="the encoder of `contextual`: a hub name or an Artifact")
    kl_warmup_steps: int = Field(0, ge=0, description="training batches over which the KL weight rises from 0 to 1")
    top_n: int = Field(10, ge=2, description="top words per topic that NPMI coherence scores")
    diversity_n: int = Field(25, ge=1, description="top words per topic that topic diversity counts")


def top_words(topic_word: np.ndarray | torch.Tensor, n: int) -> list[list[int]]:
    """The ids of each topic's `n` heaviest words, heaviest first ((K, V) weights or probabilities)."""
    weights = topic_word.detach().float().cpu().numpy() if torch.is_tensor(topic_word) else np.asarray(topic_word)
    return [list(row[:n]) for row in np.argsort(-weights, axis=1, kind="stable")]


def npmi_coherence(topics: Sequence[Sequence[int]], presence: Any) -> list[float]:
    """NPMI coherence of each topic over a reference corpus, by document co-occurrence.

    NPMI(a, b) = log(P(a, b) / (P(a) P(b))) / −log P(a, b), P being the share of reference
    documents holding the words; a topic scores the mean over its word pairs. A pair that never
    co-occurs scores −1 (the limit as P(a, b) → 0), not NaN: gensim#3040 averaged NaNs
    (log 0) into the coherence; a pair found in every document scores 1.

    Args:
        topics: each topic's top word ids.
        presence: (D, V) reference documents × words, nonzero where the word occurs (dense or
            scipy sparse).

    Returns:
        One NPMI per topic, in [−1, 1].
    """
    import scipy.sparse as sp

    docs = presence.shape[0]
    if docs == 0:
        raise DataError("NPMI needs reference documents", "evaluate on a split with documents")
    matrix = sp.csc_matrix(presence, dtype=np.float64)
    scores = []
    for words in topics:
        words = list(words)
        if len(words) < 2:
            raise DataError("NPMI needs at least two words per topic", "raise top_n")
        sub = (matrix[:, words] > 0).astype(np.float64)  # (D, n)
        joint = (sub.T @ sub).toarray() / docs  # (n, n): P(a, b), the diagonal P(a)
        single = np.diag(joint)
        pairs = []
        for i in range(len(words)):
            for j in range(i + 1, len(words)):
                p_ab = joint[i, j]
                if p_ab == 0.0:
                    pairs.append(-1.0)
                elif p_ab == 1.0:
                    pairs.append(1.0)
                else:
                    pairs.append(float(np.log(p_ab / (single[i] * single[j])) / -np.log(p_ab)))
        scores.append(float(np.mean(pairs)))
    return scores


def topic_diversity(topics: Sequence[Sequence[int]]) -> float:
    """The share of unique words among all topics' top words (Dieng et al. 2020): 1 when no topic repeats another's."""
    total = sum(len(t) for t in topics)
    return len({w for t in topics for w in t}) / max(total, 1)


class _TopicMetric:
    """Negative ELBO per word, and NPMI/diversity of the model's topics over the evaluated documents."""

    def __init__(self, top_n: int, diversity_n: int) -> None:
        self.top_n, self.diversity_n = top_n, diversity_n
        self.nll = 0.0
        self.words = 0.0
        self.presence: list[Any] = []
        self.topic_word: torch.Tensor | None = None

    def update(self, outputs: dict[str, torch.Tensor], batch: Batch) -> None:
        import scipy.sparse as sp

        self.nll += float(outputs["nll"].float().sum())
        self.words += float(batch["bow"].sum())
        self.presence.append(sp.csr_matrix((batch["bow"] > 0).cpu().numpy()))
        self.topic_word = outputs["topic_word"]

    def compute(self) -> dict[str, float]:
        import scipy.sparse as sp

        if self.topic_word is None:
            return {}
        presence = sp.vstack(self.presence)
        coherence = npmi_coherence(top_words(self.topic_word, self.top_n), presence)
        return {"npmi": float(np.mean(coherence)),
                "diversity": topic_diversity(top_words(self.topic_word, self.diversity_n)),
                "perplexity": float(np.exp(self.nll / max(self.words, 1.0)))}


class TopicModelTask:
    """Bag-of-words documents for a ProdLDA topic model. Options: see `TopicOptions`."""

    name = "topic-model"
    capabilities = Capabilities(input="text", output="vector", verbs=frozenset({"predict", "embed"}),
                                output_schema={**VECTOR_OUTPUT, "description": "the document's topic mix"})

    def __init__(self, **options: Any) -> None:
        self.options: TopicOptions = parse_options(TopicOptions, self.name, options)
        self.vocabulary: list[str] = []
        self.context_dim = 0
        self._vectorizer: Any = None
        self._context: Any = None

    # -- vocabulary -----------------------------------------------------------------------

    def _text(self, record: Record, i: int) -> str:
        text = record.get("text")
        if not isinstance(text, str):
            found = ", ".join(k for k in record if not k.startswith("_"))
            raise DataError(f"{where(record, i)}: no 'text' in record (keys: {found})", "set data.text_column")
        return text

    def _texts(self, records: Sequence[Record]) -> list[str]:
        return [self._text(r, i) for i, r in enumerate(records)]

    def setup(self, train: Sequence[Record]) -> None:
        """Learn the vocabulary from the training texts (and the embedding size, when contextual)."""
        from sklearn.feature_extraction.text import CountVectorizer

        o = self.options
        texts = self._texts(train)
        vectorizer = CountVectorizer(min_df=o.min_df, max_df=o.max_df, max_features=o.max_features,
                                     stop_words=o.stop_words, lowercase=o.lowercase, token_pattern=TOKEN_PATTERN)
        try:
            vectorizer.fit(texts)
        except ValueError as err:  # "After pruning, no terms remain", "empty vocabulary"
            raise DataError(f"topic-model: no vocabulary from {len(texts)} training texts ({err})",
                            "lower task_options.min_df or raise max_df, or give more documents") from None
        self.vocabulary = vectorizer.get_feature_names_out().tolist()
        self._vectorizer = None
        if o.contextual:
            self.context_dim = int(self._embed_context(texts[:1]).shape[1])

    @property
    def vectorizer(self) -> Any:
        """A CountVectorizer over the fixed vocabulary (stop words and document frequencies already applied)."""
        if self._vectorizer is None:
            from sklearn.feature_extraction.text import CountVectorizer

            if not self.vocabulary:
                raise DataError("topic-model: encode before setup", "call setup(train) or from_state(state)")
            self._vectorizer = CountVectorizer(vocabulary=self.vocabulary, lowercase=self.options.lowercase,
                                               token_pattern=TOKEN_PATTERN)
        return self._vectorizer

    def doc_term(self, texts: Sequence[str]) -> Any:
        """(D, V) scipy CSR word counts of `texts` over the vocabulary (what LDA baselines fit on)."""
        return self.vectorizer.transform(list(texts))

    @property
    def encoder_name(self) -> str | None:
        """The model whose sentence embeddings the encoder reads (`contextual`), for `use_encoder`."""
        return self.options.context_model if self.options.contextual else None

    def use_encoder(self, embed: Callable[[Sequence[str]], np.ndarray]) -> None:
        """Adopt the texts → (n, C) embedder of `encoder_name` (the runner and the Artifact loader call this)."""
        self._context = embed

    def _embed_context(self, texts: Sequence[str]) -> np.ndarray:
        if self._context is None:
            raise DataError(f"contextual topic-model: no sentence encoder ({self.options.context_model!r}) attached",
                            "build the task with dapeng.runner.build_task, or call task.use_encoder(...)")
        return np.asarray(self._context(list(texts)), dtype=np.float32)

    def model_kwargs(self) -> dict[str, Any]:
        return {"vocab_size": len(self.vocabulary), "context_dim": self.context_dim}

    # -- records → tensors ----------------------------------------------------------------

    def encode(self, records: Sequence[Record]) -> list[Item]:
        """Items `{"ids": (n,) long, "counts": (n,) float[, "context": (C,) float]}`: the document's words."""
        texts = self._texts(records)
        counts = self.doc_term(texts).tocsr()
        context = self._embed_context(texts) if self.context_dim and texts else None
        items: list[Item] = []
        for i in range(len(texts)):
            row = counts[i]
            item: Item = {"ids": torch.from_numpy(row.indices.astype(np.int64)),
                          "counts": torch.from_numpy(row.data.astype(np.float32))}
            if context is not None:
                item["context"] = torch.from_numpy(np.ascontiguousarray(context[i], dtype=np.float32))
            items.append(item)
        return items

    def collate(self, items: list[Item]) -> Batch:
        """Dense counts `bow` (B, V) [and `context` (B, C)]."""
        bow = torch.zeros(len(items), len(self.vocabulary))
        for i, item in enumerate(items):
            bow[i, item["ids"]] = item["counts"]
        batch: Batch = {"bow": bow}
        if self.context_dim:
            batch["context"] = torch.stack([item["context"] for item in items])
        return batch

    # -- model side -----------------------------------------------------------------------

    def kl_weight(self, batches: int) -> float:
        """The KL term's weight after `batches` training batches: linear from 0 to 1 over `kl_warmup_steps`."""
        warmup = self.options.kl_warmup_steps
        return 1.0 if not warmup else min(1.0, batches / warmup)

    def loss(self, model: nn.Module, batch: Batch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The negative ELBO per document (the KL part annealed in training)."""
        bow = batch["bow"]
        log_probs, mu, logvar = model(bow, batch.get("context"), posterior=True)  # (B, V), (B, K), (B, K)
        reconstruction = -(bow * log_probs).sum(-1)  # (B,)
        core = getattr(model, "module", model)  # the model inside a DDP/FSDP wrapper holds the weights
        kl = self._kl(core, mu.float(), logvar.float())  # (B,)
        weight = 1.0
        if model.training:
            weight = self.kl_weight(int(core.train_batches))
            core.train_batches += 1
        loss = (reconstruction + weight * kl).mean()
        return loss, {"nll": (reconstruction + kl).detach(), "topic_word": core.topic_words()}

    @staticmethod
    def _kl(model: nn.Module, mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
        """KL(N(mu, e^logvar) ‖ the Laplace-approximated Dirichlet prior), per document."""
        prior_mean, prior_var = model.prior_mean, model.prior_var  # (K,)
        var = logvar.exp()
        return 0.5 * ((var / prior_var) + (mu - prior_mean).square() / prior_var - 1.0
                      + prior_var.log() - logvar).sum(-1)

    def forward(self, model: nn.Module, batch: Batch) -> dict[str, torch.Tensor]:
        return {"topics": model.forward_features(batch["bow"], batch.get("context"))}

    def metric(self) -> _TopicMetric:
        return _TopicMetric(self.options.top_n, self.options.diversity_n)

    def decode(self, outputs: dict[str, torch.Tensor]) -> list[Any]:
        return outputs["topics"].float().cpu().tolist()

    @torch.inference_mode()
    def embed(self, model: nn.Module, texts: Sequence[str] | str, batch_size: int = 64) -> np.ndarray:
        """Texts → (n, K) float32 topic mixes (eval mode: θ = softmax of the posterior mean)."""
        texts = [texts] if isinstance(texts, str) else list(texts)
        if not texts:
            raise DataError("no texts to give topics for", "pass at least one string")
        model.eval()
        items = self.encode([{"text": t} for t in texts])
        device = next(model.parameters()).device
        parts = []
        for start in range(0, len(items), batch_size):
            batch = {k: v.to(device) for k, v in self.collate(items[start : start + batch_size]).items()}
            parts.append(self.forward(model, batch)["topics"].float().cpu().numpy())
        return np.concatenate(parts).astype(np.float32, copy=False)

    def topics(self, model: nn.Module, n: int = 10) -> list[list[tuple[str, float]]]:
        """Each topic's `n` top words with their β weights, heaviest first."""
        beta = model.topic_words().cpu().numpy()  # (K, V)
        return [[(self.vocabulary[w], float(beta[k, w])) for w in row] for k, row in enumerate(top_words(beta, n))]

    # -- save / load ----------------------------------------------------------------------

    def state(self) -> dict[str, Any]:
        return {"labels": None, "options": self.options.model_dump(mode="json"), "vocabulary": self.vocabulary,
                "context_dim": self.context_dim}

    @classmethod
    def from_state(cls, state: dict[str, Any]) -> TopicModelTask:
        """Rebuild for inference from `state()` (dapeng.json "preprocess")."""
        task = cls(**dict(state.get("options") or {}))
        if not state.get("vocabulary"):
            raise DataError("topic-model state has no vocabulary", "the Artifact's dapeng.json needs preprocess.vocabulary")
        task.vocabulary = list(state["vocabulary"])
        task.context_dim = int(state.get("context_dim") or 0)
        return task
