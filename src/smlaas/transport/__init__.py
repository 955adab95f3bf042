"""Transport: framing of messages on streams (TLS contexts come with the serving layer)."""
