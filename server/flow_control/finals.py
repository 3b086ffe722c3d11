"""How long a session that stopped taking input still waits for the transcripts it owes."""

from __future__ import annotations

from typing import Final

# After the input ended (the client's `close`, a drain), finals still owed are waited for this
# long (wall time); then they are abandoned and the session settles and closes without them.
# A composite session (telephony) waits this long plus a margin for its ASR meter to settle.
FINALS_TIMEOUT_S: Final = 10.0
