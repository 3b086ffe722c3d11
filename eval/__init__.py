"""Evaluations run from a checkout (`make eval-vision`): development tooling, not the server.

Like loadtest/, nothing under server/ imports this package and the wheel does not ship it
(tests/unit/test_eval_outside_the_server.py)."""
