"""The sms channel service: SMS/MMS through Twilio Programmable Messaging (channel type `twilio`)."""
