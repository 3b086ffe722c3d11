"""A phone call: endpoint (accepts the provider socket), session (ASR in, agent, TTS out),
conversation (turns and the agent), playback (TTS paced by the provider's marks), agents, meters."""
