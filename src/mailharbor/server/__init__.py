"""asyncio adapters: listeners, TLS, timeouts (no protocol logic lives here; see DESIGN.md)."""
