"""Training a byte-level BPE vocabulary.

Two phases. Counting: the input is cut into chunks of a few MB at places where the cut cannot change
pre-tokenization, and worker processes count the pre-tokens of each chunk, so memory depends on the
number of distinct pre-tokens, not on the file size. Merging: each distinct pre-token is a list of token
ids with a count; pair counts are kept up to date incrementally, touching only the pre-tokens that
contain the merged pair, and a heap with lazy invalidation finds the best pair.
"""
from __future__ import annotations

import collections
import heapq
from array import array
import multiprocessing
import os
import sys
from collections import Counter, defaultdict
from collections.abc import Iterable, Sequence

from tqdm import tqdm

from scratchlm.errors import UserError
from scratchlm.runtime import usable_cpus
from scratchlm.tokenizer.pretokenize import (
    PRETOKEN_RE, check_special_tokens, find_cut_bytes, special_regex, split_specials,
)
from scratchlm.tokenizer.normalize import normalize_uncased

_WINDOW = 1 << 16  # bytes read at a time while looking for a chunk boundary
_SWEEP = 256  # merges between sweeps of dead pairs


def train_bpe(input_path: str | os.PathLike | Sequence[str | os.PathLike], vocab_size: int,
              special_tokens: Iterable[str] = (), *, uncased: bool = False, workers: int | None = None,
              progress: bool = True) -> tuple[dict[int, bytes], list[tuple[bytes, bytes]]]:
    """Train byte-level BPE on UTF-8 text file(s); returns `(vocab, merges)`.

    `vocab` maps ids to bytes: the special tokens first (in the order given), then the 256 single bytes
    in byte order, then one token per merge, in merge order; `merges` lists the merged pairs in order.
    Text is split on the special tokens (which take no part in merges), pre-tokenized with the GPT-2
    pattern, and pairs are counted inside pre-tokens only. Several files are read as separate documents
    (no pre-token spans two files). With `uncased`, text is passed through `normalize_uncased` first.

    Tie rule: each step merges the most frequent pair; among equally frequent pairs the greatest
    `(bytes_a, bytes_b)` tuple wins (Python's ordering of bytes). Training stops early, with a warning on
    stderr, if no pair is left.
    `workers` defaults to all CPUs; `progress` shows tqdm bars on stderr for runs that take a while.
    """
    specials = _checked(special_tokens, vocab_size)
    counts = count_pretokens(input_path, specials, uncased=uncased, workers=workers, progress=progress)
    return train_from_counts(counts, vocab_size, specials, progress=progress)


def train_bpe_on_texts(batches: Iterable[list[str]], vocab_size: int, special_tokens: Iterable[str] = (), *,
                       uncased: bool = False, workers: int | None = None,
                       progress: bool = True) -> tuple[dict[int, bytes], list[tuple[bytes, bytes]]]:
    """`train_bpe` on texts instead of files: each text is a document of its own, as each file is there.
    `batches` is read lazily, a few batches ahead of the counting workers, so a stream of any length
    never sits in memory."""
    specials = _checked(special_tokens, vocab_size)
    tasks = ((batch, tuple(specials), uncased) for batch in batches)
    counts: Counter = Counter()
    for c in _bounded_map(_count_texts, tasks, workers or usable_cpus()):
        counts.update(c)
    return train_from_counts(counts, vocab_size, specials, progress=progress)


def _checked(special_tokens: Iterable[str], vocab_size: int) -> list[str]:
    try:
        specials = check_special_tokens(special_tokens)
    except ValueError as e:
        raise UserError(f"special tokens: {e}") from None
    if vocab_size - len(specials) - 256 < 0:
        raise UserError(f"vocab size {vocab_size} is below the minimum of {256 + len(specials)} "
                        f"(256 byte tokens + {len(specials)} special tokens)")
    return specials


def train_from_counts(counts: Counter, vocab_size: int, specials: list[str],
                      progress: bool = True) -> tuple[dict[int, bytes], list[tuple[bytes, bytes]]]:
    """The merges of the pre-token counts `counts` (emptied on the way, to give its memory back)."""
    n_merges = vocab_size - len(specials) - 256
    empty = not counts
    words, freqs = [], []
    while counts:  # popping as we go: the strings' memory is freed while the lists are built
        w, f = counts.popitem()
        words.append(list(w.encode("utf-8")))
        freqs.append(f)
    # popitem takes the newest first; the merges do not depend on the order, but keep it the counter's
    words.reverse()
    freqs.reverse()
    pair_ids = merge_loop(words, freqs, n_merges, progress=progress)
    if len(pair_ids) < n_merges:
        # Not an error (a small text simply has fewer pairs), but the vocabulary is not the size asked for.
        why = "the input holds no text" if empty else "no pair of tokens is left to merge"
        print(f"warning: asked for {vocab_size:,} tokens but {why}: the vocabulary has "
              f"{256 + len(specials) + len(pair_ids):,} (256 bytes + {len(specials)} special tokens + "
              f"{len(pair_ids):,} merges)", file=sys.stderr, flush=True)

    # Ids inside the merge loop: 0..255 bytes, 256+ merges; shift them behind the specials.
    token = [bytes([b]) for b in range(256)]
    merges = []
    for a, b in pair_ids:
        merges.append((token[a], token[b]))
        token.append(token[a] + token[b])
    vocab = {i: s.encode("utf-8") for i, s in enumerate(specials)}
    vocab.update({len(specials) + i: t for i, t in enumerate(token)})
    return vocab, merges


# ----------------------------------------------------------------------------- counting
def _paths(input_path) -> list[str]:
    paths = [input_path] if isinstance(input_path, (str, os.PathLike)) else list(input_path)
    if not paths:
        raise UserError("no input files to train the tokenizer on")
    for p in paths:
        if not os.path.isfile(p):
            raise UserError(f"input file not found: {p}")
    return [os.fspath(p) for p in paths]


def chunk_ranges(path: str, chunk_bytes: int, specials: Sequence[str] = ()) -> list[tuple[int, int]]:
    """`(start, end)` byte ranges covering `path`, each about `chunk_bytes` long, cut only where
    pre-tokenization of the pieces equals that of the whole (see `pretokenize.find_cut_bytes`)."""
    size = os.path.getsize(path)
    special_bytes = [s.encode("utf-8") for s in specials]
    pad = max((len(s) for s in special_bytes), default=1)
    bounds = [0]
    with open(path, "rb") as f:
        pos = chunk_bytes
        while pos < size:
            # Read a little on both sides of the window so the boundary checks can see their context.
            start = max(bounds[-1], pos - pad)
            f.seek(start)
            buf = f.read(pos - start + _WINDOW + pad)
            i = find_cut_bytes(buf, pos - start, pos - start + _WINDOW, special_bytes)
            if i == -1:
                pos += _WINDOW
                continue
            bounds.append(start + i)
            pos = start + i + chunk_bytes
    bounds.append(size)
    return list(zip(bounds, bounds[1:]))


def _count_ranges(task) -> tuple[int, Counter]:
    """Pre-token counts of some byte ranges of files, read one range (a few MB) at a time."""
    ranges, specials, uncased = task
    special_re = special_regex(specials)
    counts: Counter = Counter()
    for path, start, end in ranges:
        with open(path, "rb") as f:
            f.seek(start)
            data = f.read(end - start)
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError as e:
            raise UserError(f"{path} is not UTF-8 text (bad byte at offset {start + e.start})") from None
        del data
        for part in split_specials(text, special_re)[::2]:  # odd positions hold the specials themselves
            counts.update(PRETOKEN_RE.findall(normalize_uncased(part) if uncased else part))
    return sum(end - start for _, start, end in ranges), counts


def _count_texts(task) -> Counter:
    texts, specials, uncased = task
    special_re = special_regex(specials)
    counts: Counter = Counter()
    for text in texts:
        for part in split_specials(text, special_re)[::2]:
            counts.update(PRETOKEN_RE.findall(normalize_uncased(part) if uncased else part))
    return counts


def _bounded_map(fn, tasks: Iterable, workers: int, ahead: int = 2):
    """`fn` of each task, in order, in `workers` processes with at most `ahead` tasks each queued: unlike
    `Pool.imap`, which reads its whole input at once, the input is read as the results are taken."""
    if workers <= 1:
        yield from map(fn, tasks)
        return
    # fork where there is one, for the reason given in count_pretokens
    methods = multiprocessing.get_all_start_methods()
    pool = multiprocessing.get_context("fork" if "fork" in methods else "spawn").Pool(workers)
    try:
        pending: collections.deque = collections.deque()
        for task in tasks:
            pending.append(pool.apply_async(fn, (task,)))
            if len(pending) >= ahead * workers:
                yield pending.popleft().get()
        while pending:
            yield pending.popleft().get()
    finally:
        pool.terminate()
        pool.join()


def count_pretokens(input_path, special_tokens: Sequence[str] = (), *, uncased: bool = False,
                    workers: int | None = None, progress: bool = True, chunk_bytes: int | None = None) -> Counter:
    """How often each pre-token (a str) occurs in the file(s), counted in parallel over chunks."""
    paths = _paths(input_path)
    if not workers:
        workers = usable_cpus()
    total = sum(os.path.getsize(p) for p in paths)
    if chunk_bytes is None:
        chunk_bytes = min(max(total // (4 * workers), 1 << 18), 4 << 20)
    ranges = [(p, a, b) for p in paths for a, b in chunk_ranges(p, chunk_bytes, special_tokens)]
    # Several tasks per worker balance the load; grouping chunks into tasks keeps the number of Counters
    # the main process must add up (the serial part) small on huge inputs.
    group = max(chunk_bytes, total // (16 * workers))
    tasks, current, size = [], [], 0
    for r in ranges:
        current.append(r)
        size += r[2] - r[1]
        if size >= group:
            tasks.append((current, tuple(special_tokens), uncased))
            current, size = [], 0
    if current:
        tasks.append((current, tuple(special_tokens), uncased))
    counts: Counter = Counter()
    pool = None
    if workers > 1 and len(tasks) > 1:
        # fork, where there is one: spawn and forkserver re-run the caller's main module in each worker,
        # which breaks `python -` and notebooks and re-runs unguarded scripts. The workers only run regex
        # and Counter code, so the usual risk of forking a threaded process (a lock held at fork) is small.
        # The pool is made before the tqdm bar, whose monitor thread would make the fork warn.
        methods = multiprocessing.get_all_start_methods()
        pool = multiprocessing.get_context("fork" if "fork" in methods else "spawn").Pool(min(workers, len(tasks)))
    try:
        results = pool.imap_unordered(_count_ranges, tasks) if pool else map(_count_ranges, tasks)
        with tqdm(total=total, unit="B", unit_scale=True, desc="count pre-tokens", file=sys.stderr,
                  disable=not progress, delay=2.0) as bar:
            for n_bytes, c in results:
                counts.update(c)
                bar.update(n_bytes)
    finally:
        if pool is not None:
            pool.terminate()
    return counts


# ----------------------------------------------------------------------------- merging
def _inverted(b: bytes) -> bytes:
    """A key that sorts bytes strings in reverse order, so a min-heap pops the greatest pair first.

    Each byte x becomes 255 - x in two bytes, and a closing 256 makes a prefix sort after its extensions,
    as `b"ab" < b"abc"` requires reversed. The closing mark differs from every byte's code, so the key of
    a pair, `_inverted(a) + _inverted(b)`, orders pairs as the tuples `(a, b)` in reverse. Keys are bytes
    so that the heap compares ties with one memcmp.
    """
    return b"".join((255 - x).to_bytes(2, "big") for x in b) + b"\x01\x00"


def merge_loop(words: list[list[int]], freqs: list[int], n_merges: int,
               progress: bool = True) -> list[tuple[int, int]]:
    """Run up to `n_merges` merges over `words` (byte ids 0..255, modified in place) weighted by `freqs`;
    returns the merged id pairs, merge k making id 256+k. Tie rule as in `train_bpe`."""
    inv = [_inverted(bytes([x])) for x in range(256)]
    counts: dict[tuple[int, int], int] = defaultdict(int)
    # pair -> the words that held it at some point (maybe more than once): flat arrays of 4-byte indices,
    # a tenth of the memory of sets; a word that no longer holds the pair costs one look when it is merged
    where: dict[tuple[int, int], array] = defaultdict(_indices)
    for wi, w in enumerate(words):
        f = freqs[wi]
        for p in zip(w, w[1:]):
            counts[p] += f
            where[p].append(wi)
    # Heap entries (-count, key, a, b). An entry may be stale; the invariant is that every live pair has
    # some entry whose count is >= its current count, so a popped entry that matches the current count is
    # the true maximum. Pairs that grow get a fresh entry (only pairs with the new token can grow); counts
    # that shrink do not.
    heap = [(-c, inv[a] + inv[b], a, b) for (a, b), c in counts.items()]
    heapq.heapify(heap)
    merges: list[tuple[int, int]] = []
    bar = tqdm(total=n_merges, desc="merge", unit="merge", file=sys.stderr, disable=not progress, delay=2.0)
    while len(merges) < n_merges and heap:
        neg, key, a, b = heapq.heappop(heap)
        cur = counts.get((a, b), 0)
        if cur != -neg:
            if 0 < cur < -neg:
                heapq.heappush(heap, (-cur, key, a, b))
            continue
        new = 256 + len(merges)
        merges.append((a, b))
        inv.append(inv[a][:-2] + inv[b])  # _inverted of the new token's bytes, without recomputing it
        born: dict[tuple[int, int], int] = {}  # counts of the pairs with `new`
        for wi in where.pop((a, b)):
            w = words[wi]
            if a not in w:
                continue  # the word lost this pair to an earlier merge
            j = w.index(a)
            n = len(w)
            # The common case, inline for speed: a single a, followed by b. `_merge_word` says why the
            # neighbours are all that change.
            if j + 1 < n and w[j + 1] == b and (j + 2 == n or a not in w[j + 2:]):
                f = freqs[wi]
                if j:
                    pair = (w[j - 1], a)
                    counts[pair] -= f
                    pair = (w[j - 1], new)
                    born[pair] = born.get(pair, 0) + f
                    where[pair].append(wi)
                if j + 2 < n:
                    pair = (b, w[j + 2])
                    counts[pair] -= f
                    pair = (new, w[j + 2])
                    born[pair] = born.get(pair, 0) + f
                    where[pair].append(wi)
                w[j:j + 2] = [new]
            elif not (w.count(a) == 1 and (j + 1 == n or w[j + 1] != b)):
                _merge_word(words, wi, a, b, new, freqs[wi], counts, born, where)
        del counts[(a, b)]  # every occurrence was merged
        inv_new = inv[new]
        for (x, y), c in born.items():
            counts[(x, y)] = c
            heapq.heappush(heap, (-c, (inv_new if x == new else inv[x]) + (inv_new if y == new else inv[y]), x, y))
        if len(merges) % 256 == 0:
            bar.update(256)
        if len(merges) % _SWEEP == 0:
            heap = _sweep(counts, where, heap, inv)
    bar.update(len(merges) % 256)
    bar.close()
    return merges


def _indices() -> array:
    return array("i")


def _sweep(counts: dict, where: dict, heap: list, inv: list[bytes]) -> list:
    """Drop the pairs no word holds any more (a pair's count only ever grows when it is made, with a new
    token, so one at 0 stays there), and rebuild the heap once stale entries are half as many as the live ones:
    memory then follows the pairs that exist, not every pair that ever did."""
    dead = [p for p, c in counts.items() if c <= 0]
    for p in dead:
        del counts[p]
        where.pop(p, None)
    if 2 * len(heap) > 3 * len(counts):
        heap = [(-c, inv[a] + inv[b], a, b) for (a, b), c in counts.items()]
        heapq.heapify(heap)
    return heap


def _merge_word(words: list[list[int]], wi: int, a: int, b: int, new: int, f: int,
                counts: dict[tuple[int, int], int], born: dict[tuple[int, int], int],
                where: dict[tuple[int, int], array]) -> bool:
    """Replace each non-overlapping (a, b) of word `wi`, left to right, by `new`; take the pairs that
    go away off `counts` and add those that appear to `born` (weighted by the word's count `f`), noting
    the word in `where` for each. Returns False if the word no longer holds the pair.

    Only the neighbours of each occurrence change: (x, a) becomes (x, new) on the left and (b, y)
    becomes (new, y) on the right. Where two occurrences touch (x is the `new` just made, or y starts the
    next occurrence), the pair between them, (b, a), becomes (new, new), counted once, on the left.
    The pair (a, b) itself is dropped by the caller.
    """
    w = words[wi]
    n, i, out = len(w), 0, []
    index = w.index
    while True:
        try:
            j = index(a, i)
        except ValueError:
            break
        if j + 1 == n or w[j + 1] != b:
            out += w[i:j + 1]
            i = j + 1
            continue
        out += w[i:j]
        if out:
            x = out[-1]
            if x == new:
                counts[(b, a)] -= f
                born[(new, new)] = born.get((new, new), 0) + f
                where[(new, new)].append(wi)
            else:
                counts[(x, a)] -= f
                born[(x, new)] = born.get((x, new), 0) + f
                where[(x, new)].append(wi)
        if j + 2 < n:
            y = w[j + 2]
            if not (y == a and j + 3 < n and w[j + 3] == b):
                counts[(b, y)] -= f
                born[(new, y)] = born.get((new, y), 0) + f
                where[(new, y)].append(wi)
        out.append(new)
        i = j + 2
    if len(out) == i:  # nothing merged: `out` holds w[:i] unchanged
        return False
    out += w[i:]
    words[wi] = out
    return True
