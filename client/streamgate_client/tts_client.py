"""`streamgate tts "text" --out file.wav`: stream text to /v1/tts/stream, write the audio.

Example code for users: the text goes in pieces as an LLM would send it, audio comes back in
frames, and the client grants credit for what it has "played" (here: written to the file).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import wave
from pathlib import Path

from websockets.exceptions import InvalidStatus

from streamgate_client.asr_client import API_KEY_ENV, dev_key
from streamgate_client.streams import StreamClosed, TtsStream
from streamgate_protocol import messages as m

DEFAULT_URL = "ws://127.0.0.1:8765/v1/tts/stream"


async def synthesize(url: str, text: str, *, key: str | None, sample_rate: int,
                     model: str | None, voice: str | None, piece_chars: int = 12
                     ) -> tuple[bytes, list[m.TtsServerMessage | dict[str, object]]]:
    """PCM16 audio for `text` and every message the server sent (typed), through the SDK's
    `TtsStream`: the text goes in pieces as an LLM streams it, audio taken is credited back."""
    audio = bytearray()
    messages: list[m.TtsServerMessage | dict[str, object]] = []
    async with await TtsStream.connect(url, key=key, sample_rate=sample_rate, model=model,
                                       voice=voice) as tts:
        for i in range(0, len(text), piece_chars):  # token by token, as an LLM streams
            await tts.send_text(text[i:i + piece_chars])
        await tts.close()
        async for item in tts:
            if isinstance(item, bytes):
                audio += item
                continue
            messages.append(item)
            if isinstance(item, (m.Error, m.Warning)):
                print(f"{type(item).__name__.lower()}: {item.code}: {item.message}",
                      file=sys.stderr)
        if tts.close_code not in (1000, None):
            raise RuntimeError(f"server closed {tts.close_code}")
    return bytes(audio), messages


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("text", help="text to speak")
    parser.add_argument("--out", type=Path, required=True, help="WAV file to write")
    parser.add_argument("--url", default=DEFAULT_URL,
                        help=f"TTS endpoint (default {DEFAULT_URL})")
    parser.add_argument("--key", help=f"API key, sent as a Bearer token (default: ${API_KEY_ENV}, "
                        "or for a local server the dev key in .streamgate/dev-api-key)")
    parser.add_argument("--model", help="TTS model (default: tts.session.default_model, "
                        "espeak-en)")
    parser.add_argument("--voice", help="voice of the model (default: the model's voice for "
                        "the session's language)")
    parser.add_argument("--sample-rate", type=int, default=16000,
                        help="sample rate of the WAV written, in Hz (default 16000)")


def main(args: argparse.Namespace) -> int:
    key = args.key or os.environ.get(API_KEY_ENV) or dev_key(args.url)
    try:
        audio, messages = asyncio.run(synthesize(
            args.url, args.text, key=key, sample_rate=args.sample_rate, model=args.model,
            voice=args.voice))
    except InvalidStatus as exc:
        body = exc.response.body.decode(errors="replace") if exc.response.body else ""
        print(f"streamgate tts: rejected: HTTP {exc.response.status_code} {body}",
              file=sys.stderr)
        return 3
    except (OSError, RuntimeError, StreamClosed) as exc:
        print(f"streamgate tts: {exc}", file=sys.stderr)
        return 4
    with wave.open(str(args.out), "wb") as wav:
        wav.setnchannels(1)
        wav.setsampwidth(2)
        wav.setframerate(args.sample_rate)
        wav.writeframes(audio)
    summary = next((msg for msg in messages if isinstance(msg, m.TtsSummary)), None)
    chars = summary.characters if summary is not None else "?"
    cost = summary.cost_micros if summary is not None else "?"
    print(f"wrote {args.out}: {len(audio) * 1000 // (2 * args.sample_rate)} ms of audio, "
          f"{chars} characters, cost {cost} micros")
    return 0
