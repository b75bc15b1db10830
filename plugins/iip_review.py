"""Airflow plugin: drift review of a `conversational_synthesis` run, as a "Review" tab on every DAG run.

- `GET /iip-review/runs/{dag}/{run}`: the review page. A sample of the run's evolved instructions, each beside its
  seed with its strategy and round; the reviewer's own marks; unmarked items first; the live figures (error rate
  per strategy and round with 95% intervals, agreement, the gate), computed by the same code as the report's.
- `POST /iip-review/runs/{dag}/{run}/marks` with JSON {"item", "mark", "comment"}: saves one mark at once.
- `GET /iip-review/runs/{dag}/{run}/summary.json`: the figures as JSON.

Reading needs DAG-run read access, marking needs DAG-run edit access (Airflow's auth manager: `requires_access_dag`
with PUT on the run entity, as Airflow's own routes that change a run). The reviewer is the authenticated user,
never a name from the request. Paths stay inside the data root. The first editor to open a run's review draws its
sample (`review_sample` and `drift_gate` from the run's conf, else their defaults); a reader who comes first sees
that no review has started.
"""

from __future__ import annotations

import html
import sys
from pathlib import Path
from typing import Any

from airflow.api_fastapi.auth.managers.models.resource_details import DagAccessEntity, DagDetails
from airflow.api_fastapi.core_api.security import GetUserDep, requires_access_dag
from airflow.plugins_manager import AirflowPlugin
from fastapi import Body, Depends, FastAPI, HTTPException, Request
from fastapi.responses import HTMLResponse, JSONResponse

if str(Path(__file__).resolve().parent) not in sys.path:  # the sibling plugin module, however this one was loaded
    sys.path.insert(0, str(Path(__file__).resolve().parent))
from iip_reports import index_entry, inside

from operators.orchestration.settings import data_root, safe_name
from operators.report.render import CSS, drift_review_html, e
from operators.review import marks as review_marks
from operators.review import sample as review_sample
from operators.review.stats import DEFAULT_GATE, summarize

LABELS = {"faithful": "Faithful", "drifted": "Drifted", "factual_error": "Factual error", "unsafe": "Unsafe",
          "skip": "Skip"}
PAGE_CSS = CSS + """
main{padding:0 24px 40px}.item{border:1px solid var(--line);border-radius:8px;padding:10px 14px;margin:12px 0}
.item[data-mark=''] {border-left:4px solid var(--accent)}.item .cols{display:flex;gap:12px;flex-wrap:wrap}
.item .cols>div{flex:1 1 380px}.m{margin:6px 6px 0 0;padding:4px 10px;border:1px solid var(--line);border-radius:6px;
background:#fff;cursor:pointer}.m[aria-pressed='true']{background:var(--accent);color:#fff;border-color:var(--accent)}
.m:disabled{cursor:not-allowed;opacity:.6}.comment{width:60%;margin-top:6px;padding:4px}.status{margin-left:8px;
color:var(--muted);font-size:12px}.progress{font-size:16px;font-weight:600}
"""
SCRIPT = """
const base = location.pathname.replace(/\\/$/, '');
async function save(card, mark) {
  const status = card.querySelector('.status');
  status.textContent = 'saving…';
  let r;
  try {
    r = await fetch(base + '/marks', {method: 'POST', credentials: 'same-origin',
      headers: {'Content-Type': 'application/json'},
      body: JSON.stringify({item: card.dataset.id, mark: mark, comment: card.querySelector('.comment').value})});
  } catch (err) { status.textContent = 'not saved: ' + err; return; }
  if (!r.ok) { status.textContent = 'not saved: ' + r.status + ' ' + (await r.text()).slice(0, 200); return; }
  const d = await r.json();
  card.dataset.mark = mark;
  card.querySelectorAll('button.m').forEach(b => b.setAttribute('aria-pressed', String(b.dataset.mark === mark)));
  status.textContent = 'saved';
  document.getElementById('progress').textContent = d.progress;
  document.getElementById('figures').innerHTML = d.figures_html;
}
document.querySelectorAll('.item').forEach(card => {
  card.querySelectorAll('button.m').forEach(b => b.addEventListener('click', () => save(card, b.dataset.mark)));
  card.querySelector('.comment').addEventListener('change', () => {
    if (card.dataset.mark) save(card, card.dataset.mark);
  });
});
"""


def run_conf(dag_id: str, run_id: str) -> dict[str, Any] | None:
    """The run's conf from Airflow's DB (None when the run or the DB is not there)."""
    try:
        from airflow.models.dagrun import DagRun
        from airflow.utils.session import create_session
        from sqlalchemy import select

        with create_session() as session:
            conf = session.execute(select(DagRun.conf).where(DagRun.dag_id == dag_id,
                                                             DagRun.run_id == run_id)).scalar_one_or_none()
        return dict(conf) if isinstance(conf, dict) else ({} if conf is None else None)
    except Exception:  # the page must work without a reachable DB (the defaults then apply)
        return None


def run_root(root: str, dag_id: str, run_id: str, conf: dict[str, Any] | None) -> str:
    """The run's folder: the one its report indexed, else `runs/<run_name or run id>` as the DAG names it."""
    entry = index_entry(root, dag_id, run_id)
    if entry and entry.get("folder"):
        return inside(root, str(entry["folder"]))
    name = (conf or {}).get("run_name") or run_id
    return inside(root, "runs", safe_name(str(name)))


def can_edit(dag_id: str, user: Any) -> bool:
    """Whether `user` may edit this DAG's runs (what marking needs), by Airflow's auth manager."""
    from airflow.api_fastapi.app import get_auth_manager

    try:
        from airflow.models.dag import DagModel

        team = DagModel.get_team_name(dag_id)
    except Exception:
        team = None
    return bool(get_auth_manager().is_authorized_dag(method="PUT", access_entity=DagAccessEntity.RUN,
                                                     details=DagDetails(id=dag_id, team_name=team), user=user))


def _settings(conf: dict[str, Any] | None) -> tuple[int, int, float]:
    sample = (conf or {}).get("review_sample") or {}
    try:
        size = int(sample.get("size", review_sample.DEFAULT_SIZE))
        seed = int(sample.get("seed", 0))
        gate = float((conf or {}).get("drift_gate", DEFAULT_GATE))
    except (TypeError, ValueError, AttributeError):
        raise HTTPException(status_code=400, detail="the run's review_sample or drift_gate is malformed") from None
    if not (1 <= size <= review_sample.MAX_SIZE and 0.0 <= gate <= 1.0):
        raise HTTPException(status_code=400, detail="review_sample.size or drift_gate out of range")
    return size, seed, gate


def progress_text(sample: dict[str, Any], mine: dict[str, Any]) -> str:
    """"37 / 100 marked" for one reviewer."""
    ids = {i["id"] for i in sample["items"]}
    return f"{sum(1 for i in mine if i in ids)} / {len(ids)} marked"


def _card(n: int, item: dict[str, Any], mark: dict[str, Any] | None, editable: bool) -> str:
    current = (mark or {}).get("mark", "")
    seed = f"<div class='label'>seed</div><div class='turn human'>{e(item['seed']) or '<i>(not found)</i>'}</div>"
    if item.get("parent"):
        seed += f"<div class='label'>previous round</div><div class='turn human'>{e(item['parent'])}</div>"
    buttons = "".join(
        f"<button type='button' class='m' data-mark='{k}' aria-pressed='{str(k == current).lower()}'"
        f"{'' if editable else ' disabled'}>{v}</button>" for k, v in LABELS.items())
    return (f"<article class='item' id='item-{e(item['id'])}' data-id='{e(item['id'])}' data-mark='{e(current)}'>"
            f"<div class='meta'>#{n} · strategy <b>{e(item['strategy'])}</b> · round {e(item['round'])} · "
            f"{e(item['step'])}</div><div class='cols'><div>{seed}</div><div><div class='label'>evolved</div>"
            f"<div class='turn gpt'>{e(item['evolved']) or '<i>(empty)</i>'}</div></div></div>{buttons}"
            f"<br><input class='comment' maxlength='{review_marks.MAX_COMMENT}' placeholder='comment (optional)' "
            f"value='{e((mark or {}).get('comment', ''))}'{'' if editable else ' disabled'}>"
            f"<span class='status'></span></article>")


def render_page(dag_id: str, run_id: str, sample: dict[str, Any], mine: dict[str, Any], summary: dict[str, Any],
                reviewer: str, editable: bool) -> str:
    """The review page: progress, live figures, unmarked items first, then the ones this reviewer marked."""
    numbered = list(enumerate(sample["items"], 1))
    todo = [_card(n, it, None, editable) for n, it in numbered if it["id"] not in mine]
    done = [_card(n, it, mine[it["id"]], editable) for n, it in numbered if it["id"] in mine]
    who = (f"You review as <b>{e(reviewer)}</b>; each mark is saved as you make it." if editable else
           "<b>Read only</b>: you may read this run's review, but marking needs permission to edit the DAG's runs.")
    body = (f"<header><h1>Drift review: {e(dag_id)} / {e(run_id)}</h1><div class='meta'>{len(sample['items'])} "
            f"evolved instructions from {e(', '.join(sample.get('steps', [])))}, stratified by strategy and round "
            f"(seed {e(sample.get('seed'))}); gate {100 * float(sample.get('gate', DEFAULT_GATE)):g}%. {who}</div>"
            f"<p class='progress' id='progress'>{e(progress_text(sample, mine))}</p></header><main>"
            f"<h2>Figures (live)</h2><div id='figures'>{drift_review_html(summary)}</div>"
            f"<h2>To mark ({len(todo)})</h2><section id='todo'>{''.join(todo) or '<p>All marked. Thank you.</p>'}"
            f"</section><details id='done'><summary>Already marked by you ({len(done)})</summary>{''.join(done)}"
            f"</details></main><script>{SCRIPT}</script>")
    return (f"<!doctype html><html lang='en'><head><meta charset='utf-8'><title>Drift review</title>"
            f"<style>{PAGE_CSS}</style></head><body>{body}</body></html>")


def _message(title: str, text: str) -> HTMLResponse:
    return HTMLResponse(f"<!doctype html><html lang='en'><head><meta charset='utf-8'><title>{html.escape(title)}"
                        f"</title><style>{PAGE_CSS}</style></head><body><header><h1>{html.escape(title)}</h1></header>"
                        f"<main><p>{text}</p></main></body></html>")


ReadRuns = Depends(requires_access_dag("GET", DagAccessEntity.RUN))
EditRuns = Depends(requires_access_dag("PUT", DagAccessEntity.RUN))


def create_app() -> FastAPI:
    """The FastAPI app Airflow mounts under /iip-review."""
    app = FastAPI(title="IIP drift review")

    def context(dag_id: str, run_id: str) -> tuple[str, dict[str, Any] | None]:
        conf = run_conf(dag_id, run_id)
        return run_root(data_root(), dag_id, run_id, conf), conf

    @app.get("/runs/{dag_id}/{run_id}", response_class=HTMLResponse, dependencies=[ReadRuns])
    def page(dag_id: str, run_id: str, user: GetUserDep) -> HTMLResponse:
        folder, conf = context(dag_id, run_id)
        editable = can_edit(dag_id, user)
        sample = review_sample.read_sample(folder)
        if sample is None and editable:
            sample = review_sample.load_or_create(folder, *_settings(conf))
        if sample is None or not sample["items"]:
            return _message("No drift review yet", "No review has started for this run" + (
                "" if editable else " (an editor's first visit draws its sample)") + ", or it has no committed "
                "<code>evolve</code> step to review yet: the Review tab is for <code>conversational_synthesis</code> "
                "runs, after their evolve steps.")
        reviewer = user.get_name()
        mine = review_marks.read_marks(folder, reviewer)["marks"] if editable else {}
        summary = summarize(sample, review_marks.all_marks(folder))
        return HTMLResponse(render_page(dag_id, run_id, sample, mine, summary, reviewer, editable))

    @app.get("/runs/{dag_id}/{run_id}/summary.json", dependencies=[ReadRuns])
    def summary_json(dag_id: str, run_id: str) -> JSONResponse:
        folder, _ = context(dag_id, run_id)
        sample = review_sample.read_sample(folder)
        if sample is None:
            raise HTTPException(status_code=404, detail="no review has started for this run")
        return JSONResponse(summarize(sample, review_marks.all_marks(folder)))

    @app.post("/runs/{dag_id}/{run_id}/marks", dependencies=[EditRuns])
    def mark(dag_id: str, run_id: str, request: Request, user: GetUserDep,
             body: dict[str, Any] = Body(...)) -> JSONResponse:  # noqa: B008 (FastAPI's way to declare a body)
        # JSON only: a cross-site HTML form cannot send it without a CORS preflight, which this app never grants.
        if not request.headers.get("content-type", "").startswith("application/json"):
            raise HTTPException(status_code=415, detail="send the mark as application/json")
        item, value, comment = body.get("item"), body.get("mark"), body.get("comment", "")
        if not isinstance(item, str) or not isinstance(value, str) or not isinstance(comment, str):
            raise HTTPException(status_code=422, detail="item, mark and comment must be strings")
        folder, _ = context(dag_id, run_id)
        sample = review_sample.read_sample(folder)
        if sample is None:
            raise HTTPException(status_code=404, detail="no review has started for this run")
        try:
            doc = review_marks.set_mark(folder, sample, user.get_name(), item, value, comment)
        except review_marks.MarkError as err:
            raise HTTPException(status_code=422, detail=str(err)) from None
        summary = summarize(sample, review_marks.all_marks(folder))
        return JSONResponse({"saved": doc["marks"][item], "revision": doc["revision"],
                             "progress": progress_text(sample, doc["marks"]),
                             "figures_html": drift_review_html(summary)})

    return app


class IIPReviewPlugin(AirflowPlugin):
    """Registers the review app and a "Review" tab on every DAG run."""

    name = "iip_review"
    fastapi_apps = [{"app": create_app(), "url_prefix": "/iip-review", "name": "IIP drift review"}]  # noqa: RUF012
    external_views = [  # noqa: RUF012
        {"name": "Review", "href": "/iip-review/runs/{DAG_ID}/{RUN_ID}", "destination": "dag_run",
         "url_route": "review"},
    ]


__all__ = ["IIPReviewPlugin", "can_edit", "create_app", "progress_text", "render_page", "run_conf", "run_root"]
