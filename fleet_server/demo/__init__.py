"""``edgefleet demo``: the whole product on one machine, and the bundle round-trip."""
