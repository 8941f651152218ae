"""
chatterd as a .tac file: ``twistd -ny chatterd.tac``.

Takes the same settings as ``twistd chatterd``, from the environment:

- ``CHATTERD_LISTEN``, ``CHATTERD_OLLAMA``: values separated by spaces
  (``--listen``, ``--ollama``, repeated)
- ``CHATTERD_CERTS``, ``CHATTERD_DATABASE``, ``CHATTERD_DATA_DIR``,
  ``CHATTERD_HEARTBEAT``, ``CHATTERD_MAX_BODY``, ``CHATTERD_METRICS``,
  ``CHATTERD_LOG_FORMAT``
- ``CHATTERD_ARGS``: any other options, as on the command line
"""

import os

from twisted.application import service
from twisted.logger import ILogObserver

from chatterd.logs import json_observer
from chatterd.tap import Options, makeService, options_from_environment

options = Options()
options.parseOptions(options_from_environment(os.environ))
application = service.Application("chatterd")
if options["log-format"] == "json":
    application.setComponent(ILogObserver, json_observer())
makeService(options).setServiceParent(application)
