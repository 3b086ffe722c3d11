"""Embedded TTS: espeak-ng (Debian package espeak-ng), one subprocess per text chunk.

`espeak-ng --stdout --stdin` writes a WAV stream (its header carries placeholder sizes, as
it cannot seek back in a pipe) while it synthesizes, so PCM is yielded as the pipe delivers it,
not when the process ends. A semaphore bounds the processes alive at once: a caller beyond the
bound waits for a slot, which is the back pressure a busy engine exerts. The slot is held while
the consumer iterates, so a consumer that stops reading (no playback credit) also stops
espeak-ng, through the pipe, instead of letting audio pile up in memory.

Stopping the iteration (aclose, or cancelling the consuming task) kills the process and reaps
it before the slot is released.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import shutil
from collections.abc import AsyncGenerator, AsyncIterator
from dataclasses import dataclass, field

from server.audio.text_chunker import count_tokens
from server.config import EspeakModelConfig
from server.models.base import EngineError, EngineUnavailable
from streamgate_protocol.audio import (
    MAX_SAMPLE_RATE,
    MIN_SAMPLE_RATE,
    AudioFormatError,
    StreamDecoder,
)

log = logging.getLogger(__name__)

DEBIAN_PACKAGE = "espeak-ng"
READ_BYTES = 8192  # one pipe read; ~190 ms of 22.05 kHz audio, well below first-audio needs
DEFAULT_VOICE = "en-us"  # no configured voice and no language tag
# What may follow -v: a voice/language id, file path or name, and a "+variant". Anything else
# (spaces, a leading "-") is refused before it reaches the command line.
_VOICE_SYNTAX = re.compile(r"[A-Za-z0-9][A-Za-z0-9_/()+.,-]{0,63}")
_OTHER_LANGUAGE = re.compile(r"\(([^\s()]+) (\d+)\)")
_UNKNOWN_VOICE_MESSAGE = "voice does not exist"
# Language tags whose espeak-ng voice has a different id.
_LANGUAGE_ALIASES = {"zh": "cmn", "zh-cn": "cmn", "zh-hk": "yue", "iw": "he", "nb-no": "nb"}


@dataclass(slots=True)
class VoiceCatalog:
    """What `espeak-ng --voices` lists, lower-cased, for resolving and validating voices."""

    languages: dict[str, str] = field(default_factory=dict)  # tag or alias -> voice id
    names: set[str] = field(default_factory=set)  # everything -v accepts (ids, files, names)
    variants: set[str] = field(default_factory=set)  # accepted after "+"

    @classmethod
    def parse(cls, voices: str, variants: str = "") -> VoiceCatalog:
        cat = cls()
        rows = [line.split(None, 5) for line in voices.splitlines()[1:]]  # [0] is the header
        rows = [cols for cols in rows if len(cols) >= 5 and cols[0].isdigit()]
        for cols in rows:
            lang, name, path = cols[1].lower(), cols[3].lower(), cols[4].lower()
            cat.languages[lang] = lang
            cat.names.update((lang, name, path, path.rsplit("/", 1)[-1]))
        # "Other Languages" aliases ("(zh 5)") map to their best-ranked voice, which is what
        # espeak-ng itself picks for -v alias; a real voice id always wins over an alias.
        best: dict[str, int] = {}
        for cols in rows:
            for alias, rank in _OTHER_LANGUAGE.findall(cols[5] if len(cols) > 5 else ""):
                alias = alias.lower()
                cat.names.add(alias)
                if alias in cat.languages and alias not in best:
                    continue
                if int(rank) < best.get(alias, 1 << 30):
                    best[alias] = int(rank)
                    cat.languages[alias] = cols[1].lower()
        for line in variants.splitlines()[1:]:
            cols = line.split()
            if len(cols) >= 5:
                cat.variants.update((cols[3].lower(), cols[4].lower().rsplit("/", 1)[-1]))
        return cat

    def voice_for_language(self, language: str) -> str | None:
        """Voice for a tag: en-US -> en-us, hi-IN -> hi, zh-CN -> cmn; None if none fits."""
        tag = language.strip().lower().replace("_", "-")
        while tag:
            for candidate in (tag, _LANGUAGE_ALIASES.get(tag)):
                if candidate and candidate in self.languages:
                    return self.languages[candidate]
            tag = tag.rpartition("-")[0]  # drop the most specific subtag and try again
        return None

    def accepts(self, voice: str) -> bool:
        base, _, variant = voice.lower().partition("+")
        if base not in self.names:
            return False
        return not variant or not self.variants or variant in self.variants


class EspeakSynthesizer:
    def __init__(self, name: str, cfg: EspeakModelConfig, *, binary: str = "espeak-ng") -> None:
        if cfg.max_concurrency < 1 or cfg.rate_wpm < 1 or cfg.max_chars < 1:
            raise ValueError("max_concurrency, rate_wpm and max_chars must be >= 1")
        if not MIN_SAMPLE_RATE <= cfg.sample_rate <= MAX_SAMPLE_RATE:
            raise ValueError(f"sample_rate must be within {MIN_SAMPLE_RATE}..{MAX_SAMPLE_RATE}")
        self.name = name
        self.cfg = cfg
        self.sample_rate = cfg.sample_rate
        self.max_chars = cfg.max_chars
        self.max_tokens = cfg.max_tokens
        self._binary = binary
        self._path: str | None = None
        self._catalog = VoiceCatalog()
        self._sem = asyncio.Semaphore(cfg.max_concurrency)
        self._procs: set[asyncio.subprocess.Process] = set()
        self._closed = False

    @property
    def active_pids(self) -> frozenset[int]:
        """Process ids of the espeak-ng processes running now (for tests and diagnostics)."""
        return frozenset(p.pid for p in self._procs)

    async def start(self) -> None:
        if self._path is not None:
            return
        path = shutil.which(self._binary)
        if path is None:
            raise EngineError(
                f"{self.name}: {self._binary!r} not found on PATH; install the Debian package "
                f"{DEBIAN_PACKAGE} (apt-get install {DEBIAN_PACKAGE})",
                retryable=False,
            )
        voices = await self._run_listing(path, "--voices")
        variants = await self._run_listing(path, "--voices=variant")
        self._catalog = VoiceCatalog.parse(voices, variants)
        if not self._catalog.languages:
            log.warning("%s: no espeak-ng voice list; voices go unchecked", self.name)
        self._path = path
        self._closed = False
        if self.cfg.voice:
            # A bad configured voice fails at start-up, not in every session.
            self.resolve_voice(None, "")

    async def _run_listing(self, path: str, arg: str) -> str:
        proc = await asyncio.create_subprocess_exec(
            path, arg, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.DEVNULL
        )
        out, _ = await proc.communicate()
        return out.decode("utf-8", "replace")

    async def aclose(self) -> None:
        self._closed = True
        self._path = None
        # Running synthesis ends at once (its generator reaps the process and raises
        # EngineUnavailable); a consumer parked on a slot sees the closed flag when it gets one.
        for proc in list(self._procs):
            with contextlib.suppress(ProcessLookupError):
                proc.kill()

    def resolve_voice(self, voice: str | None, language: str) -> str:
        """The -v argument: explicit voice, else the configured one, else from the language."""
        chosen = voice or self.cfg.voice
        if chosen:
            chosen = chosen.strip()
            known = not self._catalog.names or self._catalog.accepts(chosen)
            if not _VOICE_SYNTAX.fullmatch(chosen) or not known:
                raise EngineError(
                    f"{self.name}: unknown espeak-ng voice {chosen!r} (see espeak-ng --voices)",
                    retryable=False,
                )
            return chosen
        if not language.strip():
            return DEFAULT_VOICE
        if not self._catalog.languages:
            # No catalog to consult: espeak-ng's own matching of the tag is the best guess.
            fallback = language.strip().lower().replace("_", "-")
            if _VOICE_SYNTAX.fullmatch(fallback):
                return fallback
        else:
            found = self._catalog.voice_for_language(language)
            if found is not None:
                return found
        raise EngineError(
            f"{self.name}: no espeak-ng voice for language {language!r}", retryable=False
        )

    def _check_text(self, text: str) -> None:
        if len(text) > self.max_chars or (
            self.max_tokens is not None and count_tokens(text) > self.max_tokens
        ):
            raise EngineError(
                f"{self.name}: text exceeds the model limit ({self.max_chars} chars"
                f"{'' if self.max_tokens is None else f', {self.max_tokens} tokens'})",
                retryable=False,
            )

    async def synthesize(
        self, text: str, *, voice: str | None, language: str
    ) -> AsyncIterator[bytes]:
        text = text.strip()
        self._check_text(text)
        voice_arg = self.resolve_voice(voice, language)
        if not text:
            return
        async with self._sem:
            path = self._path
            if path is None or self._closed:
                raise EngineUnavailable(f"{self.name}: engine is not running")
            proc = await asyncio.create_subprocess_exec(
                path,
                "--stdout",
                "-b", "1",  # input is UTF-8
                "-v", voice_arg,
                "-s", str(self.cfg.rate_wpm),
                "--stdin",  # read the whole text up to EOF (not line by line)
                stdin=asyncio.subprocess.PIPE,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE,
            )  # fmt: skip
            self._procs.add(proc)
            try:
                async with contextlib.aclosing(self._stream(proc, text, voice_arg)) as stream:
                    async for pcm in stream:
                        yield pcm
            finally:
                self._procs.discard(proc)
                await _reap(proc)

    async def _stream(
        self, proc: asyncio.subprocess.Process, text: str, voice: str
    ) -> AsyncGenerator[bytes, None]:
        assert proc.stdin is not None and proc.stdout is not None and proc.stderr is not None
        try:
            # The text is bounded by max_chars and espeak-ng reads it all before writing any
            # audio (--stdin), so writing it whole cannot deadlock against a full stdout pipe.
            proc.stdin.write(text.encode("utf-8"))
            await proc.stdin.drain()
            proc.stdin.close()
        except (BrokenPipeError, ConnectionResetError):
            pass  # it exited early (bad voice); its exit status and stderr say why
        decoder = StreamDecoder("wav", self.sample_rate)
        checked = False
        while data := await proc.stdout.read(READ_BYTES):
            try:
                samples = decoder.decode(data)
            except AudioFormatError as exc:
                raise EngineError(f"{self.name}: bad espeak-ng output: {exc}") from exc
            if not checked and decoder.header_complete:
                checked = True
                if decoder.sample_rate != self.sample_rate:
                    raise EngineError(
                        f"{self.name}: espeak-ng writes {decoder.sample_rate} Hz but the model "
                        f"is configured for sample_rate = {self.sample_rate}",
                        retryable=False,
                    )
            if samples.size:
                yield samples.tobytes()
        stderr = (await proc.stderr.read()).decode("utf-8", "replace").strip()
        rc = await proc.wait()
        if rc == 0:
            return
        if self._closed:
            raise EngineUnavailable(f"{self.name}: engine closed during synthesis")
        if _UNKNOWN_VOICE_MESSAGE in stderr:
            raise EngineError(f"{self.name}: unknown espeak-ng voice {voice!r}", retryable=False)
        raise EngineError(f"{self.name}: espeak-ng exited with status {rc}: {stderr[:200]}")


async def _reap(proc: asyncio.subprocess.Process) -> None:
    """Kill (if still running) and wait for the process, so neither it nor its pipes leak."""
    if proc.returncode is None:
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
    # Reading to EOF lets the pipe transports see the close and the subprocess transport shut
    # down; after a kill that is at most one pipe buffer.
    for stream in (proc.stdout, proc.stderr):
        if stream is not None:
            with contextlib.suppress(Exception):
                await stream.read()
    await proc.wait()
