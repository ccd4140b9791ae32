"""`python -m services.whatsapp`."""

from services.whatsapp.app import create
from shared.service import run_service
from shared.telemetry import setup_telemetry

setup_telemetry("whatsapp")
run_service(create)
