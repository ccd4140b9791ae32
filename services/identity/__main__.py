from services.identity.app import create
from shared.service import run_service

run_service(create)
