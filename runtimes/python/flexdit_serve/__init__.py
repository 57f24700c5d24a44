"""flexdit-serve: a bundle behind an HTTP API on Ray Serve, with stage-aware continuous batching.

``scheduler`` (no Ray needed) keeps every in-flight image's sampler state and packs rows of
images that sit in the same stage into shared engine calls; ``app`` is the Ray Serve
deployment; ``cli`` the ``flexdit-serve`` command. Install with ``pip install ".[serve]"``.
"""
