from services.web.app import create
from shared.service import run_service
from shared.telemetry import setup_telemetry

setup_telemetry("web")
run_service(create)
