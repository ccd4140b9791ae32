"""The Facebook Messenger channel: signed Page webhooks in, Send API out, the 24 h window enforced."""
