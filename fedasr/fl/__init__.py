"""The federated engines: the round protocol, the embedded runner and the Flower engine."""
