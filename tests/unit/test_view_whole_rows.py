"""Which view definitions may pass whole rows on (masking: such views over masked tables are refused)."""

from __future__ import annotations

import pytest

from dbguard.masking.catalog import references_whole_rows


@pytest.mark.parametrize("definition, whole", [
    ("SELECT c.id, c.name FROM customers c", False),
    ("SELECT customers.id FROM customers JOIN orders o ON o.customer_id = customers.id", False),
    ("SELECT c.id, row_to_json(c.*) AS j FROM customers c", True),  # how pg_get_viewdef shows row_to_json(c)
    ("SELECT to_jsonb(customers) FROM customers", True),
    ("SELECT x.id FROM (SELECT id FROM customers) x WHERE x IS NOT NULL", True),
    ("WITH w AS (SELECT id FROM customers) SELECT w FROM w", True),
    ("SELECT id FROM customers WHERE (customers.*) IS NOT NULL", True),
    ("not sql at all (", True),
])
def test_whole_row_references_are_found(definition, whole):
    assert references_whole_rows(definition) is whole
