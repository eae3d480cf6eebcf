"""ingest: the webhook HTTP service (WATI, ManyChat) -> the inbound and agent-activity topics.

`wati.py` and `manychat.py` are pure normalisers (payload -> record or reason); `app.py` is the thin
aiohttp shell that authenticates, bounds, parses, normalises and produces; `producer.py` keeps a
Kafka producer alive across broker outages; `main.py` is `watistream ingest`.
"""
