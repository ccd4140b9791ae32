from services.app.app import create
from shared.service import run_service
from shared.telemetry import setup_telemetry

setup_telemetry("app")
run_service(create)
