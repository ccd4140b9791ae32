"""The `web` service: the web messenger's SDK API, its WebSocket, and the widget it serves."""
