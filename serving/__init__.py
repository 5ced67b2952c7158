"""Serving a trained model over HTTP with Ray Serve behind a FastAPI ingress.

    imaging.py      upload checks and decoding; PNG label maps, overlays, RLE JSON (no Ray, no torch)
    batching.py     batching by pixel budget, padding, restoring each image's size (torch)
    model_uri.py    checkpoint path / s3:// URI / registry name -> a checkpoint to load
    metrics.py      Prometheus metrics through Ray's exporter
    app.py          the deployment, its HTTP routes, and the application builder `build_app`
    cli.py          `seminar serve MODEL`
    index.html      the page at `/`
    serve_config.yaml   `serve run` / `serve deploy` config
"""
