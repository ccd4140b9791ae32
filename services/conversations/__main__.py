from services.conversations.app import create
from shared.service import run_service
from shared.telemetry import setup_telemetry

setup_telemetry("conversations")
run_service(create)
