"""
chatterd: the back end of the EECS Reactive llmChat apps.

Layers, from the wire inwards:

- ``chatterd.tap``: command line (``Options``) and service assembly (``makeService``).
- ``chatterd.tls``: the certificate (generated if missing) and the TLS listener.
- ``chatterd.web``: Klein routes, request parsing, JSON errors, access log.
- ``chatterd.relay``: ``/llmchat``'s stream: Ollama NDJSON in, SSE frames out.
- ``chatterd.sse``: pure functions that frame SSE and split NDJSON.
- ``chatterd.ollama``: the streaming Ollama client over treq.
- ``chatterd.store``: ``IChattStore`` and its PostgreSQL implementation.
- ``chatterd.pgembed``: the private, embedded PostgreSQL server.
"""

__version__ = "0.1.0"
