"""Peers: operators users would otherwise pick, behind the project's call signature.

Each adapter takes the same arguments as ``kernels.reference`` and
``kernels.ops`` (``groups`` and ``offset_groups`` explicit) and checks that
they agree with what the peer infers from the tensor shapes.
"""
