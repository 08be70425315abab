"""Kernels for Attamba's two hot ops, one folder each.

Every op folder holds ``api.py`` (the one public function, with ``implementation=``),
``reference.py`` (plain jax.numpy, the ground truth), ``xla.py`` (the fast XLA path)
and, where written, the Pallas GPU and TPU kernels. Tests hold every implementation
to the reference, forward and gradient.
"""
