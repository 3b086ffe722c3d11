"""streamgate's wire contract (docs/protocol.md): one msgspec Struct per message, the reused
encoder and decoders, and the audio encodings of the wire. Shared by the server and the client
SDK; it depends on neither."""
