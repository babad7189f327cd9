"""Triton kernels. Importing this package imports triton; set TRITON_INTERPRET=1 first
to run them on CPU (the tests do)."""
