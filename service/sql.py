"""Every SQL statement the service runs, written once at import time.

Plain parameterised statements: no session state, nothing prepared on the server.
"""

from typing import LiteralString

GET_ITEM: LiteralString = """
    SELECT id, name, description, visits, created_at, updated_at
    FROM items WHERE id = %s
"""
# GET /items/{id} requests that queued together (service/coalesce.py): each id once.
GET_ITEMS: LiteralString = """
    SELECT id, name, description, visits, created_at, updated_at
    FROM items WHERE id = ANY(%s::bigint[])
"""
LIST_ITEMS: LiteralString = """
    SELECT id, name, description, visits, created_at, updated_at
    FROM items WHERE id > %s ORDER BY id LIMIT %s
"""
INSERT_ITEM: LiteralString = """
    INSERT INTO items (name, description) VALUES (%s, %s)
    RETURNING id, name, description, visits, created_at, updated_at
"""
UPDATE_ITEM: LiteralString = """
    UPDATE items
    SET name = coalesce(%s, name), description = coalesce(%s, description), updated_at = now()
    WHERE id = %s
    RETURNING id, name, description, visits, created_at, updated_at
"""
DELETE_ITEM: LiteralString = "DELETE FROM items WHERE id = %s RETURNING id"

# The write path: bump the item's counter and record the visit, in one statement (the
# UPDATE locks the item row, so a concurrent DELETE cannot slip in between; a missing
# item returns no row instead of raising a foreign-key error).
RECORD_VISIT: LiteralString = """
    WITH bumped AS (UPDATE items SET visits = visits + 1 WHERE id = %s RETURNING id)
    INSERT INTO visits (item_id) SELECT id FROM bumped
    RETURNING id, item_id, created_at
"""
# The same for visits that queued together: every item id once (sorted), then one per
# visit. The rows are locked first, in id order, so two such batches touching the same
# items queue behind each other instead of deadlocking; the counters go up by as many
# visits as each item got, and one row is inserted per visit.
RECORD_VISITS: LiteralString = """
    SELECT id FROM items WHERE id = ANY(%s::bigint[]) ORDER BY id FOR UPDATE;
    WITH visit AS (SELECT unnest(%s::bigint[]) AS item_id),
    bumped AS (
        UPDATE items SET visits = items.visits + per_item.visits
        FROM (SELECT item_id, count(*) AS visits FROM visit GROUP BY item_id) AS per_item
        WHERE items.id = per_item.item_id
        RETURNING items.id
    )
    INSERT INTO visits (item_id)
    SELECT visit.item_id FROM visit JOIN bumped ON bumped.id = visit.item_id
    RETURNING id, item_id, created_at
"""
COUNT_VISITS: LiteralString = "SELECT count(*) AS count FROM visits"
COUNT_ITEM_VISITS: LiteralString = "SELECT count(*) AS count FROM visits WHERE item_id = %s"
