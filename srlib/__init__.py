"""srlib: SparseRM, a reward model read through a sparse autoencoder, and what it is compared with.

One module per step of the method, data flowing one way:
data → backbone → activations → sae → directions → reward → (baselines, alignment, evaluate).
"""

__version__ = "0.1.0"
