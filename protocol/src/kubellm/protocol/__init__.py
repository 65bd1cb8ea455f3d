"""kubellm.protocol: wire messages and typed settings models shared by all components."""
