"""The fleet CA: certificates for device, server and broker TLS."""
