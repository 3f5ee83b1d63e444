"""fedasr on Flower's Deployment Engine (flwr 1.41: SuperLink + SuperNodes; never Ray).

The Flower engine runs the same round as the embedded one
(:func:`fedasr.fl.round.run_round`): the ServerApp is fedasr's :class:`~fedasr.fl.runner.Runner`
given a :class:`~fedasr.fl.flower.transport.FlowerTransport`, the ClientApp hands each
message to a :class:`~fedasr.fl.client.ClientWorker` — in a warm worker process of the
SuperNode (:mod:`fedasr.fl.flower.node`) when the SuperNode is fedasr's. Messages carry fedasr's own encoded
payloads (weights with masks, method instructions, reports) as raw bytes, so what is
counted in ``bytes_down``/``bytes_up`` is what crosses the network, the same as embedded.
"""
