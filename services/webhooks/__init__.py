"""The `webhooks` service: signed, retried, per-conversation-ordered delivery of business webhooks."""
