"""The endpoint's Prometheus metrics, through Ray Serve's metrics API (ray.serve.metrics).

Ray exports them from every node's metrics agent (`ray_` prefixed, with Serve's application,
deployment and replica tags); serve/monitoring/ holds the Grafana dashboard and the Prometheus
alert rules built on exactly these names (a test reads each back from a live endpoint).

Ingress: every answer of POST /v1/generate by status (refusals by reason: 401/403, 408, 422,
451, 503) and its latency. Model replica: the three parts of a request's time (queue wait,
denoising, encoding), requests per denoising loop, images, the safety filter's scores and
triggers, and two statistics of every image sent that show the output distribution drifting:
mean brightness and colourfulness.
"""

from __future__ import annotations

import time

import numpy as np

SECONDS = [0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60, 120]
UNIT = [round(0.1 * k, 1) for k in range(1, 11)]
"""0.1, 0.2, ..., 1.0: brightness and safety scores."""
COLOURFULNESS = [5, 10, 15, 20, 30, 40, 50, 65, 80, 100, 130]
"""Hasler and Suesstrunk's M on 0..255 RGB: <15 nearly grey, ~33 moderately, >59 highly colourful."""


def image_stats(image: np.ndarray) -> tuple[float, float]:
    """(mean brightness in 0..1, colourfulness M) of a uint8 HWC RGB image. Brightness is the
    mean Rec. 601 luma; colourfulness is Hasler and Suesstrunk's (2003) M, the spread and mean of
    the opponent channels rg = R - G and yb = (R + G) / 2 - B."""
    rgb = image[..., :3].astype(np.float32)
    r, g, b = rgb[..., 0], rgb[..., 1], rgb[..., 2]
    brightness = float((0.299 * r + 0.587 * g + 0.114 * b).mean() / 255)
    rg, yb = r - g, (r + g) / 2 - b
    colourfulness = float(np.hypot(rg.std(), yb.std()) + 0.3 * np.hypot(rg.mean(), yb.mean()))
    return brightness, colourfulness


class IngressMetrics:
    def __init__(self):
        from ray.serve.metrics import Counter, Gauge, Histogram

        self.responses = Counter(
            "sfumato_responses",
            description="answers of POST /v1/generate by HTTP status "
            "(401/403 auth, 408 deadline, 422 invalid, 451 withheld, 503 at capacity)",
            tag_keys=("status",),
        )
        self.latency = Histogram(
            "sfumato_request_latency_s", description="POST /v1/generate latency, end to end", boundaries=SECONDS
        )
        self.in_flight = Gauge("sfumato_requests_in_flight", description="generate requests being served or queued")
        self.in_flight_now = 0

    def keep_gauges_alive(self, every_s: float = 2.0) -> None:
        """Ray's metrics agent drops a gauge not set again within two export intervals, so a gauge
        set only when a request starts or ends vanishes from /metrics a few seconds after traffic
        stops (a dashboard shows "no data", not 0). A daemon thread sets it again every `every_s`."""
        import threading

        def refresh():
            while True:
                self.in_flight.set(self.in_flight_now)
                time.sleep(every_s)

        threading.Thread(target=refresh, name="sfumato-gauges", daemon=True).start()


class ModelMetrics:
    def __init__(self):
        from ray.serve.metrics import Counter, Histogram

        self.queue_wait = Histogram(
            "sfumato_queue_wait_s", description="request arrival to its denoising loop's start", boundaries=SECONDS
        )
        self.denoise = Histogram(
            "sfumato_denoise_s", description="one denoising loop (a batch of requests)", boundaries=SECONDS
        )
        self.encode = Histogram(
            "sfumato_encode_s", description="safety check and PNG encoding of one loop's images", boundaries=SECONDS
        )
        self.batch_size = Histogram(
            "sfumato_batch_requests",
            description="requests per denoising loop",
            boundaries=[1, 2, 4, 8, 16, 32, 64, 128],
        )
        self.images = Counter("sfumato_images_generated", description="images generated")
        self.safety_score = Histogram(
            "sfumato_safety_score", description="output safety filter score per image", boundaries=UNIT
        )
        self.safety_triggers = Counter(
            "sfumato_safety_triggers", description="images the safety filter flagged", tag_keys=("action",)
        )
        self.brightness = Histogram(
            "sfumato_image_brightness", description="mean luma (0..1) per image sent", boundaries=UNIT
        )
        self.colourfulness = Histogram(
            "sfumato_image_colourfulness",
            description="Hasler-Suesstrunk colourfulness per image sent",
            boundaries=COLOURFULNESS,
        )

    def observe_image(self, image: np.ndarray) -> None:
        brightness, colourfulness = image_stats(image)
        self.brightness.observe(brightness)
        self.colourfulness.observe(colourfulness)
