"""Real chat templates of released models, for tests that need one (tool calling through a real template).

They are not committed to rtp-mm. llama.cpp keeps the templates of released models, as published with their
tokenizers, under ``models/templates/``, and the llama-cpp-python source distribution on PyPI vendors them: the kit
fetches that sdist once from the package registry, checks its sha256 and caches the templates it extracts in
``$RTP_MM_CACHE_DIR/test-data`` (``~/.cache/rtp_mm/test-data``). Without the registry and without the cache, a test
that needs a template fails loudly.
"""

from __future__ import annotations

import hashlib
import os
import re
import tarfile
import urllib.request
from pathlib import Path

SDIST = "llama_cpp_python-0.3.36.tar.gz"
SDIST_SHA256 = "832db0699007f1be95a7e41ef12e88926b02ba836461e36a36372db2760c1a2e"
INDEX = "https://pypi.org/simple/llama-cpp-python/"
TEMPLATES = "llama_cpp_python-0.3.36/vendor/llama.cpp/models/templates/"
QWEN2_5 = "Qwen-Qwen2.5-7B-Instruct.jinja"  # the Qwen 2 architecture (MODEL_TYPE qwen_2), with its tools section
LLAMA3_1 = "meta-llama-Llama-3.1-8B-Instruct.jinja"


def _cache_dir() -> Path:
    base = os.environ.get("RTP_MM_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "rtp_mm"
    )
    return Path(base) / "test-data" / "chat-templates"


def chat_template(name: str) -> str:
    """The template file ``name`` of llama.cpp's ``models/templates/`` (e.g. ``QWEN2_5``)."""
    cached = _cache_dir() / name
    if not cached.exists():
        _extract(_download(), cached.parent)
    return cached.read_text()


def _download() -> bytes:
    index = urllib.request.urlopen(urllib.request.Request(INDEX, headers={"Accept": "text/html"}), timeout=60).read()
    match = re.search(rf'href="([^"]*/{re.escape(SDIST)})(#[^"]*)?"', index.decode())
    assert match, f"{SDIST} is not listed at {INDEX}"
    data = urllib.request.urlopen(match.group(1), timeout=300).read()
    assert hashlib.sha256(data).hexdigest() == SDIST_SHA256, f"{SDIST} does not match its sha256"
    return data


def _extract(sdist: bytes, folder: Path) -> None:
    import io

    folder.mkdir(parents=True, exist_ok=True)
    with tarfile.open(fileobj=io.BytesIO(sdist), mode="r:gz") as tar:
        for member in tar.getmembers():
            if member.isfile() and member.name.startswith(TEMPLATES) and member.name.endswith(".jinja"):
                data = tar.extractfile(member).read()  # type: ignore[union-attr]
                (folder / member.name[len(TEMPLATES) :]).write_bytes(data)
