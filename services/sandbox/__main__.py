"""`python -m services.sandbox`."""

from services.sandbox.app import create
from shared.service import run_service
from shared.telemetry import setup_telemetry

setup_telemetry("sandbox")
run_service(create)
