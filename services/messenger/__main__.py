"""`python -m services.messenger`."""

from services.messenger.app import create
from shared.service import run_service
from shared.telemetry import setup_telemetry

setup_telemetry("messenger")
run_service(create)
