"""The endpoint's Prometheus metrics, exported through Ray's metrics agent.

Ray prefixes every name with `ray_` on its exporter (the head node's metrics export
port, e.g. `ray start --metrics-export-port`); counters get `_total`:

    ray_seminar_serve_requests_total{route, status, model_version}
    ray_seminar_serve_request_seconds_bucket{route, model_version, le}    latency
    ray_seminar_serve_image_megapixels_bucket{model_version, le}          uploaded image sizes
    ray_seminar_serve_batch_images_bucket{model_version, le}              images per forward
    ray_seminar_serve_batch_megapixels_bucket{model_version, le}          padded pixels per forward
    ray_seminar_serve_model_info{model_version, which}                    1 per serving replica

Serve's own metrics (`ray_serve_*`: queue lengths, replica counts, proxy status codes
including the 503s of an overloaded deployment) come from the same exporter.
"""

from __future__ import annotations

from ray.util import metrics

LATENCY_BOUNDARIES_S = [0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30]
MEGAPIXEL_BOUNDARIES = [0.01, 0.05, 0.1, 0.25, 0.5, 1, 2, 4, 8, 16]
BATCH_IMAGE_BOUNDARIES = [1, 2, 4, 8, 16, 32, 64]


class ServingMetrics:
    """Created once per replica; every series carries the served model's version."""

    def __init__(self, model_version: str, which: str):
        self.tags = {"model_version": model_version}
        self.requests = metrics.Counter(
            "seminar_serve_requests", "HTTP requests answered by the segmentation endpoint.",
            tag_keys=("route", "status", "model_version"))
        self.latency = metrics.Histogram(
            "seminar_serve_request_seconds", "Time from request received to answer ready.",
            boundaries=LATENCY_BOUNDARIES_S, tag_keys=("route", "model_version"))
        self.megapixels = metrics.Histogram(
            "seminar_serve_image_megapixels", "Size of the uploaded images (before resizing).",
            boundaries=MEGAPIXEL_BOUNDARIES, tag_keys=("model_version",))
        self.batch_images = metrics.Histogram(
            "seminar_serve_batch_images", "Images in one batched forward.",
            boundaries=BATCH_IMAGE_BOUNDARIES, tag_keys=("model_version",))
        self.batch_megapixels = metrics.Histogram(
            "seminar_serve_batch_megapixels", "Pixels (after resize and padding) in one batched forward.",
            boundaries=MEGAPIXEL_BOUNDARIES, tag_keys=("model_version",))
        self.model_info = metrics.Gauge(
            "seminar_serve_model_info", "The model this replica serves (value 1).",
            tag_keys=("model_version", "which"))
        self.model_info.set(1, tags={**self.tags, "which": which})

    def request(self, route: str, status: int, seconds: float) -> None:
        self.requests.inc(tags={**self.tags, "route": route, "status": str(status)})
        self.latency.observe(seconds, tags={**self.tags, "route": route})

    def image(self, width: int, height: int) -> None:
        self.megapixels.observe(width * height / 1e6, tags=self.tags)

    def batch(self, images: int, padded_pixels: int) -> None:
        self.batch_images.observe(images, tags=self.tags)
        self.batch_megapixels.observe(padded_pixels / 1e6, tags=self.tags)
