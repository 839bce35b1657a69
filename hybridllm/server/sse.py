"""Server-sent events as OpenAI streams them: `data: {json}` blocks, ending with `data: [DONE]`."""

from __future__ import annotations

import json
from typing import Any

#: The last event of every stream.
DONE = b"data: [DONE]\n\n"
MEDIA_TYPE = "text/event-stream"
#: Headers of a stream: no caching, and no buffering by a reverse proxy (nginx).
HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


def event(payload: dict[str, Any]) -> bytes:
    """One event: `data: <compact JSON>` and a blank line."""
    return (
        b"data: "
        + json.dumps(payload, ensure_ascii=False, separators=(",", ":")).encode()
        + b"\n\n"
    )
