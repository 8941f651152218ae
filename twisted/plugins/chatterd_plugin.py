# -*- test-case-name: tests.test_tap -*-
"""
The ``twistd chatterd`` plugin.  It imports nothing heavy: ``chatterd.tap`` is
loaded only when the subcommand runs.  (No ``__init__.py`` may sit in
``twisted/`` or ``twisted/plugins/``.)
"""

from twisted.application.service import ServiceMaker

chatterd = ServiceMaker(
    "chatterd",
    "chatterd.tap",
    "EECS Reactive chatterd: chatts in PostgreSQL and Ollama's chat as Server-Sent Events.",
    "chatterd",
)
