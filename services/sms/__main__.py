"""`python -m services.sms`."""

from services.sms.app import create
from shared.service import run_service
from shared.telemetry import setup_telemetry

setup_telemetry("sms")
run_service(create)
