"""Observability for flowbatch: tracing, logging, the live view, reports.

Each part is its own module, imported only by those who use it, so that
``import flowbatch`` (and ``import flowbatch.observe``) pulls in none of
their dependencies:

- :mod:`flowbatch.observe.tracing`: OpenTelemetry spans per item, stage call
  and batch (needs the ``observe`` extra);
- :mod:`flowbatch.observe.logs`: ``logging`` set-up, text or JSON lines;
- :mod:`flowbatch.observe.top`: ``flowbatch top URL``, a live terminal view
  read from a ``/metrics`` endpoint;
- :mod:`flowbatch.observe.bench`: ``flowbatch bench``, a load run with a
  bottleneck report and an HTML page of charts;
- :mod:`flowbatch.observe.dashboard`: the live ``/dashboard`` page for the
  HTTP service (needs Starlette).
"""

__all__: list[str] = []
