"""On-device identification: what a device needs to identify without the network.

The image tower, the decision graph, the preprocessing spec (``artifacts``, served
under ``/v1/models``) and the graph builder (``decision_graph``); ``onnx`` is
imported only when a graph is built.
"""
