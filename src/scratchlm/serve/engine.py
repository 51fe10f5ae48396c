"""One worker thread owns the model; requests wait in a queue and are generated in batches.

Whatever the HTTP threads do (many at once, clients that vanish mid-reply), only this thread touches
the model, so it never sees two forward passes at once. Requests are generated together, up to
`max_batch` at a time, each with its own sampling parameters and seed: one that arrives while others
are being generated joins them at the next step, and one whose client is gone leaves at the next step.

A request that asks for log-probabilities (`logprobs`, `echo`) is served between two steps, alone: its
completion is generated, then prompt and completion are read in one forward pass that gives every token's
log-probability and the likeliest tokens at each place. Evaluation harnesses send these by the thousand,
with one new token or none, so they cost about one forward pass each.
"""
from __future__ import annotations

import queue
import threading
import traceback
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch

from scratchlm.infer.decoder import check_tokens
from scratchlm.infer.generate import stream
from scratchlm.infer.sampling import SamplingParams
from scratchlm.infer.text import TextBatch, TextStream


class Busy(Exception):
    """The queue is full; the client should retry later."""


@dataclass
class Event:
    text: str
    finish_reason: str | None       # None while the reply goes on
    completion_tokens: int
    error: str | None = None
    scores: Scores | None = None    # a scored request's last event


@dataclass
class Scores:
    """Every token of prompt and completion, its log-probability (None for the first, which nothing
    predicts) and the `top` likeliest (token, log-probability) pairs at its place."""
    ids: list[int]
    values: list[float | None]
    tops: list[list[tuple[int, float]] | None]


class Job:
    def __init__(self, prompt: Sequence[int], params: SamplingParams, top: int | None = None):
        self.prompt = list(prompt)
        self.params = params
        self.top = top              # None: an ordinary request; else score it, listing `top` likeliest tokens
        self.events: queue.Queue[Event] = queue.Queue()
        self.cancelled = threading.Event()

    def cancel(self) -> None:
        self.cancelled.set()

    def stream(self, timeout: float | None = None) -> Iterator[Event]:
        """Events until the last one (which has a finish reason or an error)."""
        while True:
            event = self.events.get(timeout=timeout)
            yield event
            if event.finish_reason is not None or event.error is not None:
                return


class Engine:
    def __init__(self, model: torch.nn.Module, tokenizer, max_batch: int = 8, max_queue: int = 64):
        self.model, self.tokenizer = model.eval(), tokenizer
        self.max_batch = max(1, max_batch)
        self.waiting: queue.Queue[Job] = queue.Queue(maxsize=max_queue)
        self.stopping = threading.Event()
        self.thread = threading.Thread(target=self._work, name="scratchlm-engine", daemon=True)
        self.busy_rows = 0
        self.served = 0

    def start(self) -> Engine:
        self.thread.start()
        return self

    def stop(self) -> None:
        self.stopping.set()
        self.thread.join(timeout=10)
        while (job := self._next_waiting(None)) is not None:
            job.events.put(Event("", None, 0, error="the server is shutting down"))

    @property
    def queued(self) -> int:
        return self.waiting.qsize()

    def submit(self, prompt: Sequence[int], params: SamplingParams, top: int | None = None) -> Job:
        check_tokens(self.model, prompt)  # here, in the request's thread: the worker must not fail on it
        job = Job(prompt, params, top)
        try:
            self.waiting.put_nowait(job)
        except queue.Full:
            raise Busy(f"{self.waiting.maxsize} requests are already waiting") from None
        return job

    def _next_waiting(self, timeout: float | None) -> Job | None:
        """A queued job whose client is still there, or None."""
        while True:
            try:
                job = self.waiting.get(timeout=timeout) if timeout else self.waiting.get_nowait()
            except queue.Empty:
                return None
            if not job.cancelled.is_set():
                return job

    def _work(self) -> None:
        torch.set_grad_enabled(False)
        while not self.stopping.is_set():
            job = self._next_waiting(timeout=0.1)
            if job is not None:
                self._score(job) if job.top is not None else self._run(job)

    def _run(self, first: Job) -> None:
        """Generate for `first` and for whatever arrives while it runs, up to `max_batch` at a time: a
        request joins the running batch between two steps instead of waiting for the batch to end."""
        jobs: list[Job] = [first]
        try:
            batch = TextBatch(self.model, self.tokenizer, [first.prompt], [first.params])
            self._answer_empty(batch, jobs, 0)
            while not self.stopping.is_set():
                while len(batch.active) < self.max_batch and (job := self._next_waiting(None)):
                    if job.top is not None:
                        self._score(job)
                        continue
                    jobs.append(job)
                    self._answer_empty(batch, jobs, batch.add(job.prompt, job.params))
                if batch.done:
                    break
                self.busy_rows = len(batch.active)
                for r in list(batch.active):
                    if jobs[r].cancelled.is_set():
                        batch.cancel(r)
                for r, piece, reason in batch.step():
                    jobs[r].events.put(Event(piece, reason, batch.completion_tokens(r)))
            for r in batch.active:  # stopped midway: release the waiting HTTP threads
                jobs[r].events.put(Event("", None, 0, error="the server is shutting down"))
        except Exception as e:  # a bug must not kill the worker: fail these requests, serve the next
            traceback.print_exc()
            for j in jobs:
                j.events.put(Event("", None, 0, error=f"generation failed: {type(e).__name__}: {e}"))
        finally:
            self.busy_rows = 0
            self.served += len(jobs)

    def _score(self, job: Job) -> None:
        try:
            generated, text, reason = self._alone(job)
            ids = job.prompt + generated
            device = next(self.model.parameters()).device
            with torch.inference_mode():
                logp = torch.log_softmax(self.model(torch.tensor([ids], device=device))[0, :-1].float(), dim=-1)
                picked = logp.gather(1, torch.tensor(ids[1:], device=device)[:, None])[:, 0].tolist()
                tops: list = [None]
                if job.top:
                    values, indices = logp.topk(job.top, dim=-1)
                    tops += [list(zip(i, v)) for i, v in zip(indices.tolist(), values.tolist())]
                else:
                    tops += [[] for _ in picked]
            job.events.put(Event(text, reason, len(generated), scores=Scores(ids, [None] + picked, tops)))
        except Exception as e:  # as in _run: fail this request, serve the next
            traceback.print_exc()
            job.events.put(Event("", None, 0, error=f"scoring failed: {type(e).__name__}: {e}"))
        finally:
            self.served += 1

    def _alone(self, job: Job) -> tuple[list[int], str, str]:
        """(new tokens, their text, finish reason) for one request, generated by itself."""
        params = job.params
        if params.max_new_tokens == 0:
            return [], "", "length"
        text, pieces, generated = TextStream(self.tokenizer, params.stop), [], []
        tokens = stream(self.model, job.prompt, params)
        for t in tokens:
            generated.append(t)
            pieces.append(text.push(t))
            if text.stopped or job.cancelled.is_set():
                tokens.close()
                return generated, "".join(pieces), "stop"
        pieces.append(text.close())
        return generated, "".join(pieces), "length" if len(generated) == params.max_new_tokens else "stop"

    @staticmethod
    def _answer_empty(batch: TextBatch, jobs: list[Job], row: int) -> None:
        reason = batch.finish_reason(row)
        if reason is not None:  # asked for no tokens at all: done before it starts
            jobs[row].events.put(Event("", reason, 0))
