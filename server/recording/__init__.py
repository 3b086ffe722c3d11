"""Session recording (record=true; docs/recording.md): a session's inbound audio and every
message in both directions, with timing, written through a `RecordingStore` port so that replay
(`streamgate replay`) can play it against any server."""
