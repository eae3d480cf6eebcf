"""The console's embedded store: SQLite under DATA_DIR, shaped for the pages' queries.

Written only by the console's consumer (`apply_*`, one transaction per polled batch), read by the
pages. Rows come from `rows.py`. Every record type is idempotent by its id (batch id, event id,
dead-letter offset), so a redelivered record changes nothing, and the overview's hourly figures
grow only when a row is new. Consumed offsets are kept here, in the same transaction as the rows,
so the store and its position can never disagree; an empty store starts from the topics' beginning
(the rebuild). Nothing lives only here: pauses come from the context-commands topic and dead-letter
replays from the dead-letter-replays topic (the CLI's and the console's one record of them), so a
rebuild loses nothing. `prune` deletes what is older than the topics' retention: the store's size
follows the retention, not the number of customers ever seen.

Tenants (docs/tenants.md, "Per-tenant visibility"): customers, dead letters and operator actions
carry their tenant (from the customer key, `rows.tenant_of`; NULL when there is none), and the
overview's hourly figures are also kept per tenant (`tenant_hourly`, '' for none), so every read
can be limited to a set of tenants. A replay is seen through its dead letter (the `replays` rows
are only read joined to `dead_letters`, whose tenant limits them) and its action carries the dead
letter's tenant. A store of another layout (`SCHEMA_VERSION`), one written before tenants
included, is emptied and rebuilt from the topics.
"""

from __future__ import annotations

import sqlite3
import threading
from collections.abc import Collection, Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from operator import itemgetter
from pathlib import Path
from typing import Any

from .rows import DECISION_FIGURES, Row, decision_figures, hour_of, tenant_of

# the layout's version (PRAGMA user_version): a store of another version is rebuilt from the topics.
# 2: decisions clustered by customer, the replays table; 3: tenant columns and `tenant_hourly`
SCHEMA_VERSION = 3

SCHEMA = """
CREATE TABLE IF NOT EXISTS offsets (topic TEXT, partition INTEGER, next_offset INTEGER,
    PRIMARY KEY (topic, partition));
CREATE TABLE IF NOT EXISTS customers (
    key TEXT PRIMARY KEY, channel TEXT, provider_id TEXT, name TEXT,
    last_at INTEGER NOT NULL DEFAULT 0, last_inbound_at INTEGER, last_reply_at INTEGER,
    last_decision_at INTEGER, batches INTEGER NOT NULL DEFAULT 0,
    held INTEGER NOT NULL DEFAULT 0, held_since INTEGER, hold_reason TEXT,
    paused INTEGER NOT NULL DEFAULT 0, paused_by TEXT, paused_at INTEGER,
    open_since INTEGER, recovered INTEGER NOT NULL DEFAULT 0, errors INTEGER NOT NULL DEFAULT 0,
    tenant TEXT);
CREATE INDEX IF NOT EXISTS customers_last ON customers (last_at);
CREATE INDEX IF NOT EXISTS customers_reply ON customers (last_reply_at);
CREATE INDEX IF NOT EXISTS customers_name ON customers (lower(name));
CREATE INDEX IF NOT EXISTS customers_held ON customers (last_at) WHERE held = 1;
CREATE INDEX IF NOT EXISTS customers_paused ON customers (last_at) WHERE paused = 1;
CREATE INDEX IF NOT EXISTS customers_open ON customers (last_at) WHERE open_since IS NOT NULL;
CREATE INDEX IF NOT EXISTS customers_recovered ON customers (last_at) WHERE recovered > 0;
CREATE INDEX IF NOT EXISTS customers_errors ON customers (last_at) WHERE errors > 0;
CREATE INDEX IF NOT EXISTS customers_waiting ON customers (COALESCE(paused_at, held_since))
    WHERE held = 1 OR paused = 1;
-- the bulk of the store (one row per batch): kept in the timeline's order, a customer's batches by
-- time, so a row costs one place in the table plus one at the end of the time index (the prune's);
-- a batch id is unique within its customer (it is "<customer key>:<n>")
CREATE TABLE IF NOT EXISTS decisions (
    customer_key TEXT NOT NULL, decided_at INTEGER NOT NULL, batch_id TEXT NOT NULL,
    message_count INTEGER, gap_seconds REAL, gap_threshold_seconds REAL, missed_check_ran INTEGER,
    cutoff INTEGER, held INTEGER, hold_reason TEXT, routed_to TEXT, injected_json TEXT,
    excluded_json TEXT, inj_realtime INTEGER, inj_history INTEGER, inj_both INTEGER,
    webhooks_missing INTEGER, recovered INTEGER, history_error TEXT,
    PRIMARY KEY (customer_key, decided_at, batch_id)) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS decisions_at ON decisions (decided_at);
CREATE TABLE IF NOT EXISTS requests (
    batch_id TEXT PRIMARY KEY, customer_key TEXT NOT NULL, created_at INTEGER NOT NULL,
    messages_json TEXT, user_text TEXT, block TEXT, images INTEGER, message_count INTEGER);
CREATE INDEX IF NOT EXISTS requests_at ON requests (created_at);
CREATE TABLE IF NOT EXISTS replies (
    batch_id TEXT PRIMARY KEY, customer_key TEXT NOT NULL, outcome TEXT, text TEXT,
    sent_at INTEGER NOT NULL, parts INTEGER);
CREATE INDEX IF NOT EXISTS replies_at ON replies (sent_at);
CREATE TABLE IF NOT EXISTS inbound (
    event_id TEXT PRIMARY KEY, customer_key TEXT NOT NULL, at INTEGER NOT NULL,
    provider_time INTEGER, text TEXT, recovered INTEGER);
CREATE INDEX IF NOT EXISTS inbound_customer ON inbound (customer_key, at);
CREATE INDEX IF NOT EXISTS inbound_at ON inbound (at);
CREATE TABLE IF NOT EXISTS agent_activity (
    event_id TEXT PRIMARY KEY, customer_key TEXT NOT NULL, at INTEGER NOT NULL,
    sender_kind TEXT, operator_name TEXT, event_type TEXT, text TEXT);
CREATE INDEX IF NOT EXISTS agent_customer ON agent_activity (customer_key, at);
CREATE INDEX IF NOT EXISTS agent_at ON agent_activity (at);
CREATE TABLE IF NOT EXISTS dead_letters (
    id TEXT PRIMARY KEY, failed_at INTEGER NOT NULL, service TEXT, reason TEXT, error TEXT,
    source_topic TEXT, source_partition INTEGER, source_offset INTEGER, record_key BLOB,
    payload BLOB, customer_key TEXT, batch_id TEXT, tenant TEXT);
CREATE INDEX IF NOT EXISTS dead_letters_at ON dead_letters (failed_at);
-- the dead-letter-replays topic as read (a replay may be read before its dead letter)
CREATE TABLE IF NOT EXISTS replays (
    dead_letter_id TEXT PRIMARY KEY, replayed_at INTEGER NOT NULL, replayed_by TEXT NOT NULL,
    source_topic TEXT, replayed_partition INTEGER, replayed_offset INTEGER);
CREATE TABLE IF NOT EXISTS actions (
    id INTEGER PRIMARY KEY AUTOINCREMENT, at INTEGER NOT NULL, operator TEXT NOT NULL,
    kind TEXT NOT NULL, customer_key TEXT, target TEXT, tenant TEXT);
CREATE INDEX IF NOT EXISTS actions_customer ON actions (customer_key, at);
CREATE UNIQUE INDEX IF NOT EXISTS actions_once ON actions (customer_key, at, kind, operator);
CREATE INDEX IF NOT EXISTS actions_at ON actions (at);
CREATE TABLE IF NOT EXISTS hourly (
    hour INTEGER PRIMARY KEY, batches INTEGER DEFAULT 0, held INTEGER DEFAULT 0, gaps INTEGER DEFAULT 0,
    inj_realtime INTEGER DEFAULT 0, inj_history INTEGER DEFAULT 0, inj_both INTEGER DEFAULT 0,
    webhooks_missing INTEGER DEFAULT 0, recovered INTEGER DEFAULT 0, history_failures INTEGER DEFAULT 0,
    requests INTEGER DEFAULT 0, messages INTEGER DEFAULT 0, replies INTEGER DEFAULT 0,
    dead_letters INTEGER DEFAULT 0, pauses INTEGER DEFAULT 0);
CREATE TABLE IF NOT EXISTS tenant_hourly (
    hour INTEGER NOT NULL, tenant TEXT NOT NULL,
    batches INTEGER DEFAULT 0, held INTEGER DEFAULT 0, gaps INTEGER DEFAULT 0,
    inj_realtime INTEGER DEFAULT 0, inj_history INTEGER DEFAULT 0, inj_both INTEGER DEFAULT 0,
    webhooks_missing INTEGER DEFAULT 0, recovered INTEGER DEFAULT 0, history_failures INTEGER DEFAULT 0,
    requests INTEGER DEFAULT 0, messages INTEGER DEFAULT 0, replies INTEGER DEFAULT 0,
    dead_letters INTEGER DEFAULT 0, pauses INTEGER DEFAULT 0, PRIMARY KEY (hour, tenant));
CREATE INDEX IF NOT EXISTS customers_tenant ON customers (tenant, last_at);
CREATE INDEX IF NOT EXISTS customers_provider_id ON customers (provider_id);
CREATE INDEX IF NOT EXISTS dead_letters_tenant ON dead_letters (tenant, failed_at);
CREATE INDEX IF NOT EXISTS actions_tenant ON actions (tenant, at);
"""

def tenant_clause(tenants: Collection[str] | None, column: str = "tenant") -> tuple[str, list[str]]:
    """`column IN (...)` for a set of tenants (None: every tenant, no clause; empty: nothing)."""
    if tenants is None:
        return "", []
    chosen = sorted(set(tenants))
    if not chosen:
        return "0", []
    return f"{column} IN ({', '.join('?' for _ in chosen)})", chosen


HOURLY_FIELDS = (
    "batches", "held", "gaps", "inj_realtime", "inj_history", "inj_both", "webhooks_missing",
    "recovered", "history_failures", "requests", "messages", "replies", "dead_letters", "pauses",
)

FILTERS = {
    "held": "held = 1",
    "paused": "paused = 1",
    "open": "open_since IS NOT NULL",
    "recovered": "recovered > 0",
    "errors": "errors > 0",
}


def _prefix_range(column: str, prefix: str) -> tuple[str, list[str]]:
    """`column` starts with `prefix`, as a range an index can serve (a LIKE 'x%' often cannot)."""
    return f"({column} >= ? AND {column} < ?)", [prefix, prefix + "\U0010ffff"]


def search_clause(query: str) -> tuple[str, list[str]]:
    """Customers whose key, phone / provider id or name starts with the query (case-insensitive
    for names); each alternative is a range over an index, so a search costs the same with 100,000
    customers as with 100."""
    q = " ".join(query.split())
    if not q:
        return "", []
    parts: list[str] = []
    args: list[str] = []
    digits = q.replace("+", "").replace(" ", "").replace("-", "")
    candidates = [q] if ":" in q else []
    if digits.isdigit():
        candidates += [f"wati:{digits}", f"manychat:{digits}"]
    else:
        candidates += [f"wati:{q}", f"manychat:{q}"]
    for prefix in dict.fromkeys(candidates):
        clause, values = _prefix_range("key", prefix)
        parts.append(clause)
        args += values
    if digits.isdigit():  # a phone number of any tenant (their keys start with the tenant)
        clause, values = _prefix_range("provider_id", digits)
        parts.append(clause)
        args += values
    clause, values = _prefix_range("lower(name)", q.lower())
    parts.append(clause)
    args += values
    return "(" + " OR ".join(parts) + ")", args


@dataclass(frozen=True)
class Page:
    rows: list[dict[str, Any]]
    total: int
    offset: int
    limit: int


DECISION_COLUMNS = (
    "customer_key", "decided_at", "batch_id", "message_count", "gap_seconds", "gap_threshold_seconds",
    "missed_check_ran", "cutoff", "held", "hold_reason", "routed_to", "injected_json", "excluded_json",
    "inj_realtime", "inj_history", "inj_both", "webhooks_missing", "recovered", "history_error",
)
_decision_values = itemgetter(*DECISION_COLUMNS)
DECISION_INSERT = (f"INSERT INTO decisions ({', '.join(DECISION_COLUMNS)})"  # noqa: S608 - constant names
                   f" VALUES ({', '.join('?' * len(DECISION_COLUMNS))})")
# A new decision's effect on its customer, in one statement whether the customer is new or not (a
# customer row and its indexes are written once). The latest decision sets the hold state; an older
# one arriving late counts but does not bring a hold back.
CUSTOMER_DECISION = """
INSERT INTO customers (key, batches, recovered, errors, last_at, held, held_since, hold_reason,
                       last_decision_at, tenant)
VALUES (?1, 1, ?2, ?3, ?4, ?5, CASE WHEN ?5 THEN ?4 END, ?6, ?4, ?7)
ON CONFLICT (key) DO UPDATE SET batches = batches + 1, recovered = recovered + ?2,
    errors = errors + ?3, last_at = MAX(last_at, ?4),
    held = CASE WHEN last_decision_at IS NULL OR ?4 >= last_decision_at THEN ?5 ELSE held END,
    held_since = CASE WHEN last_decision_at IS NULL OR ?4 >= last_decision_at
        THEN (CASE WHEN ?5 THEN COALESCE(held_since, ?4) ELSE NULL END) ELSE held_since END,
    hold_reason = CASE WHEN last_decision_at IS NULL OR ?4 >= last_decision_at
        THEN ?6 ELSE hold_reason END,
    open_since = CASE WHEN open_since IS NOT NULL AND open_since <= ?4 THEN NULL ELSE open_since END,
    last_decision_at = MAX(COALESCE(last_decision_at, 0), ?4)
"""


def _insert(db: sqlite3.Connection, table: str, row: Row, verb: str = "INSERT OR IGNORE") -> bool:
    cols = ", ".join(row)
    marks = ", ".join(f":{c}" for c in row)
    return db.execute(f"{verb} INTO {table} ({cols}) VALUES ({marks})", row).rowcount > 0


class Store:
    """One SQLite database file; use from one thread (the console's event loop)."""

    def __init__(self, path: Path | str) -> None:
        self.path = Path(path)
        if str(path) != ":memory:":
            self.path.parent.mkdir(parents=True, exist_ok=True)
        # writes: one connection, one transaction at a time (`transaction` holds the lock), from the
        # consumer's worker thread or the event loop; reads (the pages): a second connection, which
        # WAL lets read the last committed state while a write is under way
        self.db = sqlite3.connect(str(path), isolation_level=None, check_same_thread=False)
        self.db.row_factory = sqlite3.Row
        self.db.execute("PRAGMA journal_mode=WAL")
        # NORMAL: a power loss may lose the last transactions, never corrupt; the positions are in
        # the same transactions as the rows, so the consumer simply reads those records again
        self.db.execute("PRAGMA synchronous=NORMAL")
        self.db.execute("PRAGMA temp_store=MEMORY")
        # a polled batch touches thousands of index pages: a 64 MiB page cache (a fixed bound, not
        # one per customer) keeps them in memory until the commit instead of spilling mid-transaction
        self.db.execute("PRAGMA cache_size=-65536")
        # a checkpoint (copying the WAL into the database, with an fsync) every 64 MiB of WAL rather
        # than every 4 MiB: a catch-up's batch writes megabytes, and checkpointing after nearly every
        # one doubled its time; the WAL file is kept to that size
        self.db.execute("PRAGMA wal_autocheckpoint=16384")
        self.db.execute("PRAGMA journal_size_limit=67108864")
        self._migrate()
        self.lock = threading.Lock()
        self.reader = sqlite3.connect(str(path), isolation_level=None, check_same_thread=False)
        self.reader.row_factory = sqlite3.Row

    def _migrate(self) -> None:
        """A store written with another layout is emptied: the consumer then rebuilds it from the
        topics, which hold everything it shows (pauses and replays included)."""
        if self.db.execute("PRAGMA user_version").fetchone()[0] != SCHEMA_VERSION:
            tables = [r[0] for r in self.db.execute(
                "SELECT name FROM sqlite_master WHERE type = 'table' AND name NOT LIKE 'sqlite_%'")]
            for table in tables:
                self.db.execute(f'DROP TABLE IF EXISTS "{table}"')  # names from sqlite_master
            self.db.executescript(SCHEMA)
            self.db.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
        else:
            self.db.executescript(SCHEMA)

    def close(self) -> None:
        self.reader.close()
        self.db.close()

    @contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        with self.lock:
            self.db.execute("BEGIN")
            try:
                yield self.db
            except BaseException:
                self.db.execute("ROLLBACK")
                raise
            self.db.execute("COMMIT")

    # ------------------------------------------------------------ writes (call inside transaction)

    def is_empty(self) -> bool:
        return self.reader.execute("SELECT 1 FROM offsets LIMIT 1").fetchone() is None

    def offsets(self) -> dict[tuple[str, int], int]:
        return {(r["topic"], r["partition"]): r["next_offset"]
                for r in self.reader.execute("SELECT * FROM offsets")}

    def set_offsets(self, positions: Mapping[tuple[str, int], int]) -> None:
        self.db.executemany(
            "INSERT INTO offsets VALUES (?, ?, ?) ON CONFLICT (topic, partition) DO UPDATE"
            " SET next_offset = excluded.next_offset",
            [(t, p, o) for (t, p), o in positions.items()],
        )

    def _hourly(self, at_ms: int, counts: Mapping[str, int], tenant: str | None) -> None:
        """Adds to the hour's figures, overall and the tenant's (`''`: no tenant)."""
        counts = {k: v for k, v in counts.items() if v}
        if not counts:
            return
        cols = ", ".join(counts)
        sets = ", ".join(f"{k} = {k} + excluded.{k}" for k in counts)
        marks = ", ".join("?" for _ in counts)
        self.db.execute(
            f"INSERT INTO hourly (hour, {cols}) VALUES (?, {marks})"  # noqa: S608
            f" ON CONFLICT (hour) DO UPDATE SET {sets}",
            (hour_of(at_ms), *counts.values()),
        )
        self.db.execute(
            f"INSERT INTO tenant_hourly (hour, tenant, {cols}) VALUES (?, ?, {marks})"  # noqa: S608
            f" ON CONFLICT (hour, tenant) DO UPDATE SET {sets}",
            (hour_of(at_ms), tenant or "", *counts.values()),
        )

    def _customer(self, key: str) -> None:
        self.db.execute("INSERT OR IGNORE INTO customers (key, tenant) VALUES (?, ?)", (key, tenant_of(key)))

    def apply_decision(self, row: Row) -> None:
        self.apply_decisions([row])

    def apply_decisions(self, batch: list[Row]) -> None:
        """New decisions (a batch already stored, or twice in `batch`, counts once), in few
        statements: one lookup per 500 customers, then one insert and one customer upsert per row (rows
        of `rows.decision_row`, which carry their customer's tenant)."""
        unique: dict[tuple[str, str], Row] = {}
        for row in batch:
            unique.setdefault((row["customer_key"], row["batch_id"]), row)
        pairs = list(unique)
        for i in range(0, len(pairs), 500):
            chunk = pairs[i:i + 500]
            keys = list(dict.fromkeys(k for k, _ in chunk))
            ids = [b for _, b in chunk]
            key_marks, id_marks = ",".join("?" * len(keys)), ",".join("?" * len(ids))
            for known in self.db.execute(
                f"SELECT customer_key, batch_id FROM decisions WHERE customer_key IN ({key_marks})"  # noqa: S608
                f" AND batch_id IN ({id_marks})", [*keys, *ids]
            ):
                unique.pop((known[0], known[1]), None)
        new = sorted(unique.values(), key=lambda r: r["decided_at"])
        if not new:
            return
        self.db.executemany(DECISION_INSERT, map(_decision_values, new))
        by_hour: dict[tuple[int, str | None], list[int]] = {}
        for row in new:
            figures = decision_figures(row)
            hour_tenant = (hour_of(row["decided_at"]), row["tenant"])
            if (total := by_hour.get(hour_tenant)) is None:
                by_hour[hour_tenant] = list(figures)
            else:
                for i, n in enumerate(figures):
                    total[i] += n
        for (hour, tenant), total in by_hour.items():
            self._hourly(hour, dict(zip(DECISION_FIGURES, total, strict=True)), tenant)
        self.db.executemany(
            CUSTOMER_DECISION,
            [(r["customer_key"], r["recovered"], 1 if r["history_error"] else 0, r["decided_at"], r["held"],
              r["hold_reason"] if r["held"] else None, r["tenant"]) for r in new],
        )

    def apply_request(self, row: Row) -> None:
        if _insert(self.db, "requests", row):
            self._hourly(row["created_at"], {"requests": 1}, tenant_of(row["customer_key"]))

    def apply_reply(self, row: Row) -> None:
        if not _insert(self.db, "replies", row):
            return
        self._hourly(row["sent_at"], {"replies": int(row["outcome"] in ("answered", "fallback"))},
                     tenant_of(row["customer_key"]))
        if row["outcome"] in ("answered", "fallback"):
            self._customer(row["customer_key"])
            self.db.execute(
                "UPDATE customers SET last_reply_at = MAX(COALESCE(last_reply_at, 0), :at),"
                " last_at = MAX(last_at, :at) WHERE key = :key",
                {"at": row["sent_at"], "key": row["customer_key"]},
            )

    def apply_inbound(self, row: Row) -> None:
        customer = {k: row.pop(k) for k in ("channel", "provider_id", "sender_name")}
        if not _insert(self.db, "inbound", row):
            return
        at = row["at"]
        self._hourly(at, {"messages": 1}, tenant_of(row["customer_key"]))
        self._customer(row["customer_key"])
        self.db.execute(
            """UPDATE customers SET channel = :channel, provider_id = :provider_id,
                 name = COALESCE(:name, name), last_at = MAX(last_at, :at),
                 last_inbound_at = MAX(COALESCE(last_inbound_at, 0), :at),
                 open_since = CASE WHEN last_decision_at IS NULL OR :at > last_decision_at
                     THEN MIN(COALESCE(open_since, :at), :at) ELSE open_since END
               WHERE key = :key""",
            {**customer, "name": customer["sender_name"], "at": at, "key": row["customer_key"]},
        )

    def apply_agent(self, row: Row) -> None:
        if _insert(self.db, "agent_activity", row):
            self._customer(row["customer_key"])
            self.db.execute("UPDATE customers SET last_at = MAX(last_at, ?) WHERE key = ?",
                            (row["at"], row["customer_key"]))

    def apply_command(self, row: Row) -> None:
        """Pause/resume: the latest command wins (a replayed old one does not undo a newer one).

        The command is also the record of who did it (an action on the timeline); the topic keeps
        it, so a rebuilt store still knows."""
        self._customer(row["customer_key"])
        tenant = tenant_of(row["customer_key"])
        new = self.db.execute(
            "INSERT OR IGNORE INTO actions (at, operator, kind, customer_key, tenant) VALUES (?, ?, ?, ?, ?)",
            (row["at"], row["actor"] or "(no name)", row["kind"], row["customer_key"], tenant)).rowcount > 0
        if not new:  # seen before (the console's own command coming back from the topic)
            return
        pause = row["kind"] == "pause"
        self.db.execute("UPDATE customers SET last_at = MAX(last_at, ?) WHERE key = ?",
                        (row["at"], row["customer_key"]))
        self.db.execute(
            """UPDATE customers SET paused = :paused, paused_by = :actor, paused_at = :at
               WHERE key = :key AND (paused_at IS NULL OR paused_at <= :at)""",
            {"paused": int(pause), "actor": row["actor"] if pause else None, "at": row["at"],
             "key": row["customer_key"]},
        )
        if pause:
            self._hourly(row["at"], {"pauses": 1}, tenant)

    def apply_dead_letter(self, row: Row) -> None:
        tenant = tenant_of(row.get("customer_key")) or tenant_of(row.get("record_key"))
        if not _insert(self.db, "dead_letters", {**row, "tenant": tenant}):
            return
        replayed = self.db.execute("SELECT 1 FROM replays WHERE dead_letter_id = ?", (row["id"],)).fetchone()
        if replayed and (row["customer_key"] or tenant):
            # its replay, read first: now on the customer's timeline, and its tenant's
            self.db.execute(
                "UPDATE actions SET customer_key = ?, tenant = ? WHERE target = ? AND customer_key IS NULL"
                " AND tenant IS NULL", (row["customer_key"], tenant, row["id"]))
        self._hourly(row["failed_at"], {"dead_letters": 1}, tenant)
        if row["customer_key"]:
            self._customer(row["customer_key"])
            self.db.execute(
                "UPDATE customers SET errors = errors + 1, last_at = MAX(last_at, ?) WHERE key = ?",
                (row["failed_at"], row["customer_key"]))

    def apply_replay(self, row: Row) -> bool:
        """A dead letter's replay (from the topic, or the console's own just produced): the first
        one for an id is the one, as the CLI reads it. Recorded as the operator's action. True when
        new."""
        if not _insert(self.db, "replays", row):
            return False
        self.db.execute(
            "INSERT OR IGNORE INTO actions (at, operator, kind, customer_key, target, tenant)"
            " VALUES (?1, ?2, ?3, (SELECT customer_key FROM dead_letters WHERE id = ?4), ?4,"
            " (SELECT tenant FROM dead_letters WHERE id = ?4))",
            (row["replayed_at"], row["replayed_by"],
             f"replayed dead letter {row['dead_letter_id']} to {row['source_topic']}", row["dead_letter_id"]),
        )
        return True

    def prune(self, before_ms: int) -> int:
        """Deletes every row dated before `before_ms`; returns how many."""
        deleted = 0
        with self.transaction() as db:
            for table, column in (
                ("decisions", "decided_at"), ("requests", "created_at"), ("replies", "sent_at"),
                ("inbound", "at"), ("agent_activity", "at"), ("dead_letters", "failed_at"),
                ("replays", "replayed_at"),
                ("actions", "at"), ("hourly", "hour"), ("tenant_hourly", "hour"), ("customers", "last_at"),
            ):
                deleted += db.execute(
                    f"DELETE FROM {table} WHERE {column} < ?", (before_ms,)  # noqa: S608
                ).rowcount
        return deleted

    # ------------------------------------------------------------ reads (the pages)
    # `tenants`: only these tenants' rows (None: every row, also those of no tenant)

    def hourly(self, since_ms: int, tenants: Collection[str] | None = None) -> list[dict[str, Any]]:
        if tenants is None:
            return [dict(r) for r in self.reader.execute(
                "SELECT * FROM hourly WHERE hour >= ? ORDER BY hour", (hour_of(since_ms),))]
        clause, args = tenant_clause(tenants)
        sums = ", ".join(f"SUM({f}) AS {f}" for f in HOURLY_FIELDS)
        return [dict(r) for r in self.reader.execute(
            f"SELECT hour, {sums} FROM tenant_hourly WHERE hour >= ? AND {clause}"  # noqa: S608
            " GROUP BY hour ORDER BY hour", (hour_of(since_ms), *args))]

    def totals(self, since_ms: int, tenants: Collection[str] | None = None) -> dict[str, int]:
        """The overview's figures since a time (hour granularity) plus customers served/active."""
        sums = ", ".join(f"COALESCE(SUM({f}), 0) AS {f}" for f in HOURLY_FIELDS)
        clause, args = tenant_clause(tenants)
        table, where = ("hourly", "") if tenants is None else ("tenant_hourly", f" AND {clause}")
        row = self.reader.execute(
            f"SELECT {sums} FROM {table} WHERE hour >= ?{where}", (hour_of(since_ms), *args)  # noqa: S608
        ).fetchone()
        out = {k: int(row[k]) for k in HOURLY_FIELDS}
        out["customers_served"] = self.reader.execute(
            f"SELECT COUNT(*) FROM customers WHERE last_reply_at >= ?{where}", (since_ms, *args)  # noqa: S608
        ).fetchone()[0]
        out["customers_active"] = self.reader.execute(
            f"SELECT COUNT(*) FROM customers WHERE last_at >= ?{where}", (since_ms, *args)  # noqa: S608
        ).fetchone()[0]
        return out

    def waiting_now(self, tenants: Collection[str] | None = None) -> dict[str, int]:
        clause, args = tenant_clause(tenants)
        row = self.reader.execute(
            "SELECT COALESCE(SUM(held), 0) AS held, COALESCE(SUM(paused), 0) AS paused FROM customers"  # noqa: S608
            f" WHERE (held = 1 OR paused = 1){' AND ' + clause if clause else ''}", args).fetchone()
        return {"held": int(row["held"]), "paused": int(row["paused"])}

    def customers(self, query: str = "", filters: Iterable[str] = (), offset: int = 0,
                  limit: int = 50, tenants: Collection[str] | None = None) -> Page:
        where: list[str] = []
        args: list[Any] = []
        where_query, query_args = search_clause(query)
        if where_query:
            where.append(where_query)
            args += query_args
        where += [FILTERS[f] for f in filters if f in FILTERS]
        tenant_where, tenant_args = tenant_clause(tenants)
        if tenant_where:
            where.append(tenant_where)
            args += tenant_args
        clause = f"WHERE {' AND '.join(where)}" if where else ""
        total = self.reader.execute(f"SELECT COUNT(*) FROM customers {clause}", args).fetchone()[0]  # noqa: S608
        rows = self.reader.execute(
            f"SELECT * FROM customers {clause} ORDER BY last_at DESC LIMIT ? OFFSET ?",  # noqa: S608
            [*args, limit, offset],
        ).fetchall()
        return Page([dict(r) for r in rows], int(total), offset, limit)

    def waiting(self, offset: int = 0, limit: int = 100, tenants: Collection[str] | None = None) -> Page:
        """Held or paused customers, longest waiting first (the partial index `customers_waiting`)."""
        clause, args = tenant_clause(tenants)
        where = f"(held = 1 OR paused = 1){' AND ' + clause if clause else ''}"
        total = self.reader.execute(
            f"SELECT COUNT(*) FROM customers WHERE {where}", args).fetchone()[0]  # noqa: S608
        rows = self.reader.execute(
            f"SELECT * FROM customers WHERE {where}"  # noqa: S608
            " ORDER BY COALESCE(paused_at, held_since) LIMIT ? OFFSET ?", (*args, limit, offset)).fetchall()
        return Page([dict(r) for r in rows], int(total), offset, limit)

    def customer(self, key: str) -> dict[str, Any] | None:
        row = self.reader.execute("SELECT * FROM customers WHERE key = ?", (key,)).fetchone()
        return dict(row) if row else None

    def tenants(self) -> list[str]:
        """The tenants with figures in the store (for the tenant filter): from `tenant_hourly`, whose
        size is hours x tenants, so every page can ask without scanning the customers."""
        return [r[0] for r in self.reader.execute(
            "SELECT DISTINCT tenant FROM tenant_hourly WHERE tenant != '' ORDER BY tenant")]

    def batches(self, key: str, before_ms: int | None = None, limit: int = 30) -> list[dict[str, Any]]:
        """The customer's latest batches (newest first) with their request and reply, if any."""
        rows = self.reader.execute(
            """SELECT d.*, q.messages_json, q.user_text, q.block, q.images, q.created_at AS requested_at,
                      r.outcome, r.text AS reply_text, r.sent_at, r.parts
               FROM decisions d LEFT JOIN requests q ON q.batch_id = d.batch_id
               LEFT JOIN replies r ON r.batch_id = d.batch_id
               WHERE d.customer_key = ? AND d.decided_at < ? ORDER BY d.decided_at DESC LIMIT ?""",
            (key, before_ms if before_ms is not None else 2**62, limit),
        ).fetchall()
        return [dict(r) for r in rows]

    def events_between(self, table: str, key: str, since_ms: int, until_ms: int) -> list[dict[str, Any]]:
        assert table in ("inbound", "agent_activity", "actions")
        return [dict(r) for r in self.reader.execute(
            f"SELECT * FROM {table} WHERE customer_key = ? AND at >= ? AND at < ? ORDER BY at",  # noqa: S608
            (key, since_ms, until_ms))]

    def dead_letters(self, offset: int = 0, limit: int = 50, tenants: Collection[str] | None = None) -> Page:
        """The dead letters, newest first, with their replay if any (the replay is seen only through
        its dead letter, so only within the dead letter's tenant)."""
        clause, args = tenant_clause(tenants, "d.tenant")
        where = f" WHERE {clause}" if clause else ""
        total = self.reader.execute(f"SELECT COUNT(*) FROM dead_letters d{where}", args).fetchone()[0]  # noqa: S608
        rows = self.reader.execute(
            "SELECT id, failed_at, service, reason, d.source_topic, customer_key, record_key, batch_id,"  # noqa: S608
            " replayed_at, replayed_by, tenant, length(payload) AS size FROM dead_letters d"
            f" LEFT JOIN replays r ON r.dead_letter_id = d.id{where}"
            " ORDER BY failed_at DESC LIMIT ? OFFSET ?",
            (*args, limit, offset)).fetchall()
        return Page([dict(r) for r in rows], int(total), offset, limit)

    def dead_letter(self, letter_id: str) -> dict[str, Any] | None:
        row = self.reader.execute(
            "SELECT d.*, r.replayed_at, r.replayed_by FROM dead_letters d"
            " LEFT JOIN replays r ON r.dead_letter_id = d.id WHERE d.id = ?", (letter_id,)).fetchone()
        return dict(row) if row else None

    def recent_actions(self, limit: int = 20, tenants: Collection[str] | None = None) -> list[dict[str, Any]]:
        clause, args = tenant_clause(tenants)
        where = f" WHERE {clause}" if clause else ""
        return [dict(r) for r in self.reader.execute(
            f"SELECT * FROM actions{where} ORDER BY at DESC LIMIT ?", (*args, limit))]  # noqa: S608
