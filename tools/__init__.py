"""Development tooling, outside the library's import path: ``bark_kernels`` never imports anything from here.

- ``triton_interpreter``: makes Triton's CPU interpreter run our kernels right (exact bfloat16, loop bounds on
  triton <= 3.6 with NumPy >= 2.4); applied by tests/conftest.py, scripts that run kernels under the interpreter and
  ``bark-kernels check --interpret`` from a checkout.
- ``aot_check``: compiles every Triton kernel variant ahead of time for a GPU architecture, without a GPU (private
  Triton APIs): ``TRITON_INTERPRET=0 python -m tools.aot_check [--quick] [--arch 90]``.

Run from the repository root (``python -m tools.<name>``; pytest puts the root on ``sys.path``).
"""
