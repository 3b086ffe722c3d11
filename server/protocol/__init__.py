"""The contract every endpoint shares, with no sockets and no billing in it: the error catalogue
(one refusal table: code -> HTTP status, close code, retryable, Retry-After) and the admission
ports (who is asking, what decides whether they may). docs/protocol.md is the prose of it."""
