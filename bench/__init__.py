"""tokendb's benchmark suite: every hot path against hand-written asyncpg, in the same run.

Run it from a checkout (PostgreSQL reachable, tokendb installed)::

    python -m bench                 # full size: 1,000 users, 1M-row history (~5 min)
    python -m bench --quick         # CI size: seconds, small history
    python -m bench --help          # every size knob (also TOKENDB_BENCH_* variables)

It creates a throw-away database on ``TOKENDB_TEST_DATABASE_URL`` (default
``postgres://postgres@127.0.0.1:5432/postgres``), migrates it with Aerich,
seeds it, runs each scenario for tokendb and for the raw-asyncpg baseline in
interleaved rounds (same pool size, same concurrency), checks the books after
every scenario, prints the table and writes it to ``bench/RESULTS.md`` and
``bench/results/latest.json``. The database is dropped at the end.
"""
