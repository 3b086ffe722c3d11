"""`streamgate serve --workers N`: a supervisor process and N worker processes on one node.

The supervisor reserves both ports for a fresh deployment id (server/ws/port_guard.py), makes
what every worker must share once (admin token, embedded stores, migrations, dev key, one
configuration), starts the workers, restarts the ones that die and drains them all on SIGTERM.
It serves no traffic itself. docs/deploy.md "One node, N workers"; docs/decisions/13A1-workers.md.
"""
