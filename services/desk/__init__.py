"""The `desk` service: agents, teams, presence, routing queues, assignments and the agent UI."""
