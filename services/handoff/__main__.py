from services.handoff.app import create
from shared.service import run_service
from shared.telemetry import setup_telemetry

setup_telemetry("handoff")
run_service(create)
