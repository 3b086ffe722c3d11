"""Embedded ASR: pocketsphinx with the en-US model bundled in its wheel, in worker processes.

pocketsphinx 5.1.1 does not release the GIL inside process_raw/end_utt (end_utt alone holds it
~45 ms per second of speech), so decoding in this process would stall the gateway's event loop
and every session on it. Each decoder therefore lives in its own worker process
(server.models.sphinx_worker), spoken to over its stdin/stdout with length-prefixed msgpack
frames; the loop only waits on pipes.

The engine keeps a pool of `max_concurrency` workers, all started (concurrently) by start(), so
a broken install fails at boot and no session pays the ~0.3 s start-up. A stream takes a worker
on its first feed and keeps it until finish/aclose; when all are taken, feed() waits, which is
the back pressure the session sees. A worker has at most one request in flight, and every
request has a deadline (`call_timeout_s`). A worker that dies or misses a deadline is killed,
reaped and replaced; the stream using it gets EngineError(retryable=True), the pool goes on.
"""

from __future__ import annotations

import asyncio
import logging
import sys
import time
from collections import deque
from collections.abc import Coroutine
from pathlib import Path
from typing import Any, Literal, TypeVar

import msgspec

from server.config import PocketsphinxModelConfig
from server.flow_control.sphinx_cmn import SessionMeans
from server.models.base import (
    EngineError,
    EngineUnavailable,
    Hypothesis,
    TranscriptionStream,
    WordTiming,
)
from server.models.sphinx_worker import (
    HEADER,
    SAMPLE_RATE,
    Abort,
    Err,
    Feed,
    Final,
    Finish,
    Hyp,
    Ok,
    ProtocolError,
    Reply,
    Request,
    Start,
    encode_frame,
    frame_length,
    reply_decoder,
)

log = logging.getLogger(__name__)

WORKER_MODULE = "server.models.sphinx_worker"
# The worker runs with the directory holding the `server` package as its cwd, so `-m` finds the
# very same code as this process whether it is installed or run from a checkout.
_PACKAGE_ROOT = str(Path(__file__).resolve().parents[2])

_R = TypeVar("_R", Hyp, Final, Ok)
_Failure = Literal["died", "timeout", "protocol", "cancelled"]
_FAILURE_TEXT = {
    "died": "died",
    "timeout": "missed its deadline: killed",
    "protocol": "broke the protocol: killed",
    "cancelled": "was cancelled: killed",
}


async def _read_reply(reader: asyncio.StreamReader) -> Reply:
    n = frame_length(await reader.readexactly(HEADER.size))
    return reply_decoder.decode(await reader.readexactly(n))


def _retrieve(task: asyncio.Task[Any]) -> None:
    # Mark an abandoned job's exception as seen; its owner learns of the failure another way.
    if not task.cancelled():
        task.exception()


class _Worker:
    """One decoder process. Whoever holds it (a stream, or the pool while idle) sends one
    request at a time; a request abandoned by a cancelled caller still completes first."""

    def __init__(self, proc: asyncio.subprocess.Process, call_timeout: float) -> None:
        self.proc = proc
        self.pid = proc.pid
        self._call_timeout = call_timeout
        self._job: asyncio.Task[Reply] | None = None
        self.failure: _Failure | None = None  # set once killed: never used again
        self.closed = False  # engine shutdown

    def __repr__(self) -> str:
        return f"<sphinx worker pid={self.pid} rc={self.proc.returncode} failure={self.failure}>"

    @property
    def usable(self) -> bool:
        return self.failure is None and not self.closed and self.proc.returncode is None

    @property
    def busy(self) -> bool:
        return self._job is not None and not self._job.done()

    async def wait_idle(self) -> None:
        job = self._job
        if job is not None and not job.done():
            await asyncio.wait([job])

    async def call(self, req: Request) -> Reply:
        await self.wait_idle()
        if self.closed:
            raise EngineUnavailable("pocketsphinx engine is closed")
        if not self.usable:
            raise EngineError(
                f"pocketsphinx worker {self.pid} is gone ({self.failure or 'exited'})",
                retryable=True,
            )
        job = asyncio.create_task(
            self._roundtrip(req), name=f"sphinx-{self.pid}-{type(req).__name__}"
        )
        job.add_done_callback(_retrieve)
        self._job = job
        # Shielded: a cancelled caller must not cut an exchange off halfway. The job reads (and
        # drops) the reply, so the channel is in sync for whoever sends the next request.
        return await asyncio.shield(job)

    async def _roundtrip(self, req: Request) -> Reply:
        proc = self.proc
        assert proc.stdin is not None and proc.stdout is not None
        what = type(req).__name__
        try:
            async with asyncio.timeout(self._call_timeout):
                proc.stdin.write(encode_frame(req))
                await proc.stdin.drain()
                return await _read_reply(proc.stdout)
        except TimeoutError:
            await self.kill("timeout")
            raise EngineError(
                f"pocketsphinx worker {self.pid} did not answer {what} within "
                f"{self._call_timeout:g} s; killed",
                retryable=True,
            ) from None
        except (OSError, EOFError) as exc:  # EOFError: asyncio.IncompleteReadError
            if self.closed:
                raise EngineUnavailable("pocketsphinx engine is closed") from exc
            await self.kill("died")
            raise EngineError(
                f"pocketsphinx worker {self.pid} died during {what} "
                f"(exit status {proc.returncode})",
                retryable=True,
            ) from exc
        except (ProtocolError, msgspec.DecodeError) as exc:
            await self.kill("protocol")
            raise EngineError(
                f"pocketsphinx worker {self.pid}: bad reply to {what}: {exc}", retryable=True
            ) from exc
        except asyncio.CancelledError:
            # Only a shutdown cancels a job; a half-done exchange cannot be resumed.
            await self.kill("cancelled")
            raise

    async def kill(self, failure: _Failure) -> None:
        """Kill the process (if still running) and reap it."""
        first = self.failure is None
        if first:
            self.failure = failure
        proc = self.proc
        if proc.returncode is None:
            try:
                proc.kill()
            except ProcessLookupError:
                pass
        if proc.stdin is not None:
            proc.stdin.close()
        await proc.wait()
        if first and failure != "cancelled":
            log.warning(
                "pocketsphinx worker %d %s (exit status %s)",
                self.pid,
                _FAILURE_TEXT[failure],
                proc.returncode,
            )

    async def stop(self, timeout: float) -> None:
        """Shutdown: EOF on stdin (it exits after the request in hand), kill if it lingers."""
        self.closed = True
        proc = self.proc
        if proc.stdin is not None and not proc.stdin.is_closing():
            proc.stdin.close()
        try:
            async with asyncio.timeout(timeout):
                await proc.wait()
        except TimeoutError:
            log.warning("pocketsphinx worker %d did not exit within %g s", self.pid, timeout)
            await self.kill("timeout")
        await self.wait_idle()  # its reply or EOF is there by now


class _WorkerPool:
    """`size` worker processes; handed out FIFO to waiters; dead ones replaced."""

    def __init__(self, name: str, cfg: PocketsphinxModelConfig) -> None:
        self.name = name
        self.size = cfg.max_concurrency
        self._call_timeout = cfg.call_timeout_s
        self._stop_timeout = cfg.stop_timeout_s
        self._workers: set[_Worker] = set()  # running: idle or held by a stream
        self._idle: list[_Worker] = []
        self._waiters: deque[asyncio.Future[_Worker]] = deque()
        self._spawning: set[asyncio.Task[_Worker]] = set()
        self._tasks: set[asyncio.Task[None]] = set()  # releases outliving a cancelled caller
        self._closed = False
        self.replaced = 0  # workers started to replace dead or killed ones

    @property
    def created(self) -> int:
        return len(self._workers) + len(self._spawning)

    @property
    def idle(self) -> int:
        return len(self._idle)

    @property
    def in_use(self) -> int:
        return len(self._workers) - len(self._idle)

    @property
    def waiting(self) -> int:
        return sum(1 for w in self._waiters if not w.done())

    @property
    def pids(self) -> list[int]:
        return sorted(w.pid for w in self._workers)

    def spawn(self) -> asyncio.Task[_Worker]:
        task = asyncio.get_running_loop().create_task(
            self._spawn(), name=f"sphinx-{self.name}-spawn"
        )
        self._spawning.add(task)
        task.add_done_callback(self._spawned)
        return task

    async def _spawn(self) -> _Worker:
        t0 = time.perf_counter()
        try:
            proc = await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                WORKER_MODULE,
                stdin=asyncio.subprocess.PIPE,
                stdout=asyncio.subprocess.PIPE,
                cwd=_PACKAGE_ROOT,
            )
        except OSError as exc:
            raise EngineError(f"cannot start a pocketsphinx worker: {exc}") from exc
        worker = _Worker(proc, self._call_timeout)
        assert proc.stdout is not None
        try:
            async with asyncio.timeout(self._call_timeout):
                reply = await _read_reply(proc.stdout)
        except BaseException as exc:
            await worker.kill("cancelled" if isinstance(exc, asyncio.CancelledError) else "died")
            if isinstance(exc, Exception):
                raise EngineError(
                    f"pocketsphinx worker {worker.pid} failed to start: {exc!r} "
                    f"(exit status {proc.returncode})"
                ) from exc
            raise
        if not isinstance(reply, Ok):
            await worker.kill("protocol")
            detail = reply.message if isinstance(reply, Err) else repr(reply)
            raise EngineError(f"pocketsphinx worker {worker.pid} failed to start: {detail}")
        log.info(
            "%s: pocketsphinx worker %d ready in %.0f ms",
            self.name,
            worker.pid,
            (time.perf_counter() - t0) * 1000,
        )
        return worker

    def _spawned(self, task: asyncio.Task[_Worker]) -> None:
        self._spawning.discard(task)
        if task.cancelled():
            return
        exc = task.exception()
        if exc is not None:
            log.error("%s: %s", self.name, exc)
            if not self._workers and not self._spawning:
                # Nothing running or coming could serve the waiters: tell them, not hang.
                err = EngineError(f"{self.name}: no pocketsphinx worker available: {exc}")
                self._fail_waiters(err)
            return
        worker = task.result()
        if self._closed:
            self._track(worker.stop(self._stop_timeout))
            return
        self._workers.add(worker)
        self.release(worker)

    def request(self) -> asyncio.Future[_Worker]:
        """A future for a worker. The caller owns whatever it resolves to."""
        if self._closed:
            raise EngineUnavailable("pocketsphinx engine is closed")
        fut: asyncio.Future[_Worker] = asyncio.get_running_loop().create_future()
        while self._idle:
            worker = self._idle.pop()
            if worker.usable:
                fut.set_result(worker)
                return fut
            self._retire(worker)  # died while idle
        self._waiters.append(fut)
        self._top_up()
        return fut

    def release(self, worker: _Worker) -> None:
        """Take a worker back: to a waiter, to the idle list, or, if it is dead, replace it."""
        if self._closed or not worker.usable or worker.busy:
            # busy: only if a release was cut short (loop shutdown); its state is unknown.
            self._retire(worker)
            return
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(worker)
                return
        self._idle.append(worker)

    def recycle(self, worker: _Worker, abort: bool) -> asyncio.Task[None]:
        """Release once the worker is between requests, ending its utterance first if asked.

        A task, so it completes even if the releasing caller is cancelled (the caller shields
        it): a worker that never comes back would shrink the pool for good.
        """
        return self._track(self._recycle(worker, abort))

    async def _recycle(self, worker: _Worker, abort: bool) -> None:
        try:
            if abort:
                reply = await worker.call(Abort())  # a dead or stuck worker is killed by this
                if not isinstance(reply, Ok):
                    log.warning("pocketsphinx worker %d: Abort answered %r", worker.pid, reply)
            else:
                await worker.wait_idle()
        except EngineError:
            pass  # the worker is closed or killed; release() retires and replaces it
        except Exception:
            log.exception("pocketsphinx worker %d: recycling failed", worker.pid)
            await worker.kill("protocol")
        finally:
            self.release(worker)

    def _track(self, coro: Coroutine[Any, Any, None]) -> asyncio.Task[None]:
        task = asyncio.get_running_loop().create_task(coro, name=f"sphinx-{self.name}-release")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    def _retire(self, worker: _Worker) -> None:
        if worker not in self._workers:
            return
        self._workers.discard(worker)
        if worker.proc.returncode is None and not worker.closed:
            self._track(worker.kill("protocol"))  # not expected: killed workers are reaped
        if not self._closed:
            log.warning("%s: replacing %r", self.name, worker)
            self.replaced += 1
            self._top_up()

    def _top_up(self) -> None:
        # Back to full strength right away, so the next stream does not wait for a start-up.
        # A failed start is retried only when a stream asks for a worker (request()).
        while not self._closed and self.created < self.size:
            self.spawn()

    def _fail_waiters(self, err: EngineError) -> None:
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_exception(err)

    async def aclose(self) -> None:
        self._closed = True
        self._fail_waiters(EngineUnavailable("pocketsphinx engine is closed"))
        spawning = list(self._spawning)
        for task in spawning:
            task.cancel()
        workers = list(self._workers)
        self._workers.clear()
        self._idle.clear()
        await asyncio.gather(
            *(w.stop(self._stop_timeout) for w in workers), *spawning, return_exceptions=True
        )
        while self._tasks:  # releases in progress, workers that finished starting too late
            await asyncio.gather(*list(self._tasks), return_exceptions=True)


class PocketsphinxTranscriber:
    def __init__(self, name: str, cfg: PocketsphinxModelConfig) -> None:
        if cfg.max_concurrency < 1:
            raise ValueError("max_concurrency must be >= 1")
        if cfg.call_timeout_s <= 0:
            raise ValueError("call_timeout_s must be > 0")
        if cfg.stop_timeout_s < 0:
            raise ValueError("stop_timeout_s must be >= 0")
        self.name = name
        self.sample_rate = SAMPLE_RATE
        self.supports_interim = True
        self.cfg = cfg
        self._pool: _WorkerPool | None = None
        self.session_means = SessionMeans()

    @property
    def pool(self) -> _WorkerPool:
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
        pool = self._pool = _WorkerPool(self.name, self.cfg)
        t0 = time.perf_counter()
        # All workers now, concurrently: a broken install fails at start-up, not in the first
        # session, and no utterance pays the decoder load time.
        spawns = [pool.spawn() for _ in range(pool.size)]
        try:
            await asyncio.wait(spawns)
            for task in spawns:
                exc = task.exception()
                if exc is not None:
                    raise EngineError(f"{self.name}: {exc}", retryable=False) from exc
        except BaseException:
            await self.aclose()
            raise
        log.info(
            "%s: %d pocketsphinx workers ready in %.0f ms (pids %s)",
            self.name,
            pool.size,
            (time.perf_counter() - t0) * 1000,
            pool.pids,
        )

    async def aclose(self) -> None:
        pool, self._pool = self._pool, None
        if pool is not None:
            await pool.aclose()

    def open_stream(
        self, *, language: str, session_id: str, utterance_id: int
    ) -> TranscriptionStream:
        return _SphinxStream(self, session_id)


class _SphinxStream:
    def __init__(self, engine: PocketsphinxTranscriber, session_id: str) -> None:
        self._engine = engine
        self._session_id = session_id
        self._interim_bytes = max(0, engine.cfg.interim_every_ms) * SAMPLE_RATE // 1000 * 2
        self._pool: _WorkerPool | None = None
        self._worker: _Worker | None = None
        self._acquiring: asyncio.Future[_Worker] | None = None
        self._lock = asyncio.Lock()
        self._in_utt = False
        self._failed: EngineError | None = None
        self._carry = b""
        self._fed_bytes = 0
        self._next_interim_at = self._interim_bytes
        self._last_interim = ""
        self._closed = False

    async def _acquire(self) -> _Worker:
        if self._worker is not None:
            return self._worker
        pool = self._pool = self._engine.pool
        fut = pool.request()
        self._acquiring = fut
        try:
            worker = await fut
        except asyncio.CancelledError:
            if self._acquiring is fut:
                self._acquiring = None
                if fut.done() and not fut.cancelled() and fut.exception() is None:
                    pool.release(fut.result())
            raise
        if self._acquiring is not fut:  # aclose() claimed it while we were waking up
            raise EngineError("stream is closed", retryable=False)
        self._acquiring = None
        self._worker = worker
        return worker

    async def _call(self, worker: _Worker, req: Request, expect: type[_R]) -> _R:
        """One request (stream lock held). On failure the utterance is lost: the worker goes
        back to the pool (which replaces it if it was killed) and the stream fails."""
        try:
            reply = await worker.call(req)
        except EngineError as exc:
            self._fail(exc)
            raise
        if isinstance(reply, expect):
            return reply
        if isinstance(reply, Err):  # the worker reset itself and is fine
            err = EngineError(f"pocketsphinx: {reply.message}")
        else:
            await worker.kill("protocol")
            err = EngineError(f"pocketsphinx worker {worker.pid}: {reply!r} to {req!r}")
        self._fail(err)
        raise err

    def _fail(self, exc: EngineError) -> None:
        self._failed = exc
        self._in_utt = False
        worker, self._worker = self._worker, None
        if worker is not None and self._pool is not None:
            self._pool.release(worker)

    async def _start_utterance(self) -> _Worker:
        worker = await self._acquire()
        # Marked first: if the caller is cancelled mid-request, aclose() still aborts.
        self._in_utt = True
        try:
            await self._call(worker, self._start(), Ok)
        except EngineUnavailable:
            raise
        except EngineError:
            if worker.failure != "died":
                raise
            # It died before this utterance had any audio: nothing is lost, take another.
            log.warning("pocketsphinx worker %d was dead; retrying on another", worker.pid)
            self._failed = None
            worker = await self._acquire()
            self._in_utt = True
            await self._call(worker, self._start(), Ok)
        return worker

    def _start(self) -> Start:
        return Start(cmn=self._engine.session_means.get(self._session_id))

    def _check_open(self) -> None:
        if self._closed:
            raise EngineError("stream is closed", retryable=False)
        if self._failed is not None:
            raise EngineError(f"utterance lost: {self._failed}", retryable=True)

    async def feed(self, pcm: bytes) -> Hypothesis | None:
        self._check_open()
        if self._carry:
            pcm = self._carry + pcm
        # The decoder wants whole samples; an odd byte waits for the next feed.
        if len(pcm) % 2:
            pcm, self._carry = pcm[:-1], pcm[-1:]
        else:
            self._carry = b""
        if not pcm:
            return None
        # The pool wait happens under the lock so concurrent feeds cannot both acquire;
        # aclose() does not deadlock on it because it fails the pending acquisition first.
        async with self._lock:
            self._check_open()
            if self._in_utt and self._worker is not None:
                worker = self._worker
            else:
                worker = await self._start_utterance()
            if self._closed:
                raise EngineError("stream is closed", retryable=False)
            self._fed_bytes += len(pcm)
            want_hyp = self._fed_bytes >= self._next_interim_at
            if want_hyp:
                self._next_interim_at = self._fed_bytes + self._interim_bytes
            reply = await self._call(worker, Feed(pcm=pcm, want_hyp=want_hyp), Hyp)
        text = reply.text
        if not text or text == self._last_interim:
            return None
        self._last_interim = text
        return Hypothesis(text=text)

    async def finish(self) -> Hypothesis:
        self._check_open()
        self._closed = True
        async with self._lock:
            if self._failed is not None:
                await self._release()
                raise EngineError(f"utterance lost: {self._failed}", retryable=True)
            worker = self._worker
            if worker is None or not self._in_utt:
                await self._release()
                return Hypothesis(text="")
            # Finish ends the utterance in the worker whatever happens next.
            self._in_utt = False
            try:
                final = await self._call(worker, Finish(), Final)
            finally:
                await self._release()
        if final.cmn:
            self._engine.session_means.put(self._session_id, final.cmn)
        words = [
            WordTiming(word=w, start_ms=s, end_ms=e, confidence=c) for w, s, e, c in final.words
        ]
        return Hypothesis(text=final.text, words=words)

    async def aclose(self) -> None:
        self._closed = True
        acquiring, self._acquiring = self._acquiring, None
        if acquiring is not None:
            if not acquiring.done():
                acquiring.set_exception(EngineError("stream is closed", retryable=False))
            elif not acquiring.cancelled() and acquiring.exception() is None:
                self._worker = acquiring.result()  # claim it: the waking feed() will see this
        async with self._lock:
            await self._release()

    async def _release(self) -> None:
        """Give the worker back, aborting a running utterance first (Abort request; a worker
        that does not answer within call_timeout_s is killed and replaced)."""
        worker, self._worker = self._worker, None
        abort, self._in_utt = self._in_utt, False
        pool = self._pool
        if worker is None or pool is None:
            return
        if not abort and not worker.busy:
            pool.release(worker)
            return
        await asyncio.shield(pool.recycle(worker, abort))
