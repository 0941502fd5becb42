"""The HTTP adapter: one aiohttp sub-application per API dialect, each with its own error table."""
