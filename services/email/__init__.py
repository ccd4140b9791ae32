"""The e-mail channel service."""
