"""What the session machines raise on a bug in their caller.

Its own module, left interpreted: mypyc compiles the machines (docs/native.md) but cannot
compile a subclass of a built-in exception, and both machines raise this one.
"""

from __future__ import annotations

__all__ = ["IllegalTransition"]


class IllegalTransition(RuntimeError):
    """A command or move the machine's transition table does not allow (a bug in the caller,
    never a client's doing; as h11's LocalProtocolError)."""
