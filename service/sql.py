"""Every SQL statement the service runs, written once at import time.

Plain parameterised statements: no session state, nothing prepared on the server.
"""

from typing import LiteralString

GET_ITEM: LiteralString = """
    SELECT id, name, description, visits, created_at, updated_at
    FROM items WHERE id = %s
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
COUNT_VISITS: LiteralString = "SELECT count(*) AS count FROM visits"
COUNT_ITEM_VISITS: LiteralString = "SELECT count(*) AS count FROM visits WHERE item_id = %s"
