"""
chatterd as a .tac file: ``twistd -ny chatterd.tac``.

Takes the same settings as ``twistd chatterd``, from the environment:

- ``CHATTERD_LISTEN``: endpoint descriptions separated by spaces (``--listen``, repeated)
- ``CHATTERD_CERTS``, ``CHATTERD_OLLAMA``, ``CHATTERD_DATABASE``,
  ``CHATTERD_DATA_DIR``, ``CHATTERD_HEARTBEAT``, ``CHATTERD_MAX_BODY``
- ``CHATTERD_ARGS``: any other options, as on the command line
"""

import os

from twisted.application import service

from chatterd.tap import Options, makeService, options_from_environment

options = Options()
options.parseOptions(options_from_environment(os.environ))
application = service.Application("chatterd")
makeService(options).setServiceParent(application)
