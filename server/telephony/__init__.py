"""Phone calls over provider media streams (Twilio, Exotel, Plivo, Telnyx).

- `server.telephony.providers`: the provider codecs, sans-I/O: each provider's JSON dialect <->
  provider-neutral events and commands (`events.py`), and `detect_provider` / `codec_for`.
- `server.telephony.call`: the call: the endpoint that accepts a provider socket, the session
  that runs it (ASR in, the agent's `Conversation`, TTS out through `Playback`), the agents and
  the call's meters.
"""
