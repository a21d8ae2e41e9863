"""ProdLDA: a neural topic model, a variational autoencoder over bag-of-words (Srivastava & Sutton 2017).

    bow (B, V) [⊕ context (B, C)] → MLP (softplus) → (mu, logvar) (B, K), batch-normalised
        → z = mu + σ·ε → θ = softmax(z) (the topic mix) → dropout
        → word logits = BN(θ · β) (B, V) → log-softmax  (a product of experts, not LDA's mixture)

The prior is a logistic normal: the Laplace approximation of a symmetric Dirichlet(α) in the
softmax basis (`prior_mean`, `prior_var`). With `context_dim > 0` the encoder also reads a
sentence embedding of the document (the "combined" contextualized topic model of Bianchi et al.
2021). In eval mode θ = softmax(mu): the same document always gets the same mix.
`topic_words()` is β, (K, V): the decoder weights each topic puts on each word.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


def laplace_prior(num_topics: int, alpha: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and variance of the logistic normal that approximates a symmetric Dirichlet(α) (Hennig et al. 2012)."""
    k = num_topics
    log_alpha = torch.full((k,), math.log(alpha))
    mean = log_alpha - log_alpha.mean()
    var = (1.0 / alpha) * (1.0 - 2.0 / k) + torch.full((k,), 1.0 / (k * k)) * (k / alpha)
    return mean, var


class ProdLDA(nn.Module):
    """ProdLDA with batch normalisation and dropout as in the paper's code.

    Args:
        vocab_size: words in the bag-of-words vocabulary.
        num_topics: K.
        hidden: width of the encoder's hidden layers.
        layers: hidden layers in the encoder.
        dropout: on the encoder's output and on θ.
        context_dim: size of the document embedding read next to the counts (0: none).
        alpha: concentration of the symmetric Dirichlet the prior approximates.
    """

    def __init__(
        self,
        vocab_size: int,
        num_topics: int = 20,
        hidden: int = 100,
        layers: int = 2,
        dropout: float = 0.2,
        context_dim: int = 0,
        alpha: float = 1.0,
    ) -> None:
        super().__init__()
        if vocab_size < 1 or num_topics < 2 or layers < 1:
            raise ValueError("prodlda needs vocab_size ≥ 1, num_topics ≥ 2 and layers ≥ 1")
        if alpha <= 0:
            raise ValueError(f"alpha must be positive, not {alpha}")
        self.vocab_size, self.num_topics, self.context_dim = vocab_size, num_topics, context_dim
        blocks: list[nn.Module] = []
        width = vocab_size + context_dim
        for _ in range(layers):
            blocks += [nn.Linear(width, hidden), nn.Softplus()]
            width = hidden
        self.encoder = nn.Sequential(*blocks)
        self.encoder_dropout = nn.Dropout(dropout)
        self.mu = nn.Linear(hidden, num_topics)
        self.logvar = nn.Linear(hidden, num_topics)
        # affine-free batchnorm keeps the posterior from collapsing onto the prior early (the paper's fix)
        self.mu_norm = nn.BatchNorm1d(num_topics, affine=False)
        self.logvar_norm = nn.BatchNorm1d(num_topics, affine=False)
        self.theta_dropout = nn.Dropout(dropout)
        self.beta = nn.Linear(num_topics, vocab_size, bias=False)
        nn.init.xavier_uniform_(self.beta.weight)
        self.beta_norm = nn.BatchNorm1d(vocab_size, affine=False)
        mean, var = laplace_prior(num_topics, alpha)
        self.register_buffer("prior_mean", mean, persistent=False)
        self.register_buffer("prior_var", var, persistent=False)
        # training batches seen, for a loss that anneals with it (KL warm-up); saved, so a resumed run goes on
        self.register_buffer("train_batches", torch.zeros((), dtype=torch.long))

    def posterior(self, bow: torch.Tensor, context: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """The encoder: (B, V) counts [and (B, C) embeddings] → mean and log-variance of q(z|d), (B, K) each."""
        x = bow if context is None or not self.context_dim else torch.cat([bow, context.to(bow.dtype)], dim=-1)
        h = self.encoder_dropout(self.encoder(x))  # (B, H)
        return self.mu_norm(self.mu(h)), self.logvar_norm(self.logvar(h))

    def topic_mix(self, mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
        """θ (B, K): a reparameterised sample in training, softmax of the mean in eval."""
        if not self.training:
            return F.softmax(mu.float(), dim=-1)
        z = mu + torch.randn_like(mu) * torch.exp(0.5 * logvar)
        return self.theta_dropout(F.softmax(z.float(), dim=-1))

    def forward_features(self, bow: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        """The document's topic mix θ, (B, K)."""
        return self.topic_mix(*self.posterior(bow, context))

    def forward_head(self, theta: torch.Tensor) -> torch.Tensor:
        """θ (B, K) → log-probabilities of every word, (B, V), in fp32 (the loss sums V of them)."""
        return F.log_softmax(self.beta_norm(self.beta(theta)).float(), dim=-1)

    def forward(
        self, bow: torch.Tensor, context: torch.Tensor | None = None, posterior: bool = False
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(B, V) word log-probabilities; with `posterior`, also (mu, logvar) for the KL term."""
        mu, logvar = self.posterior(bow, context)
        log_probs = self.forward_head(self.topic_mix(mu, logvar))
        return (log_probs, mu, logvar) if posterior else log_probs

    def topic_words(self) -> torch.Tensor:
        """β, (K, V): how strongly each topic pulls up each word (rank words by it)."""
        return self.beta.weight.detach().t().float()

    def reset_head(self, num_labels: int) -> None:
        """A fresh decoder over a vocabulary of `num_labels` words (the encoder keeps its input size)."""
        self.vocab_size = num_labels
        self.beta = nn.Linear(self.num_topics, num_labels, bias=False).to(self.mu.weight.device)
        nn.init.xavier_uniform_(self.beta.weight)
        self.beta_norm = nn.BatchNorm1d(num_labels, affine=False).to(self.mu.weight.device)

    def example_inputs(self, batch: int = 1) -> dict[str, torch.Tensor]:
        """Random word counts (and embeddings) of the size it was built for (`dapeng models show`)."""
        bow = torch.poisson(torch.full((batch, self.encoder[0].in_features - self.context_dim), 0.05))
        inputs = {"bow": bow}
        if self.context_dim:
            inputs["context"] = F.normalize(torch.randn(batch, self.context_dim), dim=-1)
        return inputs
