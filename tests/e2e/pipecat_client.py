"""Pipecat pipelines pointed at streamgate: the client half of tests/e2e/test_pipecat_services.py.

Runs under the Pipecat virtualenv (.venv-pipecat, made by scripts/setup.sh from
tests/e2e/pipecat-requirements.txt), never the server's: Pipecat pins soxr and soundfile
versions of its own (docs/decisions/14G1-pipecat-client-venv.md). It imports nothing from this
repository. Each pipeline is Pipecat's own test harness (`pipecat.tests.utils.run_test`: a frame
source, the service, a frame sink, run by a PipelineWorker) around an unmodified service whose
only changes from the hosted API are `base_url` and the key. What came out is printed as one
JSON object on the last line of stdout.

    python pipecat_client.py tts [--service openai|deepgram] --base-url URL --api-key KEY \
        --text "..." --out speech.pcm
    python pipecat_client.py stt [--service deepgram|openai] --base-url URL --api-key KEY \
        --audio turn1.pcm [--mute-s 8.5 --audio turn2.pcm] --sample-rate 16000

URL: http://HOST:HTTP_PORT/v1 for the OpenAI services, ws://HOST:WS_PORT for Deepgram's.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from pipecat.frames.frames import (
    ErrorFrame,
    Frame,
    InputAudioRawFrame,
    InterimTranscriptionFrame,
    TranscriptionFrame,
    TTSAudioRawFrame,
    TTSSpeakFrame,
    VADUserStartedSpeakingFrame,
    VADUserStoppedSpeakingFrame,
)
from pipecat.pipeline.worker import PipelineParams
from pipecat.services.deepgram.stt import DeepgramSTTService
from pipecat.services.deepgram.tts import DeepgramTTSService
from pipecat.services.openai.stt import OpenAISTTService
from pipecat.services.openai.tts import OpenAITTSService
from pipecat.services.stt_service import STTService
from pipecat.services.tts_service import TTSService
from pipecat.tests.utils import SleepFrame, run_test

CHUNK_MS = 40  # audio frames as a transport would deliver them, paced at real time
# After the speech the microphone keeps sending (silence), as every Pipecat transport does, for
# long enough that the last final arrives before the EndFrame. Sleeping instead would be a
# silent client, which the server (like Deepgram after 10 s) closes with NET-0001.
TAIL_MS = 2000


def errors_of(frames: Sequence[Frame]) -> list[str]:
    return [f.error for f in frames if isinstance(f, ErrorFrame)]


async def speak(args: argparse.Namespace) -> tuple[dict[str, Any], bytes]:
    # Pipecat's own defaults (gpt-4o-mini-tts and alloy; aura-2-helena-en) unless named.
    tts: TTSService
    if args.service == "deepgram":
        voice = DeepgramTTSService.Settings(voice=args.model) if args.model else None
        tts = DeepgramTTSService(api_key=args.api_key, base_url=args.base_url, settings=voice)
    else:
        settings = OpenAITTSService.Settings(model=args.model) if args.model else None
        tts = OpenAITTSService(api_key=args.api_key, base_url=args.base_url, settings=settings)
    down, up = await run_test(tts, frames_to_send=[TTSSpeakFrame(text=args.text)],
                              start_timeout=10.0)
    audio = [f for f in down if isinstance(f, TTSAudioRawFrame)]
    return {
        "audio_frames": len(audio),
        "audio_bytes": sum(len(f.audio) for f in audio),
        "sample_rates": sorted({f.sample_rate for f in audio}),
        "channels": sorted({f.num_channels for f in audio}),
        "frame_types": [type(f).__name__ for f in down if not isinstance(f, TTSAudioRawFrame)],
        "errors": errors_of(down) + errors_of(up),
    }, b"".join(f.audio for f in audio)


def paced(pcm: bytes, rate: int) -> list[Frame]:
    """Audio frames as a transport delivers them: CHUNK_MS each, at real time."""
    step = rate * 2 * CHUNK_MS // 1000
    frames: list[Frame] = []
    for at in range(0, len(pcm), step):
        frames.append(InputAudioRawFrame(audio=pcm[at:at + step], sample_rate=rate,
                                         num_channels=1))
        frames.append(SleepFrame(sleep=CHUNK_MS / 1000))
    return frames


async def listen(args: argparse.Namespace, turns: list[bytes]) -> dict[str, Any]:
    rate: int = args.sample_rate
    stt: STTService
    if args.service == "openai":
        # Segmented: the audio between the VAD's start and stop, posted as one WAV file.
        settings = OpenAISTTService.Settings(model=args.model) if args.model else None
        stt = OpenAISTTService(api_key=args.api_key, base_url=args.base_url,
                               sample_rate=rate, settings=settings)
    else:
        stt = DeepgramSTTService(api_key=args.api_key, base_url=args.base_url,
                                 sample_rate=rate)
    frames: list[Frame] = []
    for i, speech in enumerate(turns):
        if i and args.mute_s:
            # A muted microphone: no audio at all, only Pipecat's KeepAlive on the socket.
            frames.append(SleepFrame(sleep=args.mute_s))
        # Each turn framed by the user-speaking events of a transport's VAD; the stop makes
        # DeepgramSTTService send Finalize.
        frames.append(VADUserStartedSpeakingFrame())
        frames.extend(paced(speech, rate))
        frames.append(VADUserStoppedSpeakingFrame())
    frames.extend(paced(bytes(rate * 2 * TAIL_MS // 1000), rate))
    down, up = await run_test(stt, frames_to_send=frames, start_timeout=10.0,
                              pipeline_params=PipelineParams(audio_in_sample_rate=rate))
    finals = [f for f in down if isinstance(f, TranscriptionFrame)]
    return {
        "finals": [f.text for f in finals],
        "from_finalize": [bool(getattr(f.result, "from_finalize", False)) for f in finals],
        "interims": [f.text for f in down if isinstance(f, InterimTranscriptionFrame)],
        "audio_bytes_sent": sum(len(t) for t in turns) + rate * 2 * TAIL_MS // 1000,
        "errors": errors_of(down) + errors_of(up),
    }


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    sub = parser.add_subparsers(dest="pipeline", required=True)
    tts = sub.add_parser("tts", help="a TTS service: a TTSSpeakFrame in, audio frames out")
    tts.add_argument("--service", choices=("openai", "deepgram"), default="openai",
                     help="OpenAITTSService (.../v1) or DeepgramTTSService (ws://HOST:PORT)")
    tts.add_argument("--base-url", required=True)
    tts.add_argument("--api-key", required=True)
    tts.add_argument("--model", help="a model (Deepgram: voice) to send; default: Pipecat's")
    tts.add_argument("--text", required=True)
    tts.add_argument("--out", required=True, help="where the audio frames' PCM is written")
    stt = sub.add_parser("stt", help="an STT service: raw PCM16 in at real time, "
                                     "transcripts out")
    stt.add_argument("--service", choices=("deepgram", "openai"), default="deepgram",
                     help="DeepgramSTTService (ws://HOST:PORT) or OpenAISTTService (.../v1)")
    stt.add_argument("--model", help="a model name to send; default: Pipecat's")
    stt.add_argument("--base-url", required=True)
    stt.add_argument("--api-key", required=True)
    stt.add_argument("--audio", required=True, action="append",
                     help="one turn of raw 16-bit little-endian mono PCM; repeat for more")
    stt.add_argument("--mute-s", type=float, default=0.0,
                     help="no audio at all for this long between turns")
    stt.add_argument("--sample-rate", type=int, default=16000)
    args = parser.parse_args(argv)
    if args.pipeline == "tts":
        result, audio = asyncio.run(speak(args))
        Path(args.out).write_bytes(audio)
    else:
        result = asyncio.run(listen(args, [Path(p).read_bytes() for p in args.audio]))
    print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
