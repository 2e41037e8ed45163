"""Is the Hugging Face Hub usable? Answered in seconds, before any compute.

Without network, `datasets` retries the Hub for ~20 s before failing, so the
pre-flight check decides up front: `HF_HUB_OFFLINE` (or `HF_DATASETS_OFFLINE`)
set, or no HTTP answer from the Hub endpoint within a few seconds, means
offline.
"""

from __future__ import annotations

import os
import threading
import urllib.error
import urllib.request

PROBE_TIMEOUT_S = 3.0
_TRUE = ("1", "on", "yes", "true")

# The probe is answered once per process and endpoint: a run checks several
# things against the Hub, and a second 3 s wait would buy nothing.
_probe_cache: dict[str, str | None] = {}

LOCAL_HOWTO = (
    "To run without the Hub, use local files: set data.path to local C4 .json.gz shards (e.g. "
    "c4-train.00000-of-01024.json.gz) and data.tokenizer to a local tokenizer.json (or a directory holding "
    "one); or tokenise once with `python scripts/pretokenize.py --input SHARDS --tokenizer TOKENIZER.json "
    "--out DIR` and use data.source: shards with data.path: DIR; or use data.source: embedded or synthetic, "
    "which need no files.")


def endpoint() -> str:
    """The Hub endpoint URL (`HF_ENDPOINT`, default https://huggingface.co)."""
    return os.environ.get("HF_ENDPOINT", "https://huggingface.co").rstrip("/")


def _probe(url: str) -> str | None:
    result: list[str | None] = []

    def request() -> None:
        try:
            urllib.request.urlopen(urllib.request.Request(url, method="HEAD"), timeout=PROBE_TIMEOUT_S).close()
            result.append(None)
        except urllib.error.HTTPError:
            result.append(None)  # the server answered, so the Hub is reachable
        except Exception as exc:  # URLError, timeouts, TLS failures behind an intercepting firewall...
            result.append(f"{url} is unreachable ({exc.__class__.__name__}: {exc})")

    # A HEAD request (through any configured proxy) rather than a bare TCP connect:
    # some sandboxes accept every connection but speak no TLS. The timeout does not
    # cover name resolution, which can hang without a DNS server; a daemon thread
    # bounds the whole probe.
    thread = threading.Thread(target=request, daemon=True)
    thread.start()
    thread.join(PROBE_TIMEOUT_S + 0.5)
    return result[0] if result else f"{url} did not answer within {PROBE_TIMEOUT_S:.0f} s"


def offline_reason() -> str | None:
    """Why the Hub cannot be used now, or None when it is reachable."""
    for var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"):
        if os.environ.get(var, "").strip().lower() in _TRUE:
            return f"{var}={os.environ[var]} is set"
    url = endpoint()
    if url not in _probe_cache:
        _probe_cache[url] = _probe(url)
    return _probe_cache[url]
