"""Embedded ASR: pocketsphinx with the en-US model bundled in its wheel.

A decoder is heavy (~0.3 s to build, tens of MB) and not thread-safe, so the engine keeps a
pool of `max_concurrency` decoders. A stream takes one on its first feed and keeps it until
finish/aclose; when all are taken, feed() waits, which is the back pressure the session sees.

Every decoder call runs in a ThreadPoolExecutor. Measured here (pocketsphinx 5.1.1): the
binding does NOT release the GIL inside process_raw/end_utt. Two threads decode no faster than
one, and the event loop only gets the GIL back between calls. So audio is handed to
process_raw in 20 ms slices (Python bytecode between slices lets the loop in every ~10 ms), and
the remaining stall is end_utt's second pass (~45 ms per second of speech). A process pool
would be needed for real parallelism and a stall-free loop.
"""

from __future__ import annotations

import asyncio
import logging
import re
from collections import deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

import pocketsphinx

from server.config import PocketsphinxModelConfig
from server.models.base import (
    EngineError,
    EngineUnavailable,
    Hypothesis,
    TranscriptionStream,
    WordTiming,
)

log = logging.getLogger(__name__)

SAMPLE_RATE = 16000
_SLICE_BYTES = 640  # 20 ms at 16 kHz: bounds how long one GIL-holding call blocks the loop
_ALT_PRONUNCIATION = re.compile(r"\(\d+\)$")

Decoder = Any  # pocketsphinx ships no type information
_T = TypeVar("_T")
_RawSeg = tuple[str, int, int, float]


def _is_filler(word: str) -> bool:
    # <s>, </s>, <sil>, [NOISE], [SPEECH], and ++GARBAGE++ style fillers of older models.
    return (
        (word.startswith("<") and word.endswith(">"))
        or (word.startswith("[") and word.endswith("]"))
        or (word.startswith("+") and word.endswith("+"))
    )


def _new_decoder() -> Decoder:
    # The default config points at the model inside the wheel (pocketsphinx.get_model_path());
    # FATAL keeps its very chatty INFO logging off stderr.
    return pocketsphinx.Decoder(loglevel="FATAL")


def _feed_sync(dec: Decoder, pcm: bytes, start: bool, want_hyp: bool) -> str | None:
    if start:
        dec.start_utt()
    view = memoryview(pcm)
    for i in range(0, len(view), _SLICE_BYTES):
        dec.process_raw(view[i : i + _SLICE_BYTES], False, False)
    if not want_hyp:
        return None
    hyp = dec.hyp()
    return hyp.hypstr if hyp is not None else ""


def _finish_sync(dec: Decoder) -> tuple[int, list[_RawSeg]]:
    dec.end_utt()
    # Segment.prob is already linear: the 5.x binding applies logmath_exp to ps_seg_prob, so
    # get_logmath().exp() on it again would always give ~1.0.
    segs = [(s.word, s.start_frame, s.end_frame, s.prob) for s in dec.seg() or ()]
    return int(dec.config["frate"]), segs


def _end_utt_sync(dec: Decoder) -> None:
    dec.end_utt()


class _DecoderPool:
    """At most `size` decoders; created lazily, handed out FIFO to waiters."""

    def __init__(self, size: int, executor: ThreadPoolExecutor) -> None:
        self.size = size
        self._executor = executor
        self._idle: list[Decoder] = []
        self._waiters: deque[asyncio.Future[Decoder]] = deque()
        self.created = 0
        self._closed = False

    @property
    def idle(self) -> int:
        return len(self._idle)

    @property
    def in_use(self) -> int:
        return self.created - len(self._idle)

    @property
    def waiting(self) -> int:
        return sum(1 for w in self._waiters if not w.done())

    def request(self) -> asyncio.Future[Decoder]:
        """A future for a decoder. The caller owns whatever it resolves to."""
        if self._closed:
            raise EngineUnavailable("pocketsphinx engine is closed")
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[Decoder] = loop.create_future()
        if self._idle:
            fut.set_result(self._idle.pop())
            return fut
        self._waiters.append(fut)
        if self.created < self.size:
            self.created += 1
            job = loop.run_in_executor(self._executor, _new_decoder)
            job.add_done_callback(self._created)
        return fut

    def _created(self, job: asyncio.Future[Decoder]) -> None:
        if job.cancelled() or job.exception() is not None:
            self.created -= 1
            exc = job.exception() if not job.cancelled() else None
            log.error("pocketsphinx decoder creation failed", exc_info=exc)
            err = EngineError(f"pocketsphinx decoder creation failed: {exc!r}", retryable=False)
            # Someone waits because of this creation; tell them rather than let them hang.
            while self._waiters:
                waiter = self._waiters.popleft()
                if not waiter.done():
                    waiter.set_exception(err)
                    break
            return
        self.release(job.result())

    def release(self, dec: Decoder) -> None:
        if self._closed:
            self.created -= 1
            return
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(dec)
                return
        self._idle.append(dec)

    def discard(self) -> None:
        """A decoder in unknown state was dropped: free its slot (and refill for a waiter)."""
        self.created -= 1
        if not self._closed and self.waiting and self.created < self.size:
            self.created += 1
            job = asyncio.get_running_loop().run_in_executor(self._executor, _new_decoder)
            job.add_done_callback(self._created)

    def close(self) -> None:
        self._closed = True
        self.created -= len(self._idle)
        self._idle.clear()
        err = EngineUnavailable("pocketsphinx engine is closed")
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_exception(err)


class PocketsphinxTranscriber:
    def __init__(self, name: str, cfg: PocketsphinxModelConfig) -> None:
        if cfg.max_concurrency < 1:
            raise ValueError("max_concurrency must be >= 1")
        self.name = name
        self.sample_rate = SAMPLE_RATE
        self.supports_interim = True
        self.cfg = cfg
        self._executor: ThreadPoolExecutor | None = None
        self._pool: _DecoderPool | None = None

    @property
    def pool(self) -> _DecoderPool:
        if self._pool is None:
            raise EngineUnavailable(f"{self.name}: engine not started")
        return self._pool

    async def start(self) -> None:
        if self._pool is not None:
            return
        if not self.cfg.language.lower().startswith("en"):
            raise EngineError(
                f"{self.name}: only the bundled en-US model is available, "
                f"not {self.cfg.language!r}",
                retryable=False,
            )
        self._executor = ThreadPoolExecutor(
            self.cfg.max_concurrency, thread_name_prefix=f"sphinx-{self.name}"
        )
        self._pool = _DecoderPool(self.cfg.max_concurrency, self._executor)
        # Build one decoder now: a broken install fails at start-up, not in the first session,
        # and the first utterance does not pay the load time.
        try:
            self._pool.release(await self._pool.request())
        except BaseException:
            await self.aclose()
            raise

    async def aclose(self) -> None:
        pool, executor = self._pool, self._executor
        self._pool = self._executor = None
        if pool is not None:
            pool.close()
        if executor is not None:
            # Waiting for queued decoder calls (bounded: 20 ms slices) off the loop.
            await asyncio.to_thread(executor.shutdown, True)

    def open_stream(
        self, *, language: str, session_id: str, utterance_id: int
    ) -> TranscriptionStream:
        return _SphinxStream(self)

    def submit(self, fn: Callable[..., _T], *args: Any) -> asyncio.Future[_T]:
        executor = self._executor
        if executor is None:
            raise EngineUnavailable(f"{self.name}: engine is not running")
        try:
            return asyncio.get_running_loop().run_in_executor(executor, fn, *args)
        except RuntimeError as exc:  # executor shut down under us
            raise EngineUnavailable(f"{self.name}: engine is closed") from exc


class _SphinxStream:
    def __init__(self, engine: PocketsphinxTranscriber) -> None:
        self._engine = engine
        self._interim_bytes = max(0, engine.cfg.interim_every_ms) * SAMPLE_RATE // 1000 * 2
        self._decoder: Decoder | None = None
        self._acquiring: asyncio.Future[Decoder] | None = None
        self._job: asyncio.Future[Any] | None = None
        self._lock = asyncio.Lock()
        self._in_utt = False
        self._carry = b""
        self._fed_bytes = 0
        self._next_interim_at = self._interim_bytes
        self._last_interim = ""
        self._closed = False

    async def _acquire(self) -> Decoder:
        if self._decoder is not None:
            return self._decoder
        fut = self._engine.pool.request()
        self._acquiring = fut
        try:
            dec = await fut
        except asyncio.CancelledError:
            if self._acquiring is fut:
                self._acquiring = None
                if fut.done() and not fut.cancelled() and fut.exception() is None:
                    self._engine.pool.release(fut.result())
            raise
        if self._acquiring is not fut:  # aclose() claimed it while we were waking up
            raise EngineError("stream is closed", retryable=False)
        self._acquiring = None
        self._decoder = dec
        return dec

    async def _call(self, fn: Callable[..., _T], *args: Any) -> _T:
        """Run one decoder call in the engine's threads (stream lock held)."""
        if self._job is not None and not self._job.done():
            # A previous call was abandoned by a cancelled caller; its thread still owns the
            # decoder, and decoders are not thread-safe.
            await asyncio.wait([self._job])
        job = self._engine.submit(fn, *args)
        self._job = job
        try:
            # Shielded so a cancelled caller leaves the call running (it cannot be stopped
            # anyway) and tracked in _job, instead of pretending the decoder is free.
            return await asyncio.shield(job)
        except (EngineError, asyncio.CancelledError):
            raise
        except Exception as exc:
            # The decoder's state is unknown after a failed call; never hand it out again.
            self._decoder = None
            self._in_utt = False
            if self._engine._pool is not None:
                self._engine._pool.discard()
            raise EngineError(f"pocketsphinx: {exc}") from exc

    async def feed(self, pcm: bytes) -> Hypothesis | None:
        if self._closed:
            raise EngineError("stream is closed", retryable=False)
        if self._carry:
            pcm = self._carry + pcm
        # process_raw wants whole samples; an odd byte waits for the next feed.
        if len(pcm) % 2:
            pcm, self._carry = pcm[:-1], pcm[-1:]
        else:
            self._carry = b""
        if not pcm:
            return None
        # The pool wait happens under the lock so concurrent feeds cannot both acquire;
        # aclose() does not deadlock on it because it fails the pending acquisition first.
        async with self._lock:
            dec = await self._acquire()
            if self._closed:
                raise EngineError("stream is closed", retryable=False)
            self._fed_bytes += len(pcm)
            want_hyp = self._fed_bytes >= self._next_interim_at
            if want_hyp:
                self._next_interim_at = self._fed_bytes + self._interim_bytes
            start = not self._in_utt
            self._in_utt = True
            text = await self._call(_feed_sync, dec, pcm, start, want_hyp)
        if not text or text == self._last_interim:
            return None
        self._last_interim = text
        return Hypothesis(text=text)

    async def finish(self) -> Hypothesis:
        if self._closed:
            raise EngineError("stream is closed", retryable=False)
        self._closed = True
        async with self._lock:
            dec = self._decoder
            if dec is None or not self._in_utt:
                await self._release()
                return Hypothesis(text="")
            # end_utt runs in this call, so whatever happens next the utterance is over.
            self._in_utt = False
            try:
                frate, raw = await self._call(_finish_sync, dec)
            finally:
                await self._release()
        words = [
            WordTiming(
                word=_ALT_PRONUNCIATION.sub("", word),
                start_ms=start * 1000 // frate,
                end_ms=(end + 1) * 1000 // frate,  # end_frame is inclusive
                confidence=min(1.0, max(0.0, prob)),
            )
            for word, start, end, prob in raw
            if not _is_filler(word)
        ]
        return Hypothesis(text=" ".join(w.word for w in words), words=words)

    async def aclose(self) -> None:
        self._closed = True
        acquiring, self._acquiring = self._acquiring, None
        if acquiring is not None:
            if not acquiring.done():
                acquiring.set_exception(EngineError("stream is closed", retryable=False))
            elif not acquiring.cancelled() and acquiring.exception() is None:
                self._decoder = acquiring.result()  # claim it: the waking feed() will see this
        async with self._lock:
            await self._release()

    async def _release(self) -> None:
        """Give the decoder back to the pool, ending a running utterance first.

        Completes even if the caller is cancelled midway: a decoder that never returns would
        shrink the pool for good.
        """
        await asyncio.shield(self._release_soon())

    def _release_soon(self) -> asyncio.Future[None]:
        released: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        dec, self._decoder = self._decoder, None
        in_utt, self._in_utt = self._in_utt, False
        pool = self._engine._pool
        if dec is None:
            released.set_result(None)
            return released

        def give_back(ok: bool) -> None:
            if pool is not None:
                if ok:
                    pool.release(dec)
                else:
                    pool.discard()
            if not released.done():
                released.set_result(None)

        def end_utt(_: object = None) -> None:
            if not in_utt:
                give_back(True)
                return
            try:
                job = self._engine.submit(_end_utt_sync, dec)
            except EngineError:
                give_back(False)
                return
            job.add_done_callback(lambda j: give_back(not j.cancelled() and not j.exception()))

        busy = self._job
        if busy is not None and not busy.done():
            busy.add_done_callback(end_utt)  # never end_utt while another thread decodes
        else:
            end_utt()
        return released
