"""A translation server: the REST API and a page that shows where each word looked.

``python -m transformer.serve --checkpoint CKPT`` (or ``transformer-serve``) loads the
checkpoint once and serves it on FastAPI + uvicorn (``pip install -e ".[serve]"``):

* ``app`` — the web application: ``/translate`` (LibreTranslate's shape), ``/attention``,
  ``/info``, ``/health``, the page at ``/``, errors as ``{"error": ...}``;
* ``schemas`` — the API's request and answer shapes, and what a refusal says;
* ``service`` — what is loaded once (the model, the limits), and each request's path
  from text to translations;
* ``batcher`` — requests that arrive together are decoded together, by threads that
  own the model;
* ``__main__`` — the command;
* ``static/`` — the page, its script and style (no build step, nothing from a CDN).

docs/serving.md describes the endpoints, the limits, the batching and the page.
Nothing here is imported by ``import transformer``; this package needs fastapi only
when ``app`` is imported.
"""
