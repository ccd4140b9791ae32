"""`python -m services.webhooks`."""

from services.webhooks.app import create
from shared.service import run_service
from shared.telemetry import setup_telemetry

setup_telemetry("webhooks")
run_service(create)
