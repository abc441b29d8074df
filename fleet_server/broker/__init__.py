"""The MQTT broker: Mosquitto or the embedded broker started beside the server, and the
notifications the server sends to devices through it."""
