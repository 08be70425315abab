"""The bottom layer: Attamba's ops and their kernels. It imports jax and NumPy only, nothing of the model above it.

  chunk_grid.py        the chunk grid, written once (offset, boundaries, chunks, capacity)
  visibility.py        which keys a query sees (boundary part + window part)
  dispatch.py          how an op picks its implementation (each says whether it runs a call)
  common.py            helpers every kernel uses (matmuls, launch parameters, boundary gather)
  poison.py            kernel launches whose outputs start as NaN (tests, device checks)
  masked_attention.py  softmax attention under an explicit mask: the attention ops' ground truth
  ssd/                 the chunk-reset SSD scan
  ssm_step/            one decode step of the stacked SSMs (conv, scan update, readout, gated norm)
  boundary_window_attention/   Attamba's attention: boundary keys before the window + the window
  causal_attention/    causal / sliding-window attention (the transformer baseline)

Every op folder holds ``api.py`` (the one public function, ``implementation=``), ``reference.py``
(plain jax.numpy, the ground truth) where the op has kernels, ``xla.py`` (the fast XLA path),
``pallas_gpu.py`` / ``pallas_tpu.py`` (the Pallas kernels) and ``block_sizes.py`` (their tiles);
``ssm_step/`` is inference only (no gradient) and its reference is also its XLA path.
Tests hold every implementation to the reference, forward and gradient. The kernels are
single-device programs; running them under a multi-device mesh is their caller's job.
"""
