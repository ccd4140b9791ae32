"""The WhatsApp Cloud API channel: signed webhooks in, Graph API sends out."""
