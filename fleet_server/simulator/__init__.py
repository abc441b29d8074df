"""A fleet simulator: many real agents, each with its own state directory,
device class, credentials and MQTT connection, fed by configurable input
streams, with faults (offline spells, crashes during install) on demand."""
