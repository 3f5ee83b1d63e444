"""The federated engines: messages.py (what crosses the wire), server.py (Server and the
server optimisers), client.py (ClientWorker, local training), round.py (run_round: one
loop for every engine), runner.py (a run's lifecycle) and flower/ (the Flower transport,
apps and SuperNode)."""
