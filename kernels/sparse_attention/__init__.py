"""Sparse attention: reference.py (definition), chunked.py (CPU), triton_fwd/bwd.py + op.py (GPU).

Nothing is imported here, so that importing the package never pulls in Triton.
"""
