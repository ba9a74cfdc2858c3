"""ASGI app for capture.py's Upgrade: h2c scenario (served by hypercorn)."""


async def app(scope, receive, send):
    if scope["type"] != "http":
        return
    await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"text/plain")]})
    await send({"type": "http.response.body", "body": b"upgraded\n"})
