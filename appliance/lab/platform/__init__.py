"""The reference platform (lab only): what the demo and the tests run against.

It follows PROTOCOL.md to the letter; see ``docs/openapi.yaml`` for the
decisions where PROTOCOL.md is silent. Never imported by daemon code.

- :class:`Platform` (``admin.py``): one data directory; codes, jobs, results,
  signatures, faults, the request log.
- :class:`PlatformServer`, :class:`PlatformThread`, :class:`PlatformProcess`
  (``server.py``): the HTTPS server in the current loop, in a thread, or as a process.
- ``python -m appliance.lab.platform``: the admin command line.
"""

from appliance.lab.platform.admin import Platform
from appliance.lab.platform.errors import LabPlatformError
from appliance.lab.platform.secrets import decrypt_auth_record
from appliance.lab.platform.server import (
    PlatformProcess,
    PlatformServer,
    PlatformThread,
    client_ssl_context,
)

__all__ = [
    "LabPlatformError",
    "Platform",
    "PlatformProcess",
    "PlatformServer",
    "PlatformThread",
    "client_ssl_context",
    "decrypt_auth_record",
]
