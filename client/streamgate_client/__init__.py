"""The streamgate client SDK: streaming speech-to-text (asr_client), streaming text-to-speech
(tts_client) and a phone-call simulator (call_sim), on the wire contract of
`streamgate_protocol` only. Installable on its own: `pip install ./client`."""
