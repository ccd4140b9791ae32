"""The handoff service: link codes (single-use, expiring), deep links per channel, QR codes, redemption."""
