# Compiled hot-path modules, when built and matching their source (server/native.py).
__import__("server.native").native.install()
