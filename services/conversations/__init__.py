"""The conversations service: apps, keys, integrations, conversations, messages, delivery routing."""
