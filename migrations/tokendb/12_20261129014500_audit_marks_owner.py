"""The incremental audit's marks are moved by the audit alone.

Migration 8 let the application role INSERT and UPDATE
``tokendb_audit_marks`` and ``tokendb_audit_checkpoints`` so that it could
run ``audit_ledger(since_checkpoint=True)`` (``tokendb audit``'s default).
The incremental audit trusts each user's mark (rows at or below it are not
read again), so that role could move a mark past a ledger row the owner had
broken (a repair gone wrong, a trigger disabled for a while) and the default
audit would then report clean books.

Now the audit statement is the owner's function
``tokendb_audit_since_checkpoint(checkpoint_id)`` (``SECURITY DEFINER``,
``search_path`` pinned, JIT off): it reads the chain from each mark on and
writes a checkpoint and the new marks only when the books are clean, in the
same statement, as before. Every role that could write the two tables keeps
SELECT, loses INSERT, UPDATE, DELETE and TRUNCATE, and may EXECUTE the
function instead (``tokendb grant`` grants that); nobody else may run it (it
reports users' balances). A mark can therefore only name a row a clean audit
read, whoever calls it.
"""

from tortoise import BaseDBAsyncClient

from tokendb._migration_guard import ALREADY_APPLIED, apply_once

RUN_IN_TRANSACTION = True


async def upgrade(db: BaseDBAsyncClient) -> str:
    if not await apply_once(db, __file__):
        return ALREADY_APPLIED  # by a concurrent `aerich upgrade`, while this one waited
    writers = _GRANTEES.replace("@privileges", "'INSERT', 'UPDATE', 'DELETE', 'TRUNCATE'")
    return UPGRADE.replace("@writers", writers)


async def downgrade(db: BaseDBAsyncClient) -> str:
    return DOWNGRADE.replace("@readers", _GRANTEES.replace("@privileges", "'SELECT'"))


# The roles other than the owner that hold one of @privileges on the audit's tables.
_GRANTEES = """
    SELECT DISTINCT CASE a.grantee WHEN 0 THEN 'PUBLIC' ELSE a.grantee::regrole::text END AS role
    FROM pg_class c CROSS JOIN aclexplode(c.relacl) a
    WHERE c.oid IN ('tokendb_audit_marks'::regclass, 'tokendb_audit_checkpoints'::regclass)
      AND a.grantee <> c.relowner AND a.privilege_type IN (@privileges)
"""

UPGRADE = """
SELECT set_config('search_path', quote_ident(current_schema()) || ', pg_temp', true);

CREATE FUNCTION "tokendb_audit_since_checkpoint"(UUID)
    RETURNS TABLE (
        "user_id" UUID, "balance" BIGINT, "ledger_sum" BIGINT, "broken_links" BIGINT,
        "first_broken" UUID
    )
    LANGUAGE sql SECURITY DEFINER SET search_path FROM CURRENT SET jit = off AS $$
WITH marked AS (
    SELECT u.id AS user_id, u.token_balance,
           m.seq AS mark_seq, m.balance_after AS mark_after, m.transaction_id AS mark_id
    FROM users u LEFT JOIN tokendb_audit_marks m ON m.user_id = u.id
), audited AS MATERIALIZED (
    SELECT k.*, c.*
    FROM marked k CROSS JOIN LATERAL (
        SELECT count(*) FILTER (WHERE seq > coalesce(k.mark_seq, 0)) AS new_rows,
               coalesce(sum(amount) FILTER (WHERE seq > coalesce(k.mark_seq, 0)), 0) AS new_sum,
               count(*) FILTER (WHERE seq = k.mark_seq) AS mark_found,
               count(*) FILTER (WHERE broken) AS broken_links,
               (array_agg(id ORDER BY seq) FILTER (WHERE broken))[1] AS first_broken,
               max(seq) AS last_seq,
               (array_agg(balance_after) FILTER (WHERE newest))[1] AS last_after,
               (array_agg(id) FILTER (WHERE newest))[1] AS last_id
        FROM (
            SELECT id, seq, amount, balance_after,
                   lead(seq) OVER w IS NULL AS newest,
                   (CASE WHEN seq = k.mark_seq
                         THEN id <> k.mark_id OR balance_after <> k.mark_after
                         ELSE balance_after <> coalesce(lag(balance_after) OVER w, k.mark_after, 0)
                                               + amount
                           OR seq <> coalesce(lag(seq) OVER w, k.mark_seq, 0) + 1
                           OR (created_at, id) <= (lag(created_at) OVER w, lag(id) OVER w)
                    END) IS TRUE AS broken
            FROM token_transactions
            WHERE user_id = k.user_id AND seq >= coalesce(k.mark_seq, 0)  -- (user_id, seq)
            WINDOW w AS (ORDER BY seq)
        ) AS chain
    ) AS c
), books AS (
    SELECT user_id, token_balance AS balance,
           coalesce(mark_after, 0) + new_sum AS ledger_sum,
           broken_links + (mark_seq IS NOT NULL AND mark_found = 0)::int AS broken_links,
           CASE WHEN mark_seq IS NOT NULL AND mark_found = 0 THEN mark_id ELSE first_broken END
               AS first_broken
    FROM audited
), off AS (
    SELECT * FROM books WHERE balance <> ledger_sum OR broken_links > 0
), checkpoint AS (                                    -- only when the books are clean
    INSERT INTO tokendb_audit_checkpoints (id, created_at, rows_audited, users_advanced)
    SELECT $1, clock_timestamp(), coalesce(sum(new_rows), 0), count(*) FILTER (WHERE new_rows > 0)
    FROM audited
    HAVING NOT EXISTS (SELECT 1 FROM off)
    RETURNING id
), advanced AS (
    INSERT INTO tokendb_audit_marks AS m (user_id, seq, balance_after, transaction_id, checkpoint_id)
    SELECT a.user_id, a.last_seq, a.last_after, a.last_id, checkpoint.id
    FROM audited a CROSS JOIN checkpoint
    WHERE a.new_rows > 0
    ORDER BY a.user_id
    ON CONFLICT (user_id) DO UPDATE
        SET seq = excluded.seq, balance_after = excluded.balance_after,
            transaction_id = excluded.transaction_id, checkpoint_id = excluded.checkpoint_id
        WHERE m.seq < excluded.seq                    -- a concurrent audit may have gone further
)
SELECT user_id, balance, ledger_sum, broken_links, first_broken FROM off ORDER BY user_id
$$;
REVOKE ALL ON FUNCTION "tokendb_audit_since_checkpoint"(UUID) FROM PUBLIC;
COMMENT ON FUNCTION "tokendb_audit_since_checkpoint"(UUID) IS
    'the incremental ledger audit: the only writer of tokendb_audit_marks and _checkpoints';

DO $$
DECLARE
    grantee TEXT;
BEGIN
    FOR grantee IN @writers LOOP
        EXECUTE format(
            'REVOKE INSERT, UPDATE, DELETE, TRUNCATE '
            'ON "tokendb_audit_marks", "tokendb_audit_checkpoints" FROM %s', grantee);
        EXECUTE format(
            'GRANT EXECUTE ON FUNCTION "tokendb_audit_since_checkpoint"(UUID) TO %s', grantee);
    END LOOP;
END
$$;
"""

DOWNGRADE = """
SELECT set_config('search_path', quote_ident(current_schema()) || ', pg_temp', true);

DO $$
DECLARE
    grantee TEXT;
BEGIN
    FOR grantee IN @readers LOOP
        EXECUTE format(
            'GRANT INSERT, UPDATE ON "tokendb_audit_marks", "tokendb_audit_checkpoints" TO %s',
            grantee);
    END LOOP;
END
$$;
DROP FUNCTION IF EXISTS "tokendb_audit_since_checkpoint"(UUID);
"""


MODELS_STATE = (
    "eJztXf9zojgU/1cYf+rO9Dpd+925uRm1duttq52Ke7t73nBRYs0UAguhrbPX//2SCAIBrF"
    "htkc1Pti95ED4vX977vAR+Voh1D7E+3Kvb6DOcVmrKzwoGJqR/iEW7SgXYdqSASQgYGrwy"
    "sJF2D6curzZ0iQNGhMrHwHAhFenQHTnIJsjCVIo9w2BCa0QrInwXijyMfnhQI9YdJBPo0I"
    "K//6FihHX4BN3gX/teGyNo6LHmIp3dm8s1MrW5rN9vn1/wmux2Q21kGZ6Jw9r2lEwsPK/u"
    "eUjfYzqs7A5i6AAC9chjsFb6TxyIZi2mAuJ4cN5UPRTocAw8g4FR+X3s4RHDQAmwRbq7h+"
    "GjhvQ//CZGqmtap6tqvZaqaZUcGI4szPBHmDDAfj7PrhsCw6UVdoPmZf125+D4A4fCcsmd"
    "wws5bJVnrggImKly8EO0qa21CXAnScybE+CkYx7VEZCnDd4M5gFMGwC2YoInzYD4jkzov9"
    "WjowVIf6nfcrBpLY62RcfHbOB0/KLqrIyhHkfZduAYPeXFOdRaD9KBIIQ6HNpvj/X+MlDv"
    "ZyO9LwLNf3NAHNQvIbgf95dBl9bKhJeXxfG1oWMi16UNc5Mw/9nrdtJhFtQEtHU0Isp/io"
    "FcsinUI1P20EMGQdjdY/d7j9mawcSubLruDyOK+M51/atojOZVtyFO6+wCDcEwyNXoSo0e"
    "Unp/w7IMCHDG+hnVE+wypIqbMkgwwb8t9I1u9yoGfaOtCoD3rxstOiy4HWglRLi43VEFwA"
    "3gEs1zoa4BksT8nMJFkAnTQRd1xfHgK+8FfyxhBB/PokxFC2ygtq9bPbV+fRMzxHldbbGS"
    "KpdOBenOsTAu5hdR/mqrlwr7V/ne7bTEoTKvp36vsDYBj1gath41oEcxCcSBKGZp+GQjer"
    "kV7BzXlFYuspVHDmS4r2DluOYarFw4v4I+oN7FxtTvgVtidn+wLLQ6j980A5koxewNdNfG"
    "JN3ogqJgdYrc9o1m2lz689tZtXpwcFLdPzg+PTo8OTk63T+ldXmDk0Unixbb9ie2bMZMm7"
    "KOMgg16iAiKyXwZ557C3smN0KbNhfgEUyup8I1VvLm38YatNd/qyk6mA7wdbejXtYU08Jk"
    "MsBqV61f0VZYBHCnK6+7v0zUmh2zJiJW6p04Wj4qJqKyTj6muGvcC7QLY7jG96msC4MqCe"
    "2F5UB0hz/DaaK7C4AGtFPfv852YhpKw+HngMc5JxjtUfThdWjAmTferPea9fNWhUM8BKP7"
    "R+DoWgbWowkgmguzgtaGr37x+RYagD9JNt50OiK92aVKBHt8RXQAdgEPlV+Llsp+1fB6hZ"
    "mEX48Y63hW1Yp0uFhXTBaZVVOUAAzu+COxe7M7RXvZNe1lgC/ISSI/Wr67kM3nfd+cVZWU"
    "/i9C6TuWkcGBvuxJBbpF5kMr/V7rtqawxWGA671em8YAHbWmADovs8ciA9z71lNb1zXFnb"
    "oEmqu4U2dLuFNnme7UmehO0XsRiFNiDBU+ZUQYEZUiW2MtZEHrq7qYEZ0HjVfdzqegukiT"
    "PidDu5QlbHFIl8ZPLxfNFQ1vP5yrfjw8OTw9OD6cR3FzyaLgLRmozeDxacsxSXNgX4BW0J"
    "Uop6AsaahsqMtLQ/nhSc6AO64lY+7FMbcbxm2vDbvLGQbuCtF3vHvlDcA3HiEFBsiKkCIG"
    "eilCirIDMkIqf4QUcUdWc2Le1n3Z3xLfxbToDJEeeaYjOlcoRYAj8PHL7L45yt58c5TYey"
    "Ndw1/RNaQz7Uo2j+rJnQdF3nngb7nO6fzHtaTzL/OXMn/5xpi+Pn+ZMg2sA9bwpEdJgY1P"
    "fjFsb+l8fNtuqsslh6O5sVfmhSMZuZKgvtksJ88OX1pCIJws3V0Yv8/2YU0sdsvdJaL3Cr"
    "+wq9CpDjoPUFfGlqMAZWSZNu1BLLp9nFgupAKXKMhVsEWUe7pyY2UKibJToyFL7d+gkfy2"
    "/37YExNMG7uJZBgKtD7uLmAYgGl5aem+THIhVJBpkRRqgS55xEuZpZfLaofab0c0VMJjFX"
    "ly2/Wm2v7Sqikz7QFu1m/U/m3rvKaMgE08B+oDfNu6atV7TObQZQ+4TNb6etPm1WZ7zvVV"
    "ct6nSzAWp5mExanIVzhwDB1I7ZHTDxf1XjELbU/UmiO0id48AWv2fgJBrcB7ZAu7paBAJ0"
    "GKNuGXiZCRRGv2glFeopVeyTIeVjK7oCrp1kKPbt+P0nL76CmaJTr3s61pwKKhueEs4Dtn"
    "CwqG9no86vnAjhx+yAnwgktItGVqRqZmCpZByErNhOmDlyaIdYBc3hNSIt4L5scl8H+P3N"
    "iWAv3K1NjmUz7R7p6Z+RHGxIsJIPHUotzFKXMsMseS84APQyOB5nIZlkC3yBs5K2r3pn/D"
    "XrFge/YA93v1Ty12jJBOViynctHv8IwKHSD6ADe6nX6vpgwtPEsc5Q38jpeI+0QWJAz7js"
    "WoT3L+78X5yyzWZqLAITDYTJL7KGFCT87l8hhhLqjLm8KQzKtkXrdrFZBcoOQC350yyccF"
    "Si6qFFwU79Np/FPQ2RdwTqzDSJrpF6GZoAlQLqdqriC/jbDMtxFs4LqPFh3PeT9DkVAsMv"
    "lUJMTlRxI2+5GE7XoB29xLzLVN/fy63akpQDcRZlRq8EK2VajSNb+5dpYQ8mmiHMRSQk++"
    "4EFklSa8Ut73qglaElZJ1kmyjkJs6ytaPa4prV4Uq6dsP54fo00Eti+dTI5+iC/eOXKdTC"
    "7dUfD4zCnf7Z0Hrvkx6VfAFDuYXUaQ3vcF6FsD2UbJuTp00GhSSaPn/KLdxV8xDSsVhqHL"
    "9I9TCboUt9h3KorLFa3FLc4m4h6gk/4Cz2zmIqJSQvJiI+QQG1U5EParlxDdjVBDme+Bz/"
    "52ZvZ74N/gu5nvk/Fc2xcyc3je61/Pnv8H0QfU3A=="
)
