"""`python -m services.email`."""

from services.email.app import create
from shared.service import run_service
from shared.telemetry import setup_telemetry

setup_telemetry("email")
run_service(create)
