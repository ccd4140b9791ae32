"""`python -m services.telegram`."""

from services.telegram.app import create
from shared.service import run_service
from shared.telemetry import setup_telemetry

setup_telemetry("telegram")
run_service(create)
