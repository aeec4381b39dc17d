"""sdvae.kernels: the Triton kernels, one file per op (installed from the top-level
``kernels/`` folder as ``sdvae.kernels``).

Each op file holds the private ``@triton.jit`` kernels, a host launcher that checks its
arguments, and the eager ``<op>_reference`` that tests and benchmarks compare against.
"""

__all__: list[str] = []
