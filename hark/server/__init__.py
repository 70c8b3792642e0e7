"""`hark serve`: the OpenAI-compatible HTTP server (chat, completions, audio transcriptions)."""
