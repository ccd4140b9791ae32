"""The `notifications` service: away notifications, per-channel reply windows, opt-ins."""
