"""
chatterd: the back end of the EECS Reactive llmChat apps.

Modules, from the wire inwards (``docs/architecture.md`` tells the whole story):

Assembly and processes

- ``chatterd.tap``: command line (``Options``) and service assembly (``makeService``).
- ``chatterd.workers``: ``--workers N``: the parent that binds the listeners and supervises.
- ``chatterd.worker``: one worker process (``python -m chatterd.worker``).
- ``chatterd.twistedcompat``: every private Twisted name chatterd uses, and why.

The edge

- ``chatterd.tls``: the certificate (generated if missing) and the TLS listeners.
- ``chatterd.eager``: TCP transports that send from ``write``; ports that adopt inherited sockets.
- ``chatterd.clients``: fair shares per client address (connections, streams).
- ``chatterd.site``: the HTTP/1.1 server below the routes: limits, access log, retiring.
- ``chatterd.http2``: HTTP/2 with the same limits and defences against its floods.

The application

- ``chatterd.web``: Klein routes, JSON errors, ``/healthz`` and ``/readyz``.
- ``chatterd.api``: request bodies, parsed and validated (pure).
- ``chatterd.streams``: admission, per-appID turns and the drain at shutdown.
- ``chatterd.relay``: ``/llmchat`` and ``/llmprompt`` streams, and how each ended (``Ending``).
- ``chatterd.writing``: batching writes, pacing ``/getchatts``, cutting a response short.
- ``chatterd.sse``: SSE framing and NDJSON splitting (pure).
- ``chatterd.ollama``: the Ollama client over treq.
- ``chatterd.balancer``: several Ollama servers: who takes a request, failover.

Storage

- ``chatterd.store``: ``IChattStore`` and its PostgreSQL implementation (turns, history).
- ``chatterd.pool``: txpostgres connections: bounded connecting, the pool, lost connections.
- ``chatterd.pgembed``: the private, embedded PostgreSQL server.
- ``chatterd.testing``: ``MemoryChattStore``, the in-memory store for tests.

Operations

- ``chatterd.logs``: log lines that cannot be forged; JSON output.
- ``chatterd.metrics``: Prometheus metrics (one page for all workers).
"""

__version__ = "0.1.0"
