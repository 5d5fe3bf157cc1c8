"""Serving many requests from one loaded model: ``moerun serve``.

- batching.py — continuous batching: requests decoded together in the rows of the static KV cache
- sampling.py — each sequence's next token under its own sampling settings
- text_stream.py — incremental detokenisation and stop strings
- protocol.py — the OpenAI API's request bodies and error body
- app.py — the HTTP API (FastAPI) over the engine
- command.py — the ``moerun serve`` command (uvicorn)

Only app.py and command.py's ``run`` need the optional ``serve`` extra (FastAPI, uvicorn).
"""
