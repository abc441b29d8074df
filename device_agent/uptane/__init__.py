"""The device side of the Uptane pattern on TUF metadata (python-tuf's ngclient).

Two repositories, each a full TUF repository with its own root:

* the **image repository**: its ``targets`` role, signed offline by release keys under a
  threshold, lists every released bundle with its hash, length and custom fields
  ``{"edgefleet": {"name", "version", "release_counter", "device_classes"}}``;
* the **director repository**: its online keys sign, per device, which released bundle each
  model must run: targets with ``{"edgefleet": {"device_id", "device_class", "name",
  "role"}}`` and a short expiry.

A device acts on a director instruction only if the image repository lists the same target
with the same hash and length, the binding (device id, class, model name) holds and the
release counter is not below the device's floor for that model name
(:func:`~device_agent.uptane.decide.decide`). :class:`~device_agent.uptane.client.UptaneClient`
refreshes both with ngclient (root rotation, rollback, freeze, fast-forward and
mix-and-match checks are TUF's) and reports ``stale_metadata`` when it cannot get fresh
metadata for ``stale_after_seconds``. :class:`~device_agent.uptane.fetcher.UptaneFetcher`
plugs it into the updater as its :class:`~device_agent.update.fetch.Fetcher`.
"""
