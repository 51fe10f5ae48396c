"""An n-gram language model with interpolated Kneser-Ney smoothing, on token ids: the baseline a
transformer's perplexity is read against (`scratchlm eval --baseline ngram --order N`).

For the highest order the counts are the raw ones; every lower order instead counts *continuations*,
the number of different tokens seen just before an n-gram. A token that follows only one word ("Francisco"
after "San") then gets little weight when it has to stand in for an unseen context. Each order takes a
discount D from every seen count and hands the mass it freed to the next lower order:

    P(w | h) = max(c(h w) - D, 0) / c(h)  +  D * N1+(h .) / c(h) * P(w | h minus its oldest token)

where c(h) is the sum of c(h w') over all w' and N1+(h .) the number of different w' seen after h. A context
never seen falls back to the lower order whole. The lowest order interpolates with the uniform distribution,
so every token of the vocabulary has some probability and the probabilities over the vocabulary sum to one.
D for each order is Ney's estimate n1 / (n1 + 2 n2), from how many n-grams were seen once and twice.

N-grams are stored as integers (the ids read as digits in base `vocab_size`) in sorted numpy arrays, so
counting is `np.unique` and a lookup is `np.searchsorted`, over a whole evaluation at once.
"""
from __future__ import annotations

import math

import numpy as np

from scratchlm.errors import UserError

MIN_DISCOUNT, MAX_DISCOUNT = 0.05, 0.95   # Ney's estimate is clamped so that no order ever gives 0 or 1


class KneserNey:
    def __init__(self, order: int, vocab_size: int, discount: float | None = None):
        if order < 1:
            raise UserError(f"--order {order}: an n-gram model needs order 1 or more")
        if vocab_size < 2:
            raise UserError(f"a vocabulary of {vocab_size} tokens is too small for an n-gram model")
        if vocab_size ** order >= 2 ** 63:
            most = int(math.log(2 ** 63 - 1) / math.log(vocab_size))
            raise UserError(f"--order {order} n-grams over {vocab_size} tokens do not fit in 64-bit codes; "
                            f"the highest order for this vocabulary is {most}")
        if discount is not None and not 0 < discount <= 1:
            raise UserError(f"discount {discount}: must be in (0, 1]")
        self.order, self.V, self.fixed_discount = order, vocab_size, discount
        self.grams: dict[int, np.ndarray] = {}       # order k -> sorted codes of the k-grams seen
        self.counts: dict[int, np.ndarray] = {}      # raw counts (top order) or continuation counts
        self.contexts: dict[int, np.ndarray] = {}    # order k >= 2 -> sorted codes of the (k-1)-token contexts
        self.context_total: dict[int, np.ndarray] = {}
        self.context_types: dict[int, np.ndarray] = {}
        self.discount: dict[int, float] = {}

    def _codes(self, tokens: np.ndarray, k: int) -> np.ndarray:
        """Codes of every k-gram in `tokens` (a 1-D array), in order."""
        n = len(tokens) - k + 1
        codes = np.zeros(max(n, 0), dtype=np.int64)
        for i in range(k):
            codes = codes * self.V + tokens[i:i + n]
        return codes

    def fit(self, tokens) -> KneserNey:
        tokens = np.asarray(tokens, dtype=np.int64)
        if len(tokens) < self.order:
            raise UserError(f"{len(tokens)} training tokens are too few for an order-{self.order} model")
        if tokens.min() < 0 or tokens.max() >= self.V:
            raise UserError(f"token ids run from {tokens.min()} to {tokens.max()}, outside a {self.V}-token vocabulary")
        seen = {k: np.unique(self._codes(tokens, k), return_counts=True) for k in range(1, self.order + 1)}
        for k in range(1, self.order + 1):
            if k == self.order:
                grams, counts = seen[k]
            else:
                # Each distinct (k+1)-gram is one distinct left neighbour of its last k tokens.
                grams, counts = np.unique(seen[k + 1][0] % self.V ** k, return_counts=True)
            self.grams[k], self.counts[k] = grams, counts
            n1, n2 = int((counts == 1).sum()), int((counts == 2).sum())
            estimate = n1 / (n1 + 2 * n2) if n1 + n2 else 0.5
            self.discount[k] = self.fixed_discount or min(max(estimate, MIN_DISCOUNT), MAX_DISCOUNT)
            if k >= 2:
                # Codes are sorted, so the k-grams sharing a context sit next to each other.
                ctx, first, types = np.unique(grams // self.V, return_index=True, return_counts=True)
                self.contexts[k], self.context_types[k] = ctx, types
                self.context_total[k] = np.add.reduceat(counts, first)
        return self

    def _lookup(self, table: np.ndarray, codes: np.ndarray, valid: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(found, index) of each code in a sorted table."""
        i = np.searchsorted(table, codes)
        i = np.minimum(i, len(table) - 1)
        return valid & (table[i] == codes), i

    def prob(self, history: np.ndarray, targets: np.ndarray) -> np.ndarray:
        """P(target | history) for each row: `history` is (n, order - 1) token ids, oldest first, with -1
        where a row has fewer tokens before it (the start of a text)."""
        targets = np.asarray(targets, dtype=np.int64)
        history = np.asarray(history, dtype=np.int64).reshape(len(targets), self.order - 1)
        if not self.grams:
            raise RuntimeError("fit the model first")
        D = self.discount[1]
        found, i = self._lookup(self.grams[1], targets, np.ones(len(targets), dtype=bool))
        c = np.where(found, self.counts[1][i], 0)
        total, types = self.counts[1].sum(), len(self.grams[1])
        p = (np.maximum(c - D, 0) + D * types / self.V) / total
        for k in range(2, self.order + 1):
            h = history[:, self.order - k:]                  # the k - 1 most recent tokens
            valid = (h >= 0).all(axis=1)
            hcode = np.zeros(len(targets), dtype=np.int64)
            for j in range(k - 1):
                hcode = hcode * self.V + np.maximum(h[:, j], 0)
            known, ci = self._lookup(self.contexts[k], hcode, valid)
            gfound, gi = self._lookup(self.grams[k], hcode * self.V + targets, known)
            c = np.where(gfound, self.counts[k][gi], 0)
            total = np.where(known, self.context_total[k][ci], 1)
            types = np.where(known, self.context_types[k][ci], 0)
            D = self.discount[k]
            p = np.where(known, (np.maximum(c - D, 0) + D * types * p) / total, p)
        return p

    def distribution(self, history) -> np.ndarray:
        """P(w | history) for every w in the vocabulary; `history` is a list of ids (any length)."""
        h = [-1] * (self.order - 1) + [int(t) for t in history]
        h = h[len(h) - (self.order - 1):] if self.order > 1 else []
        return self.prob(np.tile(np.asarray(h, dtype=np.int64), (self.V, 1)), np.arange(self.V))

    def histories(self, tokens: np.ndarray) -> np.ndarray:
        """(len(tokens) - 1, order - 1) histories of tokens[1:], each row the tokens before its target."""
        tokens = np.asarray(tokens, dtype=np.int64)
        padded = np.concatenate([np.full(self.order - 1, -1, dtype=np.int64), tokens])
        n = len(tokens) - 1
        cols = [padded[j + 1:j + 1 + n] for j in range(self.order - 1)]
        return np.stack(cols, axis=1) if cols else np.zeros((n, 0), dtype=np.int64)

    def evaluate(self, shards, token_bytes, chunk: int = 1 << 20) -> dict:
        """Loss (nats per token), perplexity and bits per byte over every target after each shard's first
        token, as `metrics.evaluate` reports them for a transformer."""
        token_bytes = np.asarray(token_bytes, dtype=np.int64)
        nats, targets, n_bytes = 0.0, 0, 0
        for shard in shards:
            shard = np.asarray(shard, dtype=np.int64)
            # Chunks overlap by order - 1 tokens so that every target keeps its full history.
            for start in range(0, max(len(shard) - 1, 0), chunk):
                piece = shard[max(0, start - (self.order - 1)):start + chunk + 1]
                hist = self.histories(piece)
                skip = min(start, self.order - 1)             # targets the previous chunk scored
                y = piece[1:][skip:]
                nats -= float(np.log(self.prob(hist[skip:], y)).sum())
                targets += len(y)
                n_bytes += int(token_bytes[y].sum())
        loss = nats / max(1, targets)
        return {"val_loss": loss, "val_ppl": math.exp(min(loss, 700)), "val_bpb": nats / math.log(2) / max(1, n_bytes),
                "val_tokens": targets, "val_bytes": n_bytes}
