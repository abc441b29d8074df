"""The local inference endpoint of ``edgefleet-agent run``.

Applications on the device ask the running agent for predictions instead of
loading the model themselves (and fighting the daemon for ``update.lock``):

* any language: the Open Inference Protocol (KServe v2 / Triton HTTP, with the
  binary tensor extension) over the Unix socket ``<state_dir>/serving.sock``
  (mode 0660), or over TCP on 127.0.0.1 with a bearer token when
  ``[serving] tcp_port`` is set; Triton's ``tritonclient`` works unchanged;
* Python: :class:`device_agent.serving.client.ServingClient`, whose
  ``predict()`` mirrors ``Agent.predict()``.

Every request runs through ``Agent.predict()``, so telemetry, drift, samples and
probation counts are the same whichever way an app calls.

Modules: :mod:`.protocol` (the wire format as pure functions), :mod:`.server`
(HTTP over the sockets), :mod:`.client` (the Python client).
"""

from __future__ import annotations

from .protocol import ServingError
from .server import ServingEndpoint, ServingStartError

__all__ = ["ServingEndpoint", "ServingError", "ServingStartError"]
