"""Readable PyTorch oracles of every op in ``spiral_rt.ops`` (one module per op stem).

They run on any device, favour clarity over speed and are the ground truth of the tests; the
``reference`` backend of each op calls them. Backends never import each other or these, except
through the op layer.
"""
