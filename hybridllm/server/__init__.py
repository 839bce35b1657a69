"""`hybridllm serve`: an OpenAI-compatible HTTP server over the engine (hybridllm/engine.py).

app.py holds the routes and the bridge from the engine thread to the event loop, schemas.py
the request and response shapes, sse.py the event-stream framing.
"""
