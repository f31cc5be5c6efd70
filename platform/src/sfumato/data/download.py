"""HTTP(S) downloads for URL sources: concurrent, with timeouts, retries with exponential backoff,
a per-host request rate and a size cap. One `Downloader` lives in each ingest actor; the rate is
per actor, so the cluster-wide rate towards a host is at most workers x per_host_requests_per_s.
"""

from __future__ import annotations

import random
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from urllib.parse import urlparse

import requests

# Reject reasons.
HTTP_ERROR = "http_error"
DOWNLOAD_FAILED = "download_failed"
DOWNLOAD_TOO_LARGE = "download_too_large"

_RETRY_STATUS = {408, 425, 429, 500, 502, 503, 504}


@dataclass(frozen=True)
class Fetched:
    data: bytes | None
    reason: str | None = None
    detail: str | None = None
    attempts: int = 0


class _HostRate:
    """Spaces the requests to each host at least 1/rate seconds apart (thread-safe)."""

    def __init__(self, requests_per_s: float):
        self.interval = 1.0 / requests_per_s
        self.next_slot: dict[str, float] = {}
        self.lock = threading.Lock()

    def wait(self, host: str) -> None:
        with self.lock:
            now = time.monotonic()
            slot = max(now, self.next_slot.get(host, now))
            self.next_slot[host] = slot + self.interval
        if slot > now:
            time.sleep(slot - now)


class Downloader:
    def __init__(self, cfg, user_agent: str = "sfumato-ingest/0.1"):
        self.cfg = cfg
        self.rate = _HostRate(cfg.per_host_requests_per_s)
        self.session = requests.Session()
        adapter = requests.adapters.HTTPAdapter(pool_maxsize=cfg.threads_per_worker, max_retries=0)
        self.session.mount("http://", adapter)
        self.session.mount("https://", adapter)
        self.session.headers["User-Agent"] = user_agent
        self.pool = ThreadPoolExecutor(max_workers=cfg.threads_per_worker, thread_name_prefix="download")

    def fetch_many(self, urls: list[str]) -> list[Fetched]:
        return list(self.pool.map(self.fetch, urls))

    def fetch(self, url: str) -> Fetched:
        host = urlparse(url).netloc
        delay = self.cfg.backoff_s
        last = Fetched(None, DOWNLOAD_FAILED, "no attempt made")
        for attempt in range(1, self.cfg.max_retries + 2):
            self.rate.wait(host)
            last, retry = self._attempt(url, attempt)
            if not retry or attempt > self.cfg.max_retries:
                return last
            time.sleep(delay * (1.0 + 0.25 * random.random()))
            delay *= 2
        return last

    def _attempt(self, url: str, attempt: int) -> tuple[Fetched, bool]:
        """One GET; returns the result and whether a retry could help."""
        cap = self.cfg.max_bytes
        try:
            with self.session.get(url, stream=True, timeout=self.cfg.timeout_s, allow_redirects=True) as resp:
                if resp.status_code != 200:
                    detail = f"HTTP {resp.status_code} after {attempt} attempt(s)"
                    return Fetched(None, HTTP_ERROR, detail, attempt), resp.status_code in _RETRY_STATUS
                declared = resp.headers.get("Content-Length")
                if declared and declared.isdigit() and int(declared) > cap:
                    return Fetched(
                        None, DOWNLOAD_TOO_LARGE, f"Content-Length {declared} > max_bytes={cap}", attempt
                    ), False
                body = bytearray()
                for chunk in resp.iter_content(chunk_size=1 << 16):
                    body += chunk
                    if len(body) > cap:
                        return Fetched(None, DOWNLOAD_TOO_LARGE, f"body exceeds max_bytes={cap}", attempt), False
                return Fetched(bytes(body), attempts=attempt), False
        except (requests.Timeout, requests.ConnectionError) as exc:
            return Fetched(
                None, DOWNLOAD_FAILED, f"{type(exc).__name__} after {attempt} attempt(s): {exc}", attempt
            ), True
        except requests.RequestException as exc:
            return Fetched(None, DOWNLOAD_FAILED, f"{type(exc).__name__}: {exc}", attempt), False

    def close(self) -> None:
        self.pool.shutdown(wait=False)
        self.session.close()
