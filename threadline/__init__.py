"""The `threadline` command: runs the whole system locally (embedded NATS, every service, front door)."""
