"""The feedback web app (FastAPI): pages for annotators and an admin, and a JSON API behind them.

Every ``/api`` endpoint needs ``Authorization: Bearer <token>`` (401 without a valid one); admin
endpoints answer 403 to annotators, and an annotator can read only their own answers (403 for
another's). Pages and their scripts are static files served from ``static/`` (no CDN); they fill
themselves from the API and put model text into the page only as text (``textContent``), never as
HTML, and a Content-Security-Policy allows scripts from this server only.

API:

=======================================  ==============================================================
``GET  /api/me``                         ``{name, is_admin, progress}``
``GET  /api/next``                       ``{item, progress}``: the annotator's current item (the same
                                         one until answered), or ``{item: null}`` when nothing is left
``POST /api/answers``                    ``{item_id, answer}`` → 201 ``{answer_id, progress}`` once the
                                         answer is committed; 404 unknown item, 409 replayed or not
                                         assigned, 422 wrong kind or malformed
``GET  /api/answers``                    the annotator's own answers
``GET  /api/annotators/{name}/answers``  the same for ``name``: themselves, or an admin
``GET  /api/admin/report``               counts, agreement statistics, the sampler's status
``GET  /api/admin/export/{kind}``        ``pairwise`` / ``ranked`` / ``binary`` rows as JSON Lines,
                                         ``agreement`` as JSON
=======================================  ==============================================================
"""
from __future__ import annotations

import json
import pathlib
from collections.abc import Callable
from typing import Any

from fastapi import Body, Depends, FastAPI, HTTPException, Request
from fastapi.responses import FileResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles

from rlhf_jax.feedback import export
from rlhf_jax.feedback.store import Annotator, Answer, FeedbackError, Store

STATIC = pathlib.Path(__file__).parent / "static"
SECURITY_HEADERS = {
    "Content-Security-Policy": "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
                               "object-src 'none'; base-uri 'none'; frame-ancestors 'none'; form-action 'self'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "X-Frame-Options": "DENY",
    "Cache-Control": "no-store",
}


def _answer_json(a: Answer) -> dict[str, Any]:
    return {"id": a.id, "item": a.item.public(), "answer": a.payload, "created": a.created}


def create_app(store: Store, *, status: Callable[[], dict[str, Any]] | None = None) -> FastAPI:
    """The app over ``store``; ``status`` (e.g. ``PolicySampler.status``) is shown on the admin report."""
    app = FastAPI(title="rlhf_jax feedback", docs_url=None, redoc_url=None, openapi_url=None)

    @app.middleware("http")
    async def security_headers(request: Request, call_next):
        response = await call_next(request)
        for key, value in SECURITY_HEADERS.items():
            response.headers.setdefault(key, value)
        return response

    @app.exception_handler(FeedbackError)
    async def feedback_error(request: Request, exc: FeedbackError):
        return JSONResponse(status_code=exc.status, content={"detail": exc.message})

    def annotator(request: Request) -> Annotator:
        header = request.headers.get("authorization")
        if not header:
            raise HTTPException(401, "missing token: send the header Authorization: Bearer <token>",
                                headers={"WWW-Authenticate": "Bearer"})
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise HTTPException(401, "malformed Authorization header: expected Bearer <token>",
                                headers={"WWW-Authenticate": "Bearer"})
        who = store.authenticate(token.strip())
        if who is None:
            raise HTTPException(401, "invalid token", headers={"WWW-Authenticate": "Bearer"})
        return who

    def admin(who: Annotator = Depends(annotator)) -> Annotator:
        if not who.is_admin:
            raise HTTPException(403, f"{who.name} is not an admin")
        return who

    # pages (static, no data in them; the API fills them)
    for route, page in (("/", "index.html"), ("/annotate", "annotate.html"), ("/admin", "admin.html")):
        app.add_api_route(route, (lambda page=page: FileResponse(STATIC / page)), methods=["GET"],
                          include_in_schema=False)
    app.mount("/static", StaticFiles(directory=STATIC), name="static")

    @app.get("/api/me")
    def me(who: Annotator = Depends(annotator)):
        return {"name": who.name, "is_admin": who.is_admin, "progress": store.progress(who)}

    @app.get("/api/next")
    def next_item(who: Annotator = Depends(annotator)):
        item = store.next_item(who)
        return {"item": None if item is None else item.public(), "progress": store.progress(who)}

    @app.post("/api/answers", status_code=201)
    def answer(body: Any = Body(...), who: Annotator = Depends(annotator)):
        if not isinstance(body, dict) or set(body) != {"item_id", "answer"}:
            raise FeedbackError(422, "body: expected a JSON object {\"item_id\": <int>, \"answer\": {...}}, got "
                                + (f"the fields {sorted(body)}" if isinstance(body, dict) else type(body).__name__))
        answer_id = store.submit(who, body["item_id"], body["answer"])
        return {"answer_id": answer_id, "progress": store.progress(who)}

    @app.get("/api/answers")
    def my_answers(who: Annotator = Depends(annotator)):
        return {"annotator": who.name, "answers": [_answer_json(a) for a in store.answers(who)]}

    @app.get("/api/annotators/{name}/answers")
    def answers_of(name: str, who: Annotator = Depends(annotator)):
        if name != who.name and not who.is_admin:
            raise HTTPException(403, f"{who.name} cannot read {name}'s answers")
        other = store.annotator(name)
        if other is None:
            raise HTTPException(404, f"no annotator named {name!r}")
        return {"annotator": other.name, "answers": [_answer_json(a) for a in store.answers(other)]}

    @app.get("/api/admin/report")
    def admin_report(who: Annotator = Depends(admin)):
        out = export.report(store)
        out["annotators"] = [{"name": a.name, "is_admin": a.is_admin, **store.progress(a)} for a in store.annotators()]
        out["sampler"] = status() if status is not None else None
        return out

    @app.get("/api/admin/export/{kind}")
    def admin_export(kind: str, who: Annotator = Depends(admin)):
        if kind == "agreement":
            return Response(json.dumps(export.report(store), indent=2), media_type="application/json",
                            headers={"Content-Disposition": 'attachment; filename="agreement.json"'})
        if kind not in export.FILES:
            raise HTTPException(404, f"no export {kind!r}: one of {', '.join([*export.FILES, 'agreement'])}")
        rows = export.rows(store.answers())[kind]
        body = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
        return Response(body, media_type="application/x-ndjson",
                        headers={"Content-Disposition": f'attachment; filename="{export.FILES[kind]}"'})

    return app
