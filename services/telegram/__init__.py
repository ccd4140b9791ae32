"""The telegram channel service: Bot API webhooks in, sendMessage/sendPhoto out."""
