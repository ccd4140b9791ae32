from services.notifications.app import create
from shared.service import run_service
from shared.telemetry import setup_telemetry

setup_telemetry("notifications")
run_service(create)
