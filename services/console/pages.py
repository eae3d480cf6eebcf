"""The console's pages as HTML text: pure functions of the store's rows (no I/O), server-rendered.

No script anywhere: forms post with a CSRF field, charts are inline SVG (`charts.py`), the style
sheet is served from the package. Every value from a record goes through `html.escape`.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from html import escape
from typing import Any
from urllib.parse import quote, urlencode

from services.context import missed

from . import charts
from .store import FILTERS, Page

HOUR_MS = 3_600_000
EXCLUSION_REASONS = {  # the context service's reason codes, said for a person
    missed.IN_BATCH: "already in this batch",
    missed.OWN_ID: "the bot's own message (own id)",
    missed.IN_EARLIER_BATCH: "in an earlier batch",
    missed.NO_TIME: "no time given",
    missed.BEFORE_CUTOFF: "before the cutoff (already known to the bot)",
    missed.NOT_BEFORE_BATCH: "not before this batch",
    missed.OWN_OPERATOR: "sent by the bot's operator account",
    missed.OWN_TEXT: "the bot's own message (same text)",
    missed.DUPLICATE: "duplicate (seen by webhook and history)",
    missed.EMPTY: "empty",
    missed.UNSUPPORTED: "unsupported message type",
    missed.DROPPED_OLDEST: "dropped: over the limit of injected items (oldest first)",
}


@dataclass(frozen=True)
class Viewer:
    """Who is looking, the CSRF token their forms carry, the tenants the filter offers and the one
    chosen ('' = every tenant the operator may see)."""

    user: str
    csrf: str
    tenants: tuple[str, ...] = ()
    tenant: str = ""

    def url(self, path: str, **params: Any) -> str:
        """`path` with the chosen tenant (and `params`) kept in its query."""
        query = {**({"tenant": self.tenant} if self.tenant else {}), **params}
        return f"{path}?{urlencode(query, doseq=True)}" if query else path


def when(at_ms: int | None) -> str:
    if not at_ms:
        return "-"
    return datetime.fromtimestamp(at_ms / 1000, UTC).strftime("%Y-%m-%d %H:%M:%S")


def ago(at_ms: int | None, now_ms: int) -> str:
    if not at_ms:
        return "-"
    seconds = max(0, (now_ms - at_ms) // 1000)
    if seconds < 120:
        return f"{seconds} s"
    if seconds < 7200:
        return f"{seconds // 60} min"
    if seconds < 172800:
        return f"{seconds // 3600} h"
    return f"{seconds // 86400} d"


def customer_url(key: str) -> str:
    return f"/customers/{quote(key, safe='')}"


def _csrf(viewer: Viewer) -> str:
    return f'<input type="hidden" name="csrf" value="{escape(viewer.csrf)}">'


PAGES = (("overview", "/", "Overview"), ("customers", "/customers", "Customers"),
         ("waiting", "/waiting", "Held &amp; paused"), ("dead", "/dead-letters", "Dead letters"))


def tenant_filter(viewer: Viewer, action: str) -> str:
    """The tenant filter: a GET form to `action`; shown only when there is more than one tenant to
    choose from (a single-tenant deployment looks as before)."""
    if len(viewer.tenants) < 2 and not viewer.tenant:
        return ""
    options = "".join(
        f'<option value="{escape(t)}"{" selected" if t == viewer.tenant else ""}>{escape(label)}</option>'
        for t, label in (("", "all tenants"), *((t, t) for t in viewer.tenants))
    )
    return (f'<form method="get" action="{action}" class="tenant"><label>Tenant '
            f'<select name="tenant" data-testid="tenant">{options}</select></label>'
            '<button type="submit">Show</button></form>')


def layout(title: str, body: str, viewer: Viewer | None, active: str = "") -> str:
    nav = ""
    if viewer is not None:
        links = "".join(
            f'<a href="{escape(viewer.url(href))}"{" class=on" if name == active else ""}>{label}</a>'
            for name, href, label in PAGES
        )
        links += tenant_filter(viewer, next((href for name, href, _ in PAGES if name == active), "/"))
        nav = (f'<nav>{links}<form method="post" action="/logout" class="who">{_csrf(viewer)}'
               f'<span>{escape(viewer.user)}</span><button type="submit" class="link">Log out</button>'
               "</form></nav>")
    return (
        '<!doctype html><html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>{escape(title)} · watistream console</title>"
        '<link rel="icon" href="data:,"><link rel="stylesheet" href="/static/console.css"></head><body>'
        f'<header><span class="brand">watistream console</span>{nav}</header>'
        f"<main><h1>{escape(title)}</h1>{body}</main></body></html>"
    )


def login_page(error: str = "", next_path: str = "/") -> str:
    note = f'<p class="error" role="alert">{escape(error)}</p>' if error else ""
    body = (
        f'{note}<form method="post" action="/login" class="login">'
        f'<input type="hidden" name="next" value="{escape(next_path)}">'
        '<label>Operator name <input name="user" autocomplete="username" required autofocus></label>'
        '<label>Password <input name="password" type="password" autocomplete="current-password" required>'
        '</label><button type="submit">Log in</button></form>'
    )
    return layout("Log in", body, None)


def message_page(title: str, text: str, viewer: Viewer | None, back: str = "/") -> str:
    return layout(title, f'<p>{escape(text)}</p><p><a href="{escape(back)}">Back</a></p>', viewer)


# ---------------------------------------------------------------- overview


FIGURES: tuple[tuple[str, str], ...] = (
    ("customers_served", "Customers served (a reply sent)"),
    ("customers_active", "Customers active"),
    ("messages", "Customer messages received"),
    ("batches", "Batches decided"),
    ("requests", "OpenAI reply calls (responder requests)"),
    ("calls_per_message", "OpenAI calls per customer message"),
    ("replies", "Replies sent"),
    ("gaps", "Gaps detected (history checked)"),
    ("inj_realtime", "Missed messages injected: seen in real time"),
    ("inj_history", "Missed messages injected: from history only"),
    ("inj_both", "Missed messages injected: both sources"),
    ("held", "Batches held (human active or paused)"),
    ("pauses", "Pauses by operators"),
    ("webhooks_missing", "Webhooks WATI never delivered"),
    ("recovered", "Customer messages recovered from history"),
    ("history_failures", "History-fetch failures"),
    ("dead_letters", "Dead letters"),
)


def _figure(totals: Mapping[str, int], key: str) -> str:
    if key == "calls_per_message":
        return f"{totals['requests'] / totals['messages']:.2f}" if totals["messages"] else "&ndash;"
    return f"{totals.get(key, 0):,}"


def detection_rate(row: Mapping[str, int]) -> float | None:
    """Share of the human-agent messages the bot learnt of in real time (webhook), in percent."""
    total = row["inj_realtime"] + row["inj_history"] + row["inj_both"]
    return None if not total else 100.0 * (row["inj_realtime"] + row["inj_both"]) / total


def hourly_series(hourly: Sequence[Mapping[str, Any]], since_ms: int, hours: int) -> list[dict[str, Any]]:
    """One row per hour from since (empty hours filled with zeros), oldest first."""
    by_hour = {int(r["hour"]): r for r in hourly}
    start = since_ms - since_ms % HOUR_MS
    zero = {k: 0 for k in (hourly[0].keys() if hourly else ())}
    out = []
    for i in range(hours):
        hour = start + i * HOUR_MS
        row = dict(by_hour.get(hour, zero))
        row["hour"] = hour
        out.append(row)
    return out


def _sum_days(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    days: dict[int, dict[str, Any]] = {}
    for row in rows:
        day = row["hour"] - row["hour"] % (24 * HOUR_MS)
        acc = days.setdefault(day, {"hour": day})
        for k, v in row.items():
            if k != "hour":
                acc[k] = acc.get(k, 0) + (v or 0)
    return list(days.values())


def overview_page(viewer: Viewer, now_ms: int, day: Mapping[str, int], week: Mapping[str, int],
                  hourly_week: Sequence[Mapping[str, Any]], waiting: Mapping[str, int],
                  actions: Iterable[Mapping[str, Any]]) -> str:
    rows = "".join(
        f"<tr><th scope=row>{label}</th><td>{_figure(day, key)}</td><td>{_figure(week, key)}</td></tr>"
        for key, label in FIGURES
    )
    to_waiting = escape(viewer.url("/waiting"))
    now = (f'<p class="now"><a href="{to_waiting}"><b>{waiting["held"]:,}</b> held</a> and '
           f'<a href="{to_waiting}"><b>{waiting["paused"]:,}</b> paused</a> customers right now.</p>')
    week_rows = hourly_series(hourly_week, now_ms - 7 * 24 * HOUR_MS + HOUR_MS, 7 * 24)
    day_rows = week_rows[-24:]
    day_labels = [datetime.fromtimestamp(r["hour"] / 1000, UTC).strftime("%H:00") for r in day_rows]
    days = _sum_days(week_rows)
    day_names = [datetime.fromtimestamp(r["hour"] / 1000, UTC).strftime("%a %d") for r in days]
    gap_chart = charts.stacked_bars(
        "Human-agent messages per hour (24 h): how the bot learnt of them",
        day_labels, {"webhook only": [r.get("inj_realtime", 0) for r in day_rows],
                     "webhook and history": [r.get("inj_both", 0) for r in day_rows],
                     "history only (webhook never delivered)": [r.get("inj_history", 0) for r in day_rows]},
    )
    rate_chart = charts.line(
        "Detection rate per day (7 d): share of human-agent messages seen by webhook",
        day_names, [detection_rate(r) if r.get("batches") is not None else None for r in days],
    )
    load_chart = charts.stacked_bars(
        "Batches per hour (24 h)", day_labels,
        {"answered or routed": [r.get("batches", 0) - r.get("held", 0) for r in day_rows],
         "held": [r.get("held", 0) for r in day_rows]},
    )
    recent = "".join(
        f"<li>{when(a['at'])} — <b>{escape(a['operator'])}</b> {escape(a['kind'])} "
        + (f'<a href="{customer_url(a["customer_key"])}">{escape(a["customer_key"])}</a>'
           if a.get("customer_key") else escape(a.get("target") or ""))
        + "</li>"
        for a in actions
    )
    body = (
        f"{now}<div class=table-wrap><table class=figures><thead><tr><th></th><th>Last 24 h</th>"
        f"<th>Last 7 d</th></tr></thead><tbody>{rows}</tbody></table></div>"
        f'<section class="charts">{gap_chart}{rate_chart}{load_chart}</section>'
        f"<h2>Recent operator actions</h2><ul class=actions>{recent or '<li>none yet</li>'}</ul>"
    )
    return layout("Overview", body, viewer, "overview")


# ---------------------------------------------------------------- customers


def _badges(c: Mapping[str, Any]) -> str:
    out = []
    if c.get("held"):
        out.append('<span class="badge held">held</span>')
    if c.get("paused"):
        out.append('<span class="badge paused">paused</span>')
    if c.get("open_since"):
        out.append('<span class="badge open">open batch</span>')
    if c.get("recovered"):
        out.append(f'<span class="badge rec">recovered {c["recovered"]}</span>')
    if c.get("errors"):
        out.append(f'<span class="badge err">errors {c["errors"]}</span>')
    return " ".join(out)


def _tenant_param(viewer: Viewer) -> dict[str, str]:
    return {"tenant": viewer.tenant} if viewer.tenant else {}


def _pager(base: str, params: Mapping[str, Any], page: Page) -> str:
    def link(offset: int, label: str) -> str:
        query = urlencode({**params, "offset": offset}, doseq=True)
        return f'<a href="{base}?{query}">{label}</a>'

    parts = []
    if page.offset > 0:
        parts.append(link(max(0, page.offset - page.limit), "← Newer"))
    last = min(page.total, page.offset + len(page.rows))
    parts.append(f"<span>{page.offset + 1 if page.rows else 0}&ndash;{last} of {page.total:,}</span>")
    if page.offset + page.limit < page.total:
        parts.append(link(page.offset + page.limit, "Older →"))
    return f'<div class="pager">{" ".join(parts)}</div>'


def customers_page(viewer: Viewer, now_ms: int, page: Page, query: str, filters: Sequence[str]) -> str:
    boxes = "".join(
        f'<label class="check"><input type="checkbox" name="f" value="{name}"'
        f'{" checked" if name in filters else ""}> {label}</label>'
        for name, label in (("held", "held"), ("paused", "paused"), ("open", "open batch"),
                            ("recovered", "recovered"), ("errors", "errors"))
        if name in FILTERS
    )
    keep = f'<input type="hidden" name="tenant" value="{escape(viewer.tenant)}">' if viewer.tenant else ""
    form = (f'<form method="get" action="/customers" class="search"><input type="search" name="q" '
            f'value="{escape(query)}" placeholder="key, name or phone" aria-label="search">'
            f'{keep}{boxes}<button type="submit">Search</button></form>')
    rows = "".join(
        f'<tr><td data-label="Customer"><a href="{customer_url(c["key"])}">{escape(c["key"])}</a></td>'
        f'<td data-label="Name">{escape(c.get("name") or "")}</td>'
        f'<td data-label="Last activity">{ago(c["last_at"], now_ms)} ago</td>'
        f'<td data-label="Batches" class=num>{c["batches"]}</td>'
        f'<td data-label="Status">{_badges(c) or "<span class=muted>bot active</span>"}</td></tr>'
        for c in page.rows
    )
    table = ("<div class=table-wrap><table class=cards>"
             f"<thead><tr><th>Customer</th><th>Name</th><th>Last activity</th>"
             "<th>Batches</th><th>Status</th></tr></thead>"
             f"<tbody>{rows or '<tr><td colspan=5>none</td></tr>'}"
             "</tbody></table></div>")
    pager = _pager("/customers", {"q": query, "f": list(filters), **_tenant_param(viewer)}, page)
    return layout("Customers", form + table + pager, viewer, "customers")


# ---------------------------------------------------------------- timeline


def _command_form(viewer: Viewer, key: str, kind: str, back: str) -> str:
    label = "Pause the bot" if kind == "pause" else "Resume the bot"
    return (f'<form method="post" action="{customer_url(key)}/{kind}" class="inline">{_csrf(viewer)}'
            f'<input type="hidden" name="back" value="{escape(back)}">'
            f'<button type="submit" class="{kind}">{label}</button></form>')


def _lines(items: Iterable[Mapping[str, Any]]) -> str:
    return "".join(
        f'<li><time>{when(m.get("at"))}</time> {escape(m.get("text") or "")}'
        + (' <span class="badge rec">recovered</span>' if m.get("recovered") else "") + "</li>"
        for m in items
    )


def _by_reason(excluded: Iterable[Mapping[str, Any]]) -> dict[str, list[Mapping[str, Any]]]:
    groups: dict[str, list[Mapping[str, Any]]] = {}
    for e in excluded:
        groups.setdefault(str(e.get("reason") or ""), []).append(e)
    return groups


def _span(items: Sequence[Mapping[str, Any]]) -> str:
    """`at 10:00:01` or `10:00:01 to 10:05:00` (times of day; the card's date is in its title)."""
    times = sorted(int(e["at"]) for e in items if e.get("at"))
    if not times:
        return ""
    first, last = when(times[0])[11:], when(times[-1])[11:]
    return f"at {first}" if first == last else f"{first} to {last}"


def batch_card(b: Mapping[str, Any], pending_inbound: Sequence[Mapping[str, Any]]) -> str:
    """One batch: what the customer wrote, the block given to the model, exclusions, decision, reply."""
    messages = json.loads(b["messages_json"]) if b.get("messages_json") else list(pending_inbound)
    if b.get("held"):
        decision = f'<span class="badge held">held: {escape(b.get("hold_reason") or "")}</span>'
    else:
        decision = f'<span class="badge ok">routed to {escape(b.get("routed_to") or "")}</span>'
    facts = []
    if b.get("gap_seconds") is not None:
        facts.append(f"gap {b['gap_seconds']:.0f} s (threshold {b.get('gap_threshold_seconds') or 0:.0f} s)")
    facts.append("history checked" if b.get("missed_check_ran") else "history not checked")
    if b.get("cutoff"):
        facts.append(f"cutoff {when(b['cutoff'])}")
    if b.get("webhooks_missing"):
        facts.append(f"<b>{b['webhooks_missing']} webhook(s) WATI never delivered</b>")
    if b.get("recovered"):
        facts.append(f"<b>{b['recovered']} message(s) recovered from history</b>")
    if b.get("history_error"):
        facts.append(f'<span class="error">history fetch failed: {escape(b["history_error"])}</span>')
    block = b.get("block")
    if block:
        block_html = f'<pre class="block" data-testid="block">{escape(block)}</pre>'
    elif b.get("held"):
        block_html = "<p class=muted>none: the batch was held, nothing went to the model</p>"
    elif b.get("messages_json") is None:
        block_html = "<p class=muted>no request to the responder recorded (yet)</p>"
    else:
        block_html = "<p class=muted>none: no human-agent messages were missed</p>"
    excluded = json.loads(b.get("excluded_json") or "[]")
    excluded_html = "".join(
        f"<li>{escape(EXCLUSION_REASONS.get(reason, reason))}: <b>{len(group)}</b> item(s)"
        f' <span class="muted">{_span(group)}</span></li>'
        for reason, group in _by_reason(excluded).items()
    )
    if b.get("outcome"):
        reply = (f'<p><span class="badge ok">{escape(b["outcome"])}</span> at {when(b.get("sent_at"))}</p>'
                 f'<blockquote class="reply" data-testid="reply">{escape(b.get("reply_text") or "")}'
                 "</blockquote>")
    elif b.get("held"):
        reply = "<p class=muted>no reply: held</p>"
    else:
        reply = "<p class=muted>no reply recorded (yet)</p>"
    return (
        f'<article class="batch" id="b-{escape(b["batch_id"])}" data-batch="{escape(b["batch_id"])}">'
        f'<h3><time>{when(b["decided_at"])}</time> {decision}</h3>'
        f'<p class="facts">{" · ".join(facts)}</p>'
        f"<h4>Customer wrote</h4><ul class=msgs>{_lines(messages) or '<li class=muted>&ndash;</li>'}</ul>"
        f"<h4>Human-agent messages given to the model</h4>{block_html}"
        + (f"<h4>Excluded from the block</h4><ul class=excl>{excluded_html}</ul>" if excluded else "")
        + f"<h4>Bot reply</h4>{reply}<p class=muted>batch {escape(b['batch_id'])}</p></article>"
    )


def timeline_page(viewer: Viewer, now_ms: int, customer: Mapping[str, Any],
                  batches: Sequence[Mapping[str, Any]], inbound: Sequence[Mapping[str, Any]],
                  agents: Sequence[Mapping[str, Any]],
                  actions: Sequence[Mapping[str, Any]], older: str | None) -> str:
    """`batches` oldest first; inbound messages are placed in the first batch decided after them,
    those after the last decision shown as the open batch."""
    key = customer["key"]
    back = customer_url(key)
    status = _badges(customer) or '<span class="badge ok">bot active</span>'
    if customer.get("paused"):
        status += (f' paused by <b>{escape(customer.get("paused_by") or "")}</b> '
                   f'{ago(customer.get("paused_at"), now_ms)} ago')
    button = _command_form(viewer, key, "resume" if customer.get("paused") else "pause", back)
    head = (f'<div class="customer-head"><div><b>{escape(customer.get("name") or "")}</b> '
            f'<span class="muted">{escape(customer.get("channel") or "")}</span></div>'
            f'<div>{status}</div><div>{button}</div></div>')
    entries: list[tuple[int, int, str]] = []
    pending = list(inbound)
    for b in batches:
        mine = [m for m in pending if m["at"] <= b["decided_at"]]
        pending = [m for m in pending if m["at"] > b["decided_at"]]
        entries.append((b["decided_at"], 1, batch_card(b, mine)))
    for a in agents:
        who = a.get("operator_name") or a.get("sender_kind")
        entries.append((a["at"], 0, f'<div class="event agent"><time>{when(a["at"])}</time> '
                        f'inbox: <b>{escape(str(who))}</b> ({escape(a.get("sender_kind") or "")}) '
                        f'{escape(a.get("text") or "")}</div>'))
    for a in actions:
        entries.append((a["at"], 0, '<div class="event action" data-testid="action">'
                        f'<time>{when(a["at"])}</time> '
                        f'operator <b>{escape(a["operator"])}</b>: {escape(a["kind"])}</div>'))
    if pending:
        entries.append((pending[-1]["at"], 2, '<article class="batch open">'
                        "<h3>Open batch (not decided yet)</h3>"
                        f"<ul class=msgs>{_lines(pending)}</ul></article>"))
    entries.sort(key=lambda e: (e[0], e[1]))
    more = f'<p><a href="{escape(older)}">← Older batches</a></p>' if older else ""
    body = head + more + "".join(e[2] for e in entries) + (
        "" if entries else "<p class=muted>nothing recorded for this customer in the retention window</p>")
    return layout(f"Customer {key}", body, viewer, "customers")


# ---------------------------------------------------------------- held and paused


def waiting_page(viewer: Viewer, now_ms: int, page: Page) -> str:
    customers = page.rows
    rows = "".join(
        f'<tr><td data-label="Customer"><a href="{customer_url(c["key"])}">{escape(c["key"])}</a></td>'
        f'<td data-label="Name">{escape(c.get("name") or "")}</td><td data-label="Status">{_badges(c)}</td>'
        f'<td data-label="Why">{escape(c.get("hold_reason") or "") if c.get("held") else ""}'
        f'{" by " + escape(c.get("paused_by") or "") if c.get("paused") else ""}</td>'
        f'<td data-label="Waiting">{ago(c.get("paused_at") or c.get("held_since"), now_ms)}</td>'
        f'<td>{_command_form(viewer, c["key"], "resume", viewer.url("/waiting")) if c.get("paused") else ""}'
        "</td></tr>"
        for c in customers
    )
    table = ("<div class=table-wrap><table class=cards>"
             f"<thead><tr><th>Customer</th><th>Name</th><th>Status</th>"
             f"<th>Why</th><th>Waiting</th><th></th></tr></thead><tbody>"
             f"{rows or '<tr><td colspan=6>nobody is waiting on a human</td></tr>'}</tbody></table></div>")
    note = ("<p class=muted>Held: a human agent wrote recently, the bot stays silent until the hold ends. "
            "Paused: an operator stopped the bot for this customer until resumed.</p>")
    return layout("Held and paused", note + table + _pager("/waiting", _tenant_param(viewer), page), viewer,
                  "waiting")


# ---------------------------------------------------------------- dead letters


def _key_text(key: bytes | None) -> str:
    """A record's Kafka key (the customer key on every topic) when the record itself is unreadable."""
    return bytes(key).decode("utf-8", "replace") if key else ""


def dead_letters_page(viewer: Viewer, page: Page) -> str:
    rows = "".join(
        f'<tr><td data-label="Failed at">'
        f'<a href="/dead-letters/{quote(d["id"])}">{when(d["failed_at"])}</a></td>'
        f'<td data-label="Service">{escape(d.get("service") or "")}</td>'
        f'<td data-label="Reason">{escape(d.get("reason") or "")}</td>'
        f'<td data-label="Source topic">{escape(d.get("source_topic") or "-")}</td>'
        f'<td data-label="Customer">{escape(d.get("customer_key") or _key_text(d.get("record_key")))}</td>'
        f'<td data-label="Replay">'
        f'{"replayed by " + escape(d["replayed_by"] or "") if d.get("replayed_at") else ""}</td></tr>'
        for d in page.rows
    )
    table = ("<div class=table-wrap><table class=cards>"
             f"<thead><tr><th>Failed at</th><th>Service</th><th>Reason</th>"
             f"<th>Source topic</th><th>Customer</th><th>Replay</th></tr></thead><tbody>"
             f"{rows or '<tr><td colspan=6>none</td></tr>'}</tbody></table></div>")
    pager = _pager("/dead-letters", _tenant_param(viewer), page)
    return layout("Dead letters", table + pager, viewer, "dead")


def dead_letter_page(viewer: Viewer, letter: Mapping[str, Any], decoded: str, replay_problem: str | None,
                     confirm: bool = False) -> str:
    facts = "".join(
        f"<tr><th scope=row>{label}</th><td>{value}</td></tr>"
        for label, value in (
            ("Failed at", when(letter["failed_at"])), ("Service", escape(letter.get("service") or "")),
            ("Reason", escape(letter.get("reason") or "")), ("Error", escape(letter.get("error") or "")),
            ("Source", f'{escape(letter.get("source_topic") or "-")} '
                       f'partition {letter.get("source_partition")} offset {letter.get("source_offset")}'),
            ("Customer", f'<a href="{customer_url(letter["customer_key"])}">'
                         f'{escape(letter["customer_key"])}</a>' if letter.get("customer_key") else "-"),
            ("Record key", escape(bytes(letter["record_key"]).decode("utf-8", "replace"))
             if letter.get("record_key") else "-"),
            ("Batch", escape(letter.get("batch_id") or "-")),
            ("Replayed", f'{when(letter["replayed_at"])} by <b>{escape(letter.get("replayed_by") or "")}</b>'
             if letter.get("replayed_at") else "no"),
        )
    )
    if replay_problem:
        action = f"<p class=muted>Replay not possible: {escape(replay_problem)}</p>"
    else:
        topic = escape(letter.get("source_topic") or "")
        action = (
            f'<form method="post" action="/dead-letters/{quote(letter["id"])}/replay" class="replay">'
            f'{_csrf(viewer)}<label class="check"><input type="checkbox" name="confirm" value="yes" required'
            f'{" autofocus" if confirm else ""}> Replay this record once to <b>{topic}</b></label>'
            f'<button type="submit">Replay</button></form>'
        )
        if confirm:
            action = '<p class="error" role="alert">Tick the box to confirm the replay.</p>' + action
    body = (f"<div class=table-wrap><table class=facts>{facts}</table></div><h2>Record</h2>"
            f'<pre class="record">{escape(decoded)}</pre>{action}'
            '<p><a href="/dead-letters">Back to the dead letters</a></p>')
    return layout("Dead letter", body, viewer, "dead")
