from services.desk.app import create
from shared.service import run_service
from shared.telemetry import setup_telemetry

setup_telemetry("desk")
run_service(create)
