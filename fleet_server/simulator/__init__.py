"""A fleet simulator: many real agents, each with its own state directory,
device class, credentials and MQTT connection, fed by configurable input
streams, with faults (offline spells, crashes during install) on demand
(:mod:`.fleet`); and a light load simulator that keeps only what the wire needs,
so one process holds thousands of protocol-speaking devices (:mod:`.load`)."""
