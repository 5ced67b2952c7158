"""Serving a trained model over HTTP with Ray Serve behind a FastAPI ingress.

    imaging.py        upload checks and decoding; PNG label maps, overlays, RLE JSON (no Ray, no torch)
    batching.py       batching by pixel budget, padding, restoring each image's size (torch)
    committee.py      the students' teachers: disagreement and where to click next
    serve_metrics.py  Prometheus metrics through Ray's exporter
    app.py            the deployment, its HTTP routes, and the application builder `build_app`
    label_studio.py   Label Studio's ML backend routes on the same app
    predict_folder.py `seminar predict`: a folder or s3:// prefix, batched, resumable
    cli.py            `seminar serve MODEL`, `seminar predict`
    index.html        the page at `/`
    serve_config.yaml `serve run` / `serve deploy` config
"""
