"""A linear-chain conditional random field over per-token emission scores (Lafferty et al. 2001).

`CRF.nll` is the training loss (the forward algorithm), `CRF.decode` the Viterbi best path,
`CRF.constrain_bio` forbids the transitions a BIO/BIOES scheme rules out (O → I-X, …).
Both recursions loop over time steps and are vectorised over the batch and the tags; they
run in fp32, outside autocast: a bf16 log-partition loses the small differences the loss is made of.

Masks are left-aligned: row b is True for its first L_b positions, False after; a row with
L_b = 0 has an empty path and a loss of 0.
"""

from __future__ import annotations

import torch
from torch import nn

from dapeng.errors import ModelError

# What a forbidden transition scores: exp() of it is exactly 0 in fp32, and it is far below any
# sum of learned scores, so no best path takes one while a legal path exists (one always does).
FORBIDDEN = -1.0e4
SCHEMES = ("BIO", "BIOES")
# Viterbi over more tags than this tries each row's best `_CANDIDATES` previous tags first.
_PRUNE_ABOVE = 64
_CANDIDATES = 8


class CRF(nn.Module):
    """Start, transition and end scores over `num_tags` tags.

    Args:
        num_tags: tags per position (K).

    A sequence y_1…y_L scores `start[y_1] + Σ_t emissions[t, y_t] + Σ_t transitions[y_t, y_t+1] + end[y_L]`;
    `transitions[i, j]` scores tag i followed by tag j. Forbidden transitions live in buffers
    (zeros, or `FORBIDDEN` after `constrain_bio`) added on top of the learned scores, so
    training can't learn them back and an Artifact keeps them.
    """

    def __init__(self, num_tags: int) -> None:
        super().__init__()
        if num_tags < 1:
            raise ValueError(f"num_tags must be at least 1, got {num_tags}")
        self.num_tags = num_tags
        self.start = nn.Parameter(torch.empty(num_tags))
        self.end = nn.Parameter(torch.empty(num_tags))
        self.transitions = nn.Parameter(torch.empty(num_tags, num_tags))
        self.register_buffer("start_penalty", torch.zeros(num_tags))
        self.register_buffer("end_penalty", torch.zeros(num_tags))
        self.register_buffer("transition_penalty", torch.zeros(num_tags, num_tags))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # small scores: at the start the emissions decide, as in a softmax tagger
        for p in (self.start, self.end, self.transitions):
            nn.init.uniform_(p, -0.1, 0.1)

    def extra_repr(self) -> str:
        return f"num_tags={self.num_tags}"

    # -- constraints ------------------------------------------------------------------------

    def constrain_bio(self, labels: list[str], scheme: str = "BIO") -> None:
        """Forbid the transitions `scheme` rules out, for decoding and for training.

        Args:
            labels: the tag of each index, e.g. ["O", "B-PER", "I-PER"].
            scheme: "BIO" (no I-X after O, after another type's tag, or first) or "BIOES"
                (also: B-X/I-X continue only with I-X/E-X, and no sequence ends inside an entity).

        Raises:
            ModelError: a label count other than `num_tags`, or a label outside the scheme.
        """
        if len(labels) != self.num_tags:
            raise ModelError(
                f"constrain_bio got {len(labels)} labels for a CRF over {self.num_tags} tags",
                "pass the task's label list, one label per tag",
            )
        start, trans, end = allowed_transitions(labels, scheme)
        with torch.no_grad():
            for buf, allowed in ((self.start_penalty, start), (self.end_penalty, end), (self.transition_penalty, trans)):
                buf.copy_(torch.where(allowed, 0.0, FORBIDDEN))

    def _scores(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Effective fp32 (start (K,), transitions (K, K), end (K,)): learned scores plus penalties."""
        return (
            self.start.float() + self.start_penalty.float(),
            self.transitions.float() + self.transition_penalty.float(),
            self.end.float() + self.end_penalty.float(),
        )

    # -- loss -------------------------------------------------------------------------------

    def nll(self, emissions: torch.Tensor, tags: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Mean over the batch of -log p(tags | emissions).

        Args:
            emissions: (B, T, K) scores per position and tag.
            tags: (B, T) gold tag ids; positions where `mask` is False are ignored (-100 there is fine).
                A gold path through a forbidden transition costs about 1e4: repair tags first.
            mask: (B, T) bool, left-aligned.

        Raises:
            ModelError: a mask that isn't left-aligned, a shape mismatch, or a tag id outside
                0…K-1 at a real position.
        """
        lengths = self._check(emissions, mask)
        if not bool(lengths.any()):  # nothing to tag: a zero that still has a graph
            return emissions.float().sum() * 0.0
        mask = mask.bool()
        with torch.autocast(emissions.device.type, enabled=False):
            em = emissions.float()
            start, trans, end = self._scores()
            gold = self._gold_score(em, tags, mask, lengths, start, trans, end)
            log_z = self._log_partition(em, mask, lengths, start, trans, end)
            return torch.where(lengths > 0, log_z - gold, 0.0).mean()

    def _gold_score(
        self,
        em: torch.Tensor,
        tags: torch.Tensor,
        mask: torch.Tensor,
        lengths: torch.Tensor,
        start: torch.Tensor,
        trans: torch.Tensor,
        end: torch.Tensor,
    ) -> torch.Tensor:
        """Score of each row's gold path, (B,)."""
        real = tags[mask]
        if real.numel() and (int(real.min()) < 0 or int(real.max()) >= self.num_tags):
            raise ModelError(
                f"CRF tags must lie in 0…{self.num_tags - 1} where the mask is True, got {sorted({int(real.min()), int(real.max())})}",
                "mask the positions that carry no tag (-100) instead of passing them as real ones",
            )
        y = torch.where(mask, tags, 0)  # (B, T)
        emitted = (em.gather(2, y.unsqueeze(-1)).squeeze(-1) * mask).sum(1)  # (B,)
        moved = (trans[y[:, :-1], y[:, 1:]] * mask[:, 1:]).sum(1)  # (B,)
        last = y.gather(1, (lengths - 1).clamp_min(0).unsqueeze(1)).squeeze(1)  # (B,)
        return emitted + moved + start[y[:, 0]] + end[last]

    def _log_partition(
        self,
        em: torch.Tensor,
        mask: torch.Tensor,
        lengths: torch.Tensor,
        start: torch.Tensor,
        trans: torch.Tensor,
        end: torch.Tensor,
    ) -> torch.Tensor:
        """log Σ over all paths of exp(score), (B,): the forward algorithm, alphas kept in log space.

        Each step's log-sum-exp over the previous tag is one (B, K) @ (K, K) product in exp
        space, shifted by each row's largest alpha and each column's largest transition: a
        matmul instead of a (B, K, K) exp per step, the difference between minutes and hours
        per epoch at Brown's 472 tags. A tag whose every predecessor lies ~87 nats below the
        row's best alpha underflows; the clamp gives it log(tiny) (its share of the sum is
        below 1e-38 either way) and a zero gradient instead of log(0) = -inf and NaN.
        """
        tiny = torch.finfo(torch.float32).tiny
        col_max = trans.detach().amax(0, keepdim=True)  # (1, K)
        exp_trans = (trans - col_max).exp()  # (K, K), every column's largest entry is 1
        # one unbind, not em[:, t] per step: each slice's backward would zero-fill a whole (B, T, K)
        steps = em[:, : int(lengths.max())].unbind(1)  # T × (B, K)
        alpha = start + steps[0]  # (B, K)
        for t in range(1, len(steps)):
            shift = alpha.detach().amax(1, keepdim=True)  # (B, 1)
            summed = (alpha - shift).exp() @ exp_trans  # (B, K)
            step = summed.clamp_min(tiny).log() + shift + col_max + steps[t]
            alpha = torch.where(mask[:, t, None], step, alpha)
        return torch.logsumexp(alpha + end, dim=1)

    # -- decoding ---------------------------------------------------------------------------

    @torch.no_grad()
    def decode(self, emissions: torch.Tensor, mask: torch.Tensor) -> list[list[int]]:
        """Viterbi: each row's highest-scoring tag path, as many tags as the row's mask has True.

        Args:
            emissions: (B, T, K) scores.
            mask: (B, T) bool, left-aligned.
        """
        lengths = self._check(emissions, mask)
        mask = mask.bool()
        b = emissions.shape[0]
        steps = int(lengths.max()) if b else 0
        if steps == 0:
            return [[] for _ in range(b)]
        with torch.autocast(emissions.device.type, enabled=False):
            em = emissions.float()
            start, trans, end = self._scores()
            score = start + em[:, 0]  # (B, K)
            stay = torch.arange(self.num_tags, device=em.device).expand(b, -1)  # (B, K)
            pointers = []
            col_max = trans.amax(0)  # (K,)
            for t in range(1, steps):
                best, prev = _viterbi_step(score, trans, col_max)  # (B, K), (B, K)
                real = mask[:, t, None]
                score = torch.where(real, best + em[:, t], score)
                # past a row's end, each tag points to itself: backtracking carries its last tag back
                pointers.append(torch.where(real, prev, stay))
            tag = (score + end).argmax(1)  # (B,)
            path = [tag]
            for prev in reversed(pointers):
                tag = prev.gather(1, tag.unsqueeze(1)).squeeze(1)
                path.append(tag)
            rows = torch.stack(path[::-1], dim=1).tolist()  # (B, steps)
        return [row[:n] for row, n in zip(rows, lengths.tolist())]

    def _check(self, emissions: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """The rows' lengths, (B,), after checking shapes and that the mask is left-aligned."""
        if emissions.dim() != 3 or emissions.shape[2] != self.num_tags or mask.shape != emissions.shape[:2]:
            raise ModelError(
                f"CRF over {self.num_tags} tags got emissions {tuple(emissions.shape)} and mask {tuple(mask.shape)}",
                f"pass emissions (B, T, {self.num_tags}) and a (B, T) mask",
            )
        mask = mask.bool()
        lengths = mask.sum(1)
        positions = torch.arange(mask.shape[1], device=mask.device)
        if not torch.equal(mask, positions < lengths.unsqueeze(1)):
            raise ModelError(
                "CRF masks must be left-aligned: True for each row's first positions, False after",
                "gather the tagged positions (e.g. first subwords) to the front of each row",
            )
        return lengths


def _viterbi_step(score: torch.Tensor, trans: torch.Tensor, col_max: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """max and argmax over the previous tag i of score[b, i] + trans[i, j]: (B, K) each.

    Over many tags (Brown's 472) the full (B, K, K) sum is most of a tagger's inference time.
    Only the `_CANDIDATES` best previous tags of a row are tried then: a tag outside them
    scores at most the next-best score plus the column's largest transition, so where a
    column's best beats that bound it is exact; the (row, column) pairs where it doesn't
    (rare once emissions are peaked) are redone over every previous tag. Exact either way,
    and a row's result never depends on the other rows of its batch.
    """
    k = score.shape[1]
    if k <= _PRUNE_ABOVE or k <= _CANDIDATES:
        return (score.unsqueeze(2) + trans).max(1)
    top, idx = score.topk(_CANDIDATES + 1, dim=1)  # (B, m+1)
    best, which = (top[:, :_CANDIDATES, None] + trans[idx[:, :_CANDIDATES]]).max(1)  # (B, K)
    prev = idx.gather(1, which)
    rows, cols = (best < top[:, _CANDIDATES:] + col_max).nonzero(as_tuple=True)  # (R,), (R,)
    if rows.numel():
        best[rows, cols], prev[rows, cols] = (score[rows] + trans[:, cols].T).max(1)  # over (R, K)
    return best, prev


def allowed_transitions(labels: list[str], scheme: str = "BIO") -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Which starts, transitions and ends `scheme` allows between `labels`.

    Args:
        labels: tags such as "O", "B-PER", "I-PER" ("E-"/"S-" too for BIOES).
        scheme: "BIO" or "BIOES".

    Returns:
        bool tensors start (K,), transitions (K, K) (`[i, j]`: tag i may precede tag j), end (K,).

    Raises:
        ModelError: an unknown scheme or a label outside it.
    """
    if scheme not in SCHEMES:
        raise ModelError(f"unknown tagging scheme {scheme!r}", f"choose one of {', '.join(SCHEMES)}")
    parts = [_split(label, scheme) for label in labels]
    if scheme == "BIO":
        starts = [p != "I" for p, _ in parts]
        ends = [True] * len(parts)
        follows = [[q != "I" or (p in "BI" and s == r) for q, r in parts] for p, s in parts]
    else:
        inside = [p in "BI" for p, _ in parts]  # an entity is open after B-X or I-X
        starts = [p in "OBS" for p, _ in parts]
        ends = [not i for i in inside]
        follows = [
            [(q in "IE" and r == s) if open_ else q in "OBS" for q, r in parts]
            for (_, s), open_ in zip(parts, inside)
        ]
    as_bool = {"dtype": torch.bool}
    return (
        torch.tensor(starts, **as_bool),
        torch.tensor(follows, **as_bool).reshape(len(parts), len(parts)),
        torch.tensor(ends, **as_bool),
    )


def _split(label: str, scheme: str) -> tuple[str, str]:
    """("O", "") or (prefix, entity type) for "B-PER"; a ModelError for a label outside the scheme."""
    if label == "O":
        return "O", ""
    prefix, dash, kind = label.partition("-")
    if not dash or not kind or len(prefix) != 1 or prefix not in scheme.replace("O", ""):
        raise ModelError(
            f"label {label!r} is not a {scheme} tag",
            f"use O or {'/'.join(p + '-TYPE' for p in scheme.replace('O', ''))} labels, or no constraints",
        )
    return prefix, kind
