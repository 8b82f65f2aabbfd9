"""``clipret serve``: an HTTP search service over the public API.

* :mod:`~clipret.serve.settings`: what the command line sets (limits, the token, where to bind);
* :mod:`~clipret.serve.service`: the model and galleries, loaded once; a list of queries -> answers;
* :mod:`~clipret.serve.batcher`: the micro-batcher (requests gathered for at most ``max_wait_ms``,
  up to ``max_batch``, one forward pass in a worker thread);
* :mod:`~clipret.serve.query`: one validated query, and :class:`~clipret.serve.query.RequestError`;
* :mod:`~clipret.serve.inputs`: request bodies -> validated queries (uploads, base64, vectors, ids, text);
* :mod:`~clipret.serve.guards`: the body-size limit, the bearer token and the request metrics (ASGI);
* :mod:`~clipret.serve.thumbs`: gallery thumbnails, only for ids in the manifest, only under its root;
* :mod:`~clipret.serve.metrics`: the Prometheus metrics, one registry per app;
* :mod:`~clipret.serve.page`: the web page at ``/``;
* :mod:`~clipret.serve.schemas`: the request and response shapes ``/docs`` shows;
* :mod:`~clipret.serve.routes`: the endpoints;
* :mod:`~clipret.serve.app`: :func:`~clipret.serve.app.create_app`, the FastAPI app.

FastAPI, uvicorn, python-multipart and prometheus-client come with ``pip install clipret[serve]``.
Nothing is imported here, so ``import clipret`` never loads them.
"""
