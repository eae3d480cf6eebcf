"""The operator console: a web service of its own that shows what the bot saw, held and missed.

It meets the other services only through topics (see `consumer.py`), keeps what its pages need in
an SQLite store under DATA_DIR (`store.py`), and produces `ContextCommand`s for pause/resume.
"""
