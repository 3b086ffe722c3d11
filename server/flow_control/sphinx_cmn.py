"""The bound on pocketsphinx's per-session cepstral means (server/models/pocketsphinx_engine.py).

Each ASR session's utterances start from the mean its previous utterance ended with (the
speaker's channel), never from another session's. Sessions do not tell the engine when they
end, so the means are kept for the most recent sessions only: an evicted session's next
utterance starts from the model's initial mean, as a new session's first one does."""

from __future__ import annotations

from collections import OrderedDict
from typing import Final

# ~13 comma-separated numbers each (~100 bytes): 10,000 sessions hold about 2 MB.
MAX_SESSION_MEANS: Final = 10_000


class SessionMeans:
    """session_id -> the cepstral mean its last utterance ended with (least recent evicted)."""

    __slots__ = ("_means", "capacity")

    def __init__(self, capacity: int = MAX_SESSION_MEANS) -> None:
        self.capacity = capacity
        self._means: OrderedDict[str, str] = OrderedDict()

    def __len__(self) -> int:
        return len(self._means)

    def get(self, session_id: str) -> str:
        """The session's mean, or "" (a new session: the model's own)."""
        mean = self._means.get(session_id)
        if mean is None:
            return ""
        self._means.move_to_end(session_id)
        return mean

    def put(self, session_id: str, mean: str) -> None:
        self._means[session_id] = mean
        self._means.move_to_end(session_id)
        while len(self._means) > self.capacity:
            self._means.popitem(last=False)
