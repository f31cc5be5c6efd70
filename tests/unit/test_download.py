"""URL downloads against a real local HTTP server: retries, backoff, caps, timeouts, rate."""

import time

import pytest

from httpfixture import ImageServer
from sfumato.config import DownloadConfig
from sfumato.data.download import DOWNLOAD_FAILED, DOWNLOAD_TOO_LARGE, HTTP_ERROR, Downloader


@pytest.fixture()
def server():
    with ImageServer({"a.bin": b"A" * 1000, "big.bin": b"B" * 5000}) as srv:
        yield srv


def make(**kw):
    base = dict(timeout_s=2, max_retries=2, backoff_s=0.01, per_host_requests_per_s=1000, max_bytes=4096)
    return Downloader(DownloadConfig(**{**base, **kw}))


def test_success_and_not_found_is_not_retried(server):
    dl = make()
    ok, missing = dl.fetch_many([f"{server.url}/img/a.bin", f"{server.url}/img/nope"])
    assert ok.data == b"A" * 1000 and ok.attempts == 1
    assert missing.data is None and missing.reason == HTTP_ERROR and "404" in missing.detail
    assert len(server.hits["/img/nope"]) == 1


def test_server_errors_are_retried_then_succeed(server):
    out = make(max_retries=3).fetch(f"{server.url}/flaky/2/a.bin")
    assert out.data == b"A" * 1000 and out.attempts == 3


def test_retries_are_bounded(server):
    out = make(max_retries=1).fetch(f"{server.url}/flaky/5/a.bin")
    assert out.reason == HTTP_ERROR and "503" in out.detail
    assert len(server.hits["/flaky/5/a.bin"]) == 2


def test_size_cap_by_header_and_by_stream(server):
    dl = make()
    assert dl.fetch(f"{server.url}/img/big.bin").reason == DOWNLOAD_TOO_LARGE
    assert dl.fetch(f"{server.url}/huge/").reason == DOWNLOAD_TOO_LARGE


def test_timeout_gives_up_after_retries(server):
    start = time.monotonic()
    out = make(timeout_s=0.2, max_retries=1).fetch(f"{server.url}/slow/1.5")
    assert out.reason == DOWNLOAD_FAILED and "Timeout" in out.detail
    assert len(server.hits["/slow/1.5"]) == 2
    assert time.monotonic() - start < 2.5, "each attempt stopped at its timeout (not the 1.5 s reply)"


def test_per_host_rate_limit_spaces_requests(server):
    make(per_host_requests_per_s=20, max_bytes=10_000).fetch_many([f"{server.url}/img/a.bin"] * 6)
    times = sorted(server.hits["/img/a.bin"])
    gaps = [b - a for a, b in zip(times, times[1:])]
    assert min(gaps) >= 0.04, gaps  # 1/20 s apart, with scheduling slack
